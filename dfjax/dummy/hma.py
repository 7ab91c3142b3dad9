"""Heterogeneous Memory Allocation: a head plan applied to cache layouts, weights and caches.

After the plan is fixed, every layer's heads are reordered into the head table's order (HeadTable.order) by
permuting the q/k/v/o projections and the q/k RMSNorm weights once (RMSNorm over the full width and the per-head
RoPE are invariant to a head permutation), so the compiled loop never gathers heads. Each cache group (the types
of one cache shape) then has its own cache with its own static shape; with the standard table:
  release (packed dummy): [sink + dummy heads: 1 frame + chunk] and [neighbour heads: L chunks + chunk];
  paper:                  [sink: 1 frame + chunk], [dummy: chunk], [neighbour: L chunks + chunk].
A group without heads in a layer is left out of that layer's layout (no zero-size arrays: XLA:CPU of jax 0.11.2
crashed compiling them inside shard_map, and they are nothing to attend to anyway).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfjax.cache import AttentionLayout, GroupKV, GroupLayout, KVCache
from dfjax.dummy.heads import HeadTable
from dfjax.dummy.plan import HeadPlan


def warmup_layout(num_layers, num_heads, local_context_length, tokens_per_frame, chunk_frames) -> AttentionLayout:
    """Before the plan: every head sees [frame 0 ; the last L chunks after frame 0 ; the chunk]."""
    return AttentionLayout.uniform(num_layers, num_heads, 1, (local_context_length + 1) * chunk_frames,
                                   tokens_per_frame, chunk_frames)


def _segments(table: HeadTable, row: tuple[int, ...]):
    """Per cache group of the table: [(head type, count)] of one layer's head codes, in permutation order."""
    return [[(t, row.count(t.code)) for t in group] for group in table.groups]


def plan_layout(plan: HeadPlan, tokens_per_frame: int, chunk_frames: int) -> AttentionLayout:
    layers = []
    for row in plan.head_types:
        groups = []
        for segment in _segments(plan.table, row):
            t0, n = segment[0][0], sum(c for _, c in segment)
            if n:
                newest = sum(c for t, c in segment if t.newest_frames)
                groups.append(GroupLayout(n, t0.fixed_frames, (t0.history_chunks + 1) * chunk_frames, newest,
                                          ring_start=t0.history_from))
        layers.append(tuple(groups))
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
            lin.permute_outputs(cols)
        attn.norm_q.set_value(attn.norm_q[...][cols])
        attn.norm_k.set_value(attn.norm_k[...][cols])
        attn.o.permute_inputs(cols)


ATTENTION = nnx.PathContains("self_attn")  # the parameters a head permutation changes


def permuted_attention(graphdef, params, permutation):
    """The self-attention parameters of a model whose heads are permuted (pure; jit it with a traced permutation).
    Only these: a jitted function's outputs are new buffers, and a copy of the whole model per plan would cost
    its size in device memory (2.6 GB for the 1.3B, 28 GB for the 14B)."""
    model = nnx.merge(graphdef, params)
    permute_heads(model, permutation)
    return nnx.state(model, ATTENTION)


def permuted_params(graphdef, params, permutation):
    """A model's parameters with its heads permuted; the other parameters are the same arrays."""
    return nnx.merge_state(params, permuted_attention(graphdef, params, permutation))


def transition_cache(cache: KVCache, layout_b: AttentionLayout, plan: HeadPlan, last_chunk: int) -> KVCache:
    """Builds the plan's per-group caches from the warm-up cache after chunk `last_chunk` was refreshed.

    Each head type keeps what its row of the table says: its first frames, the chunk's newest (clean) frames, and
    the frames of its last history chunks. Static indices: runs once per video (jit it with the layout, plan and
    chunk static). A frame the warm-up cache no longer holds is an error, not a silent zero.
    """
    layout_a = cache.layout
    tpf, cf = layout_a.tokens_per_frame, layout_a.chunk_frames
    end = (last_chunk + 1) * cf

    def frame(buf, g_a, f):
        if not g_a.holds(f, end):
            raise ValueError(f"the plan needs latent frame {f}, which the warm-up cache (sink {g_a.sink_frames}, "
                             f"window {g_a.window_frames} frames) dropped by chunk {last_chunk}; lower ar_start or "
                             "raise local_context_length.")
        s = g_a.static_slot(f)
        return buf[:, s * tpf:(s + 1) * tpf]

    out = []
    for (warm,), layer_b, row, perm in zip(cache.layers, layout_b.layers, plan.head_types, plan.permutation):
        g_a = warm.layout
        k_perm, v_perm = (buf[:, :, np.asarray(perm)] for buf in (warm.k, warm.v))
        segments = [s for s in _segments(plan.table, row) if sum(c for _, c in s)]
        groups, h0 = [], 0
        for g, segment in zip(layer_b, segments):
            bufs = []
            for buf in (k_perm, v_perm):
                new = jnp.zeros((buf.shape[0], g.capacity_frames * tpf, g.num_heads, buf.shape[3]), buf.dtype)
                h = h0
                for t, count in segment:
                    src = buf[:, :, h:h + count]
                    slots = [(f, g.static_slot(f)) for f in range(min(t.first_frames, end))]
                    slots += [(f, g.static_slot(f)) for f in range(max(0, end - t.history_chunks * cf), end)
                              if f >= g.ring_first]  # the ring; earlier frames are the fixed slots' or nobody's
                    slots += [(f, j) for j, f in enumerate(range(end - t.newest_frames, end))]
                    for f, s in slots:
                        new = new.at[:, s * tpf:(s + 1) * tpf, h - h0:h - h0 + count].set(frame(src, g_a, f))
                    h += count
                bufs.append(new)
            groups.append(GroupKV(*bufs, g, tpf))
            h0 += g.num_heads
        out.append(tuple(groups))
    return dataclasses.replace(cache, layers=tuple(out))


def cache_nbytes(cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
