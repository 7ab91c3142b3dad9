"""Heterogeneous Memory Allocation: a Dummy Forcing head plan applied to cache layouts, weights and caches.

After the plan is fixed, every layer's heads are reordered [sink, dummy, neighbour] by permuting the
q/k/v/o projections and the q/k RMSNorm weights once (RMSNorm over the full width and the per-head
RoPE are invariant to a head permutation), so the compiled loop never gathers heads. Each group then
has its own cache with its own static shape:
  packed (release): [sink + dummy heads: 1 frame + chunk] and [neighbour heads: L chunks + chunk];
  paper:            [sink: 1 frame + chunk], [dummy: chunk], [neighbour: L chunks + chunk].
A group without heads in a layer is left out of that layer's layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfjax.cache import AttentionLayout, GroupLayout
from dfjax.dummy import HeadPlan


def warmup_layout(num_layers, num_heads, local_context_length, tokens_per_frame, chunk_frames) -> AttentionLayout:
    """Before the plan: every head sees [frame 0 ; the last L chunks after frame 0 ; the chunk]."""
    return AttentionLayout.uniform(num_layers, num_heads, 1, (local_context_length + 1) * chunk_frames,
                                   tokens_per_frame, chunk_frames)


def plan_layout(plan: HeadPlan, tokens_per_frame: int, chunk_frames: int) -> AttentionLayout:
    window = (plan.local_context_length + 1) * chunk_frames
    layers = []
    for n_sink, n_dummy, n_nbr in plan.group_sizes:
        if plan.packed_dummy:
            groups = (GroupLayout(n_sink + n_dummy, 1, chunk_frames, packed_heads=n_dummy),
                      GroupLayout(n_nbr, 0, window))
        else:
            groups = (GroupLayout(n_sink, 1, chunk_frames), GroupLayout(n_dummy, 0, chunk_frames),
                      GroupLayout(n_nbr, 0, window))
        # a group without heads has no cache (no zero-size arrays: XLA:CPU of jax 0.11.2 crashed compiling them
        # inside shard_map, and they are nothing to attend to anyway)
        layers.append(tuple(g for g in groups if g.num_heads))
    return AttentionLayout(tuple(layers), tokens_per_frame, chunk_frames)


def permute_heads(model: nnx.Module, permutation) -> None:
    """Reorders each block's self-attention heads (in place): permuted head j of layer l is original
    head permutation[l, j]. permutation may be traced ([L, H] int32), so one compiled program serves
    every plan (see `permuted_params`)."""
    d = model.cfg.head_dim
    permutation = jnp.asarray(permutation, jnp.int32)
    for blk, perm in zip(model.blocks, permutation):
        attn = blk.self_attn
        cols = (perm[:, None] * d + jnp.arange(d)[None, :]).reshape(-1)
        for lin in (attn.q, attn.k, attn.v):
            lin.kernel.set_value(lin.kernel[...][:, cols])
            lin.bias.set_value(lin.bias[...][cols])
        attn.norm_q.set_value(attn.norm_q[...][cols])
        attn.norm_k.set_value(attn.norm_k[...][cols])
        attn.o.kernel.set_value(attn.o.kernel[...][cols, :])


def permuted_params(graphdef, params, permutation):
    """A model's parameters with its heads permuted (pure; jit it with a traced permutation)."""
    model = nnx.merge(graphdef, params)
    permute_heads(model, permutation)
    return nnx.split(model)[1]


def transition_cache(cache_a, layout_a: AttentionLayout, layout_b: AttentionLayout, plan: HeadPlan,
                     last_chunk: int):
    """Builds the plan's per-group caches from the warm-up cache after chunk `last_chunk` was refreshed.

    Sink heads keep frame 0; packed dummy heads the chunk's last (newest clean) frame; neighbour
    heads the last L chunks. Static indices: runs once per video.
    """
    tpf, cf = layout_a.tokens_per_frame, layout_a.chunk_frames
    L = plan.local_context_length
    newest = (last_chunk + 1) * cf - 1
    nbr_frames = range(max(0, (last_chunk - L + 1) * cf), (last_chunk + 1) * cf)

    def frames_of(buf, g_a, f):
        s = g_a.static_slot(f)
        return buf[:, s * tpf:(s + 1) * tpf]

    out = []
    for layer_cache, layer_a, layer_b, perm in zip(cache_a, layout_a.layers, layout_b.layers, plan.permutation):
        g_a = layer_a[0]
        kv_perm = [buf[:, :, np.asarray(perm)] for buf in layer_cache[0]]
        groups, h0 = [], 0
        for g in layer_b:
            bufs = []
            for buf in kv_perm:
                src = buf[:, :, h0:h0 + g.num_heads]
                new = jnp.zeros((buf.shape[0], g.capacity_frames * tpf, g.num_heads, buf.shape[3]), buf.dtype)
                if g.sink_frames:  # one slot: frame 0 for sink heads, the newest frame for packed dummy heads
                    first = frames_of(src, g_a, 0)
                    if g.packed_heads:
                        p = g.num_heads - g.packed_heads
                        first = first.at[:, :, p:].set(frames_of(src, g_a, newest)[:, :, p:])
                    new = new.at[:, :tpf].set(first)
                elif g.window_frames > cf:  # a ring of the last L chunks + the chunk slot
                    for f in nbr_frames:
                        s = g.static_slot(f)
                        new = new.at[:, s * tpf:(s + 1) * tpf].set(frames_of(src, g_a, f))
                bufs.append(new)
            groups.append(tuple(bufs))
            h0 += g.num_heads
        out.append(tuple(groups))
    return tuple(out)


def score_key_order(layout_a: AttentionLayout, chunk: int) -> np.ndarray:
    """Token indices into a warm-up cache that list the keys chunk `chunk` attends to in frame order
    [frame 0 ; neighbour frames ; chunk frames], so scores can slice sink / neighbour / current."""
    g = layout_a.layers[0][0]
    tpf, cf = layout_a.tokens_per_frame, layout_a.chunk_frames
    end = (chunk + 1) * cf
    first_kept = max(1, end - g.window_frames)
    frames = [0] + list(range(first_kept, end)) if end > 1 else [0]
    slots = [g.static_slot(f) for f in frames]
    return np.concatenate([np.arange(s * tpf, (s + 1) * tpf) for s in slots]).astype(np.int32)


def cache_nbytes(cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
