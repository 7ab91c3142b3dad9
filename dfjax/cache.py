"""KV cache layouts with static shapes: global, local window + sink, and Dummy Forcing's per-head-type groups.

A layer's self-attention heads are split into contiguous groups; each group has its own cache of
shape [B, capacity_frames * tokens_per_frame, heads, head_dim] for K and V. A group keeps the first
`sink_frames` latent frames forever and the latest `window_frames` frames in a ring buffer (the
current chunk's frames included, so the ring slot the chunk writes is one that has fallen out of
the window). Keys are stored after RoPE at their absolute frame index, so their order inside the
buffer does not matter to attention; slots fill as a prefix, which lets kernels take a valid length.

Every forward writes its chunk's K/V into the chunk's slots before attending (the cache-refresh
forward at t=0 writes last and leaves the clean K/V). Dummy Forcing's packed dummy heads (the last
`packed_heads` heads of a group with one sink slot) instead hold the newest clean latent frame in
that slot, replaced after attention in each refresh forward.

The cache pytree is a tuple over layers of a tuple over groups of (k, v).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class GroupLayout:
    num_heads: int
    sink_frames: int
    window_frames: int
    packed_heads: int = 0

    def __post_init__(self):
        if self.num_heads < 0 or self.sink_frames < 0 or self.window_frames < 1:
            raise ValueError(f"invalid group layout {self}: need num_heads >= 0, sink >= 0, window >= 1.")
        if self.packed_heads and self.sink_frames != 1:
            raise ValueError("packed heads need exactly one sink slot (the newest clean frame).")
        if not 0 <= self.packed_heads <= self.num_heads:
            raise ValueError(f"packed_heads {self.packed_heads} out of [0, {self.num_heads}].")

    @property
    def capacity_frames(self) -> int:
        return self.sink_frames + self.window_frames

    def slot_of_frame(self, f):
        """Cache slot (in frames) of absolute latent frame f (may be traced)."""
        return jnp.where(f < self.sink_frames, f, self.sink_frames + (f - self.sink_frames) % self.window_frames)

    def static_slot(self, f: int) -> int:
        """slot_of_frame for a Python int (host-side index building)."""
        return f if f < self.sink_frames else self.sink_frames + (f - self.sink_frames) % self.window_frames

    def valid_frames(self, end):
        """Filled slots once frames [0, end) have been written (a prefix of the buffer)."""
        return jnp.minimum(end, self.sink_frames) + jnp.clip(end - self.sink_frames, 0, self.window_frames)


@dataclass(frozen=True)
class AttentionLayout:
    """Static description of every layer's head groups, plus the token geometry of a chunk."""

    layers: tuple[tuple[GroupLayout, ...], ...]
    tokens_per_frame: int
    chunk_frames: int

    def __post_init__(self):
        heads = {sum(g.num_heads for g in layer) for layer in self.layers}
        if len(heads) != 1:
            raise ValueError(f"layers have different head counts {sorted(heads)}.")
        for layer in self.layers:
            for g in layer:
                if g.window_frames < self.chunk_frames:
                    raise ValueError(
                        f"a window of {g.window_frames} frames cannot hold a chunk of {self.chunk_frames}; "
                        "make the window at least one chunk."
                    )

    @classmethod
    def uniform(cls, num_layers, num_heads, sink_frames, window_frames, tokens_per_frame, chunk_frames):
        group = GroupLayout(num_heads, sink_frames, window_frames)
        return cls(tuple((group,) for _ in range(num_layers)), tokens_per_frame, chunk_frames)

    def cache_bytes(self, batch: int, head_dim: int, itemsize: int) -> int:
        tokens = sum(g.capacity_frames * g.num_heads for layer in self.layers for g in layer) * self.tokens_per_frame
        return 2 * batch * tokens * head_dim * itemsize


def init_cache(layout: AttentionLayout, batch: int, head_dim: int, dtype) -> tuple:
    def group(g):
        shape = (batch, g.capacity_frames * layout.tokens_per_frame, g.num_heads, head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    return tuple(tuple(group(g) for g in layer) for layer in layout.layers)


def write_chunk(buf, new, frame_start, g: GroupLayout, tokens_per_frame: int):
    """Writes a chunk's K or V [B, F*T, H, D] into its slots of `buf` (frame by frame: a ring may wrap)."""
    num_frames = new.shape[1] // tokens_per_frame
    for j in range(num_frames):
        slot = g.slot_of_frame(frame_start + j)
        frame = new[:, j * tokens_per_frame:(j + 1) * tokens_per_frame]
        buf = jax.lax.dynamic_update_slice_in_dim(buf, frame.astype(buf.dtype), slot * tokens_per_frame, axis=1)
    return buf


def refresh_packed(buf, new, is_refresh, g: GroupLayout, tokens_per_frame: int):
    """After a refresh forward's attention: packed heads' sink slot <- the chunk's last (newest clean) frame.

    A where() over a head mask plus a slice update on the token axis: a scatter on the head axis
    would make a head-sharded cache be gathered.
    """
    if not g.packed_heads:
        return buf
    packed = (jnp.arange(g.num_heads) >= g.num_heads - g.packed_heads)[None, None, :, None]
    slot = jnp.where(packed & is_refresh, new[:, -tokens_per_frame:].astype(buf.dtype), buf[:, :tokens_per_frame])
    return jax.lax.dynamic_update_slice_in_dim(buf, slot, 0, axis=1)
