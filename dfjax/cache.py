"""The self-attention KV cache: static-shape ring buffers with fixed slots, one per head group of a layer.

A layer's heads are split into contiguous groups (one group for the baseline; one per cache shape under
Dummy Forcing, see dfjax.dummy.heads). Each group has its own K and V buffers of shape
[B, capacity_frames * tokens_per_frame, heads, head_dim]: `sink_frames` fixed slots, then a ring of the latest
`window_frames` frames, the current chunk included (the ring slot a chunk writes is one that has fallen out of
the window). Keys are stored after RoPE at their absolute frame index, so their order inside the buffer does not
matter to attention; slots fill as a prefix, which lets kernels take a valid length instead of a mask.

The fixed slots of most heads hold the video's first frames (attention sinks). The last `newest_heads` heads of a
group instead hold the newest clean frames there, replaced after attention in every cache-refresh forward
(Dummy Forcing's packed dummy heads, which thus share one attention call with the sink heads).

The cache is a pytree (KVCache of GroupKV) whose layout is static metadata: a jitted function that takes a cache
knows its layout, and two caches of different layouts are different programs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class GroupLayout:
    num_heads: int
    sink_frames: int  # fixed slots
    window_frames: int  # the ring, current chunk included
    newest_heads: int = 0  # the last heads of the group: their fixed slots hold the newest clean frames
    ring_start: int = 0  # the ring holds frames from this one on (Dummy Forcing's neighbour heads: 1, frame 0 is
    # the sink heads'); frames before it and after the fixed slots are never written

    def __post_init__(self):
        if self.num_heads < 0 or self.sink_frames < 0 or self.window_frames < 1 or self.ring_start < 0:
            raise ValueError(f"invalid group layout {self}: need num_heads >= 0, sink >= 0, window >= 1, "
                             "ring_start >= 0.")
        if not 0 <= self.newest_heads <= self.num_heads:
            raise ValueError(f"newest_heads {self.newest_heads} out of [0, {self.num_heads}].")
        if self.newest_heads and not self.sink_frames:
            raise ValueError("heads that keep the newest frames need fixed slots (sink_frames >= 1).")

    @property
    def capacity_frames(self) -> int:
        return self.sink_frames + self.window_frames

    @property
    def ring_first(self) -> int:
        """The first frame the ring holds."""
        return max(self.sink_frames, self.ring_start)

    def slot_of_frame(self, f):
        """Cache slot (in frames) of absolute latent frame f (may be traced); frames the group never keeps
        (before ring_first and after the fixed slots) get -1."""
        ring = self.sink_frames + (f - self.ring_first) % self.window_frames
        return jnp.where(f < self.sink_frames, f, jnp.where(f < self.ring_first, -1, ring))

    def static_slot(self, f: int) -> int:
        """slot_of_frame for a Python int (host-side index building)."""
        if f < self.sink_frames:
            return f
        return -1 if f < self.ring_first else self.sink_frames + (f - self.ring_first) % self.window_frames

    def holds(self, f: int, end: int) -> bool:
        """Whether frame f is still in the cache once frames [0, end) were written in order."""
        return f < min(self.sink_frames, end) or max(self.ring_first, end - self.window_frames) <= f < end

    def valid_frames(self, end):
        """Filled slots once frames [0, end) have been written (a prefix of the buffer)."""
        return jnp.minimum(end, self.sink_frames) + jnp.clip(end - self.ring_first, 0, self.window_frames)


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
                if g.newest_heads and g.sink_frames > self.chunk_frames:
                    raise ValueError(f"{g.sink_frames} newest frames are more than a chunk ({self.chunk_frames}).")

    @classmethod
    def uniform(cls, num_layers, num_heads, sink_frames, window_frames, tokens_per_frame, chunk_frames):
        group = GroupLayout(num_heads, sink_frames, window_frames)
        return cls(tuple((group,) for _ in range(num_layers)), tokens_per_frame, chunk_frames)

    def cache_bytes(self, batch: int, head_dim: int, itemsize: int) -> int:
        tokens = sum(g.capacity_frames * g.num_heads for layer in self.layers for g in layer) * self.tokens_per_frame
        return 2 * batch * tokens * head_dim * itemsize


def _static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class GroupKV:
    """One head group's K and V buffers [B, capacity_frames * tokens_per_frame, heads, head_dim] and their layout."""

    k: jax.Array
    v: jax.Array
    layout: GroupLayout = _static()
    tokens_per_frame: int = _static()

    @property
    def num_heads(self) -> int:
        return self.layout.num_heads

    def write(self, k, v, frame_start) -> "GroupKV":
        """The chunk's K and V [B, F*T, heads, D] in their slots (frame by frame: a ring may wrap)."""
        tpf = self.tokens_per_frame

        def put(buf, new):
            for j in range(new.shape[1] // tpf):
                slot = self.layout.slot_of_frame(frame_start + j)
                frame = new[:, j * tpf:(j + 1) * tpf].astype(buf.dtype)
                if self.layout.ring_first > self.layout.sink_frames:  # a frame it never keeps: write it back as it was
                    old = jax.lax.dynamic_slice_in_dim(buf, jnp.maximum(slot, 0) * tpf, tpf, axis=1)
                    frame = jnp.where(slot >= 0, frame, old)
                buf = jax.lax.dynamic_update_slice_in_dim(buf, frame, jnp.maximum(slot, 0) * tpf, axis=1)
            return buf

        return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v))

    def valid_tokens(self, frame_end):
        """Filled key slots once frames [0, frame_end) were written (int32, may be traced)."""
        return (self.layout.valid_frames(frame_end) * self.tokens_per_frame).astype(jnp.int32)

    def keep_newest(self, k, v, is_refresh) -> "GroupKV":
        """After a refresh forward's attention: the newest heads' fixed slots <- the chunk's last (newest clean)
        frames. A where() over a head mask plus a slice update on the token axis: a scatter on the head axis would
        make a head-sharded cache be gathered."""
        g = self.layout
        if not g.newest_heads:
            return self
        n = g.sink_frames * self.tokens_per_frame
        newest = (jnp.arange(g.num_heads) >= g.num_heads - g.newest_heads)[None, None, :, None]

        def put(buf, new):
            slots = jnp.where(newest & is_refresh, new[:, -n:].astype(buf.dtype), buf[:, :n])
            return jax.lax.dynamic_update_slice_in_dim(buf, slots, 0, axis=1)

        return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Every layer's head groups; the layout is static metadata of the pytree."""

    layers: tuple[tuple[GroupKV, ...], ...]
    chunk_frames: int = _static()

    @property
    def layout(self) -> AttentionLayout:
        tpf = {g.tokens_per_frame for layer in self.layers for g in layer}.pop()
        return AttentionLayout(tuple(tuple(g.layout for g in layer) for layer in self.layers), tpf, self.chunk_frames)


def init_cache(layout: AttentionLayout, batch: int, head_dim: int, dtype) -> KVCache:
    def group(g):
        shape = (batch, g.capacity_frames * layout.tokens_per_frame, g.num_heads, head_dim)
        return GroupKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), g, layout.tokens_per_frame)

    return KVCache(tuple(tuple(group(g) for g in layer) for layer in layout.layers), layout.chunk_frames)
