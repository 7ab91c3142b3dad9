"""Packed Attention Forward for NVIDIA GPUs: Pallas with the Triton lowering.

One launch covers every head group of a layer. The grid is (query block, head, batch); each
program loads one [block_q, D] query tile and runs an online-softmax loop over its group's keys,
up to that group's valid length only. Keys [kv_len, Lk) are never loaded: the loop stops at the
last block that holds a valid key, and that block (and the ragged query tail) use masked loads,
so K and V are read in place with no padding copies.

Heads are visited longest group first (Lk_g descending), so the last programs of the launch are
the short ones and the tail of the launch is shorter.

Measured on an H100 (benchmarks/results/kernels-h100-2026-11-25.json), bf16: 310 TFLOP/s for
PAF at 480P, 410-435 at 720P/1080P, 1.33-1.49x cuDNN's time per FLOP. At 480P the 444 programs
fill 132 SMs in 3.4 waves (84% at best); one launch beats one launch per group by 14% there.
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
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters (powers of two; Triton needs them).

    The default was the fastest or near it for PAF at 480P/720P/1080P among ten tilings on an
    H100 (benchmarks/results/kernels-sweep-h100-2026-11-25.json); (128, 64, 8, 3) is faster
    for the dense 480P cache (370 vs 300 TFLOP/s), (128, 64, 4, 2) for the 1080P shapes.
    """
    block_q: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3


# float32 tiles take twice the shared memory of bf16 ones; these fit in it with room to spare.
FLOAT32_BLOCK_SIZES = BlockSizes(block_q=64, block_k=32, num_warps=4, num_stages=2)


def paf_attention(q: jax.Array, ks: tuple[jax.Array, ...], vs: tuple[jax.Array, ...],
                  kv_lens: jax.Array, *, block_sizes: BlockSizes | None = None,
                  interpret: bool = False) -> jax.Array:
    """q [B, Lq, H, D]; group g: ks[g], vs[g] [B, Lk_g, H_g, D] with H_g > 0 and sum H_g == H,
    kv_lens[g] (int32, in [1, Lk_g]) valid keys. Returns [B, Lq, H, D] in q.dtype.
    block_sizes: None picks BlockSizes() for 16-bit inputs, FLOAT32_BLOCK_SIZES for float32."""
    if block_sizes is None:
        block_sizes = FLOAT32_BLOCK_SIZES if q.dtype == jnp.float32 else BlockSizes()
    b, lq, h, d = q.shape
    heads = tuple(k.shape[2] for k in ks)
    lengths = tuple(k.shape[1] for k in ks)
    assert sum(heads) == h and min(heads) > 0, (heads, h)
    assert d >= 16 and d & (d - 1) == 0, f"head_dim must be a power of two >= 16, got {d}"
    bq, bk = block_sizes.block_q, block_sizes.block_k

    layout = HeadLayout.longest_first(heads, lengths)

    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, p, bb: (bb, i, layout.real_head(p), 0))
    kv_specs = []
    for g, lk in enumerate(lengths):
        # The whole [Lk_g, D] slab of one head: the kernel walks it with pl.ds.
        spec = pl.BlockSpec((None, lk, None, d),
                            functools.partial(_kv_index_map, layout=layout, g=g))
        kv_specs += [spec, spec]
    precision = None
    if q.dtype == jnp.float32:
        # Triton's default float32 dot is one tf32 pass (~3e-4 error) and its IEEE dot runs on
        # the FMA units at ~1 TFLOP/s; three tf32 passes are float32-accurate on tensor cores.
        # The CPU interpreter has no tf32 and is exact at HIGHEST.
        precision = (lax.Precision.HIGHEST if interpret
                     else lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
    kernel = functools.partial(_kernel, layout=layout, lq=lq, block_k=bk,
                               scale=1.0 / math.sqrt(d), precision=precision)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(lq, bq), h, b),
        in_specs=[pl.no_block_spec, q_spec, *kv_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="paf_attention",
    )(kv_lens.astype(jnp.int32), q, *[x for kv in zip(ks, vs) for x in kv])


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Maps the grid's head index p to groups: group g owns programs
    [prog_start[g], prog_start[g] + heads[g]) and heads [real_start[g], real_start[g] + heads[g])."""
    heads: tuple[int, ...]
    prog_start: tuple[int, ...]
    real_start: tuple[int, ...]

    @classmethod
    def longest_first(cls, heads: tuple[int, ...], lengths: tuple[int, ...]) -> "HeadLayout":
        """Programs visit the group with the most key slots first, so a launch ends on short programs."""
        real_start = tuple(int(x) for x in np.cumsum((0,) + heads[:-1]))
        order = sorted(range(len(heads)), key=lambda g: -lengths[g])
        prog_start = [0] * len(heads)
        for pos, g in enumerate(order):
            prog_start[g] = sum(heads[o] for o in order[:pos])
        return cls(heads, tuple(prog_start), real_start)

    def owns(self, g: int, p):
        return (p >= self.prog_start[g]) & (p < self.prog_start[g] + self.heads[g])

    def group_head(self, g: int, p):
        """p's head within group g's K/V (clamped, so that other groups' programs keep a valid address)."""
        return jnp.clip(p - self.prog_start[g], 0, self.heads[g] - 1)

    def real_head(self, p):
        head = p * 0
        for g in range(len(self.heads)):
            head = jnp.where(self.owns(g, p), p - self.prog_start[g] + self.real_start[g], head)
        return head


def _kv_index_map(i, p, bb, *, layout: HeadLayout, g: int):
    return bb, 0, layout.group_head(g, p), 0


def _kernel(lens_ref, q_ref, *refs, layout: HeadLayout, lq: int, block_k: int, scale: float,
            precision):
    o_ref = refs[-1]
    bq = q_ref.shape[0]
    p = pl.program_id(1)
    rows_ok = (pl.program_id(0) * bq + jnp.arange(bq) < lq)[:, None]
    q = plgpu.load(q_ref, mask=rows_ok, other=0)
    for g in range(len(layout.heads)):
        k_ref, v_ref = refs[2 * g], refs[2 * g + 1]

        @pl.when(layout.owns(g, p))
        def _(k_ref=k_ref, v_ref=v_ref, g=g):
            out = _attend(q, k_ref, v_ref, lens_ref[g], block_k=block_k, scale=scale,
                          precision=precision)
            plgpu.store(o_ref, out.astype(o_ref.dtype), mask=rows_ok)


def _attend(q, k_ref, v_ref, kv_len, *, block_k: int, scale: float, precision):
    """Online softmax of q [bq, D] over the first kv_len rows of k_ref, v_ref [Lk, D]."""
    bq, d = q.shape
    qk_scale = scale * math.log2(math.e)  # exp2 is the fast path; fold log2(e) into the scale

    def step(j, carry, masked: bool):
        acc, m, l = carry
        cols = pl.ds(j * block_k, block_k)
        ok = j * block_k + jnp.arange(block_k) < kv_len
        mask, other = (ok[:, None], 0) if masked else (None, None)
        k = plgpu.load(k_ref.at[cols, :], mask=mask, other=other)
        v = plgpu.load(v_ref.at[cols, :], mask=mask, other=other)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * qk_scale
        if masked:
            s = jnp.where(ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        prob = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(prob, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(prob.astype(v.dtype), v, precision=precision,
                                             preferred_element_type=jnp.float32)
        return acc, m_new, l

    carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    # Full blocks without masks, then at most one ragged block with them.
    full = kv_len // block_k
    carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full, pl.cdiv(kv_len, block_k), functools.partial(step, masked=True),
                          carry)
    acc, _, l = carry
    return acc * (1.0 / l)[:, None]
