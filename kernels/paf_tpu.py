"""Packed Attention Forward for TPUs: Pallas with the Mosaic TPU lowering.

One pallas_call covers every head group of a layer. Arrays stay in the model's [B, L, H, D]
layout, viewed (for free) as [B, L, H*D] so that one head is one lane-dense [rows, D] block.
Grid (batch, head, query block, key block); the key axis is the reduction ("arbitrary") axis and
runs over max_g cdiv(Lk_g, block_k) steps. The valid key counts arrive by scalar prefetch, so
the index maps can stop at each group's last valid block: past kv_len the block index stays put
(the pipeline issues no new DMA) and the kernel skips the step. Ragged edge blocks (Lq, Lk or
kv_len not block multiples) are masked in the kernel: the rows Mosaic leaves unwritten in VMEM
hold garbage, so both the scores and the values of invalid keys are replaced.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per query / key block (multiples of 8, the sublane count; capped to the array)."""
    block_q: int = 512
    block_k: int = 512


def paf_attention(q: jax.Array, ks: tuple[jax.Array, ...], vs: tuple[jax.Array, ...],
                  kv_lens: jax.Array, *, block_sizes: BlockSizes = BlockSizes(),
                  interpret: bool = False) -> jax.Array:
    """q [B, Lq, H, D]; group g: ks[g], vs[g] [B, Lk_g, H_g, D] with H_g > 0 and sum H_g == H,
    kv_lens[g] (int32, in [1, Lk_g]) valid keys. Returns [B, Lq, H, D] in q.dtype.
    interpret=True runs the TPU interpreter (uninitialised VMEM reads as NaN)."""
    b, lq, h, d = q.shape
    heads = tuple(k.shape[2] for k in ks)
    assert sum(heads) == h and min(heads) > 0, (heads, h)
    assert d % 128 == 0, f"head_dim must be a multiple of 128 (one lane tile), got {d}"
    starts = tuple(int(x) for x in np.cumsum((0,) + heads[:-1]))
    bq = min(block_sizes.block_q, _round_up(lq, 8))
    bks = tuple(min(block_sizes.block_k, _round_up(k.shape[1], 8)) for k in ks)
    num_k_steps = max(pl.cdiv(k.shape[1], bk) for k, bk in zip(ks, bks))

    q_spec = pl.BlockSpec((None, bq, d), lambda bb, hh, i, j, lens: (bb, i, hh))
    kv_specs = []
    for g, bk in enumerate(bks):
        spec = pl.BlockSpec((None, bk, d), functools.partial(
            _kv_index_map, start=starts[g], heads=heads[g], block_k=bk, g=g))
        kv_specs += [spec, spec]
    kernel = functools.partial(_kernel, starts=starts, heads=heads, block_ks=bks,
                               num_k_steps=num_k_steps, scale=1.0 / math.sqrt(d))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h, pl.cdiv(lq, bq), num_k_steps),
        in_specs=[q_spec, *kv_specs],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32),   # running max
                        pltpu.VMEM((bq, 1), jnp.float32),   # running sum
                        pltpu.VMEM((bq, d), jnp.float32)])  # unnormalised output
    flat = lambda x: x.reshape(*x.shape[:2], -1)  # [B, L, H, D] -> [B, L, H*D], no copy
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, lq, h * d), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="paf_attention_tpu",
    )(kv_lens.astype(jnp.int32), flat(q), *[flat(x) for kv in zip(ks, vs) for x in kv])
    return out.reshape(q.shape)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _kv_index_map(bb, hh, i, j, lens, *, start: int, heads: int, block_k: int, g: int):
    owns = (hh >= start) & (hh < start + heads)
    last = pl.cdiv(lens[g], block_k) - 1
    # Past the last valid block, and for heads of other groups, repeat an index: no new DMA.
    return bb, jnp.where(owns, jnp.minimum(j, last), 0), jnp.clip(hh - start, 0, heads - 1)


def _kernel(lens_ref, q_ref, *refs, starts, heads, block_ks, num_k_steps: int, scale: float):
    *kv_refs, o_ref, m_ref, l_ref, acc_ref = refs
    hh, j = pl.program_id(1), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    for g, bk in enumerate(block_ks):
        kv_len = lens_ref[g]
        owns = (hh >= starts[g]) & (hh < starts[g] + heads[g])

        @pl.when(owns & (j * bk < kv_len))
        def _(k_ref=kv_refs[2 * g], v_ref=kv_refs[2 * g + 1], bk=bk, kv_len=kv_len):
            _step(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, j * bk, kv_len, scale)

    @pl.when(j == num_k_steps - 1)
    def _():
        o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)


def _step(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, key_start, kv_len, scale: float):
    """One online-softmax update with the key block [key_start, key_start + bk)."""
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    bk = k.shape[0]
    # The MXU's default float32 matmul uses bf16 passes; HIGHEST keeps float32 inputs exact.
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    # Masking every block costs a select per score next to the exp; it keeps one code path.
    key_ok = key_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1) < kv_len
    row_ok = key_start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < kv_len
    v = jnp.where(row_ok, v, jnp.zeros_like(v))  # garbage rows could be NaN: 0 * NaN = NaN
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale
    s = jnp.where(key_ok, s, -jnp.inf)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(v.dtype), v, precision=precision,
                                                  preferred_element_type=jnp.float32)
    m_ref[...] = m_new
