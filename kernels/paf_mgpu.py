"""Packed Attention Forward for Hopper GPUs: Pallas with the Mosaic GPU lowering (wgmma and TMA).

One launch covers every head group of a layer, as in paf_gpu, but each CTA is warp-specialised the
way FlashAttention-3 is: three warpgroups, two of which compute (block_q query rows each, 2 * block_q
per CTA) while the third only issues TMA copies of the next K/V blocks into a ring of `stages` shared
memory buffers. Barriers say when a buffer is full (TMA done) and when both compute warpgroups are
done with it; a third barrier takes turns between the two compute warpgroups, so that one runs its
softmax while the other has the tensor cores.

Lengths: group g's loop runs cdiv(kv_len_g, block_kv) blocks, a traced count, and masks the keys
[kv_len_g, ...) of the last one. Blocks and query tiles that reach past the end of an array are read
by TMA with zeros filled in and written with the rows past the end dropped, so nothing is padded.
Head order, as in paf_gpu: the longest group's CTAs first.

Needs an sm90 GPU (wgmma) and 16-bit inputs with head_dim a multiple of 64. On CPU it runs in Mosaic
GPU's interpret mode (a simulation of the warpgroups, shared memory and barriers; slow, for tests).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dfjax.kernels.paf_gpu import HeadLayout

COMPUTE_WARPGROUPS = 2
INTERPRETABLE = hasattr(plgpu, "InterpretGPUParams")  # see _interpret_params


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles: block_q rows per compute warpgroup, block_kv keys per step, `stages` K/V buffers.

    (64, 192, 2) was the fastest of five tilings on an H200 at 480P and 1080P (64 x 128 with 3 stages at 720P,
    by 1 %): `kernel_bench.py --sweep`, benchmarks/results/kernels-sweep-h200-2026-12-03.json. There the kernel
    takes 0.87x cuDNN's time on a 480P Dummy Forcing layer, even at 720P, 1.06x at 1080P.
    """
    block_q: int = 64
    block_kv: int = 192
    stages: int = 2


def supports(dtype, head_dim: int, lengths: tuple[int, ...]) -> bool:
    """Whether this kernel takes these inputs: wgmma wants 16-bit operands and 64-wide swizzled tiles, and TMA
    copies (8, 64) tiles, so the query and key lengths must be multiples of 8 (every Wan resolution's are)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 64 == 0
            and all(n % 8 == 0 for n in lengths))


def paf_attention(q: jax.Array, ks: tuple[jax.Array, ...], vs: tuple[jax.Array, ...],
                  kv_lens: jax.Array, *, config: Config = Config(), interpret: bool = False) -> jax.Array:
    """Same contract as paf_gpu.paf_attention: q [B, Lq, H, D]; group g ks[g], vs[g] [B, Lk_g, H_g, D];
    kv_lens[g] (int32, in [1, Lk_g]) valid keys. Returns [B, Lq, H, D] in q.dtype."""
    b, lq, h, d = q.shape
    if not supports(q.dtype, d, (lq, *(k.shape[1] for k in ks))):
        raise ValueError(f"the Mosaic GPU PAF kernel takes bf16/f16, head_dim a multiple of 64 and query and key "
                         f"lengths multiples of 8; got {q.dtype}, head_dim {d}, Lq {lq}, Lk "
                         f"{[k.shape[1] for k in ks]}. Use the Triton kernel (paf_gpu) instead.")
    heads = tuple(k.shape[2] for k in ks)
    layout = HeadLayout.longest_first(heads, tuple(k.shape[1] for k in ks))
    bq, bkv, stages = config.block_q, config.block_kv, config.stages
    dtype = q.dtype  # the kernel body must not close over the traced q itself
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def entry(lens_ref, q_ref, *refs):
        kv_refs, out_ref = refs[:-1], refs[-1]
        pl.run_scoped(
            lambda *scratch: _cta(lens_ref, q_ref, kv_refs, out_ref, scratch, layout=layout, config=config,
                                  scale=1.0 / math.sqrt(d)),
            (plgpu.SMEM((COMPUTE_WARPGROUPS, bq, d), dtype, transforms=tiles),  # q in, out back
             plgpu.SMEM((stages, bkv, d), dtype, transforms=tiles),
             plgpu.SMEM((stages, bkv, d), dtype, transforms=tiles),
             # The interpreter's wgmma reads its left operand from shared memory only; on the GPU the
             # probabilities stay in registers.
             plgpu.SMEM((COMPUTE_WARPGROUPS, bq, bkv), dtype, transforms=tiles) if interpret else None),
            (plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),  # q tile landed
             plgpu.Barrier(num_barriers=stages),  # K buffer full
             plgpu.Barrier(num_barriers=stages)),  # V buffer full
            (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),  # K buffer free
             plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages)),  # V buffer free
            plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),  # the compute warpgroups' turns
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(pl.cdiv(lq, COMPUTE_WARPGROUPS * bq), h, b),
        grid_names=("q_tile", "head", "batch"),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params() if interpret else None,
    )(kv_lens.astype(jnp.int32), q, *[x for kv in zip(ks, vs) for x in kv])


def _cta(lens_ref, q_ref, kv_refs, out_ref, scratch, *, layout: HeadLayout, config: Config, scale: float):
    """One CTA: query tile `q_tile` of grid head p; p's group (its K/V refs and length) is static per branch."""
    p, wg = lax.axis_index("head"), lax.axis_index("wg")
    for g in range(len(layout.heads)):
        @pl.when(layout.owns(g, p))
        def _(g=g):
            _group_cta(lens_ref[g], q_ref, kv_refs[2 * g], kv_refs[2 * g + 1], out_ref, scratch, wg=wg,
                       head=layout.real_head(p), kv_head=layout.group_head(g, p), config=config, scale=scale)


def _group_cta(kv_len, q_ref, k_ref, v_ref, out_ref, scratch, *, wg, head, kv_head, config: Config, scale: float):
    (qo_smem2, k_smem, v_smem, p_smem2), (q_full, k_full, v_full), (k_free, v_free), turn = scratch
    bq, bkv, stages = config.block_q, config.block_kv, config.stages
    batch = lax.axis_index("batch")
    steps = pl.cdiv(kv_len, jnp.int32(bkv))
    unmasked_steps = lax.div(kv_len, jnp.int32(bkv))

    def take_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        qo_smem = qo_smem2.at[wg]
        rows = pl.ds(lax.axis_index("q_tile") * (COMPUTE_WARPGROUPS * bq) + wg * bq, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], qo_smem, q_full.at[wg])
        plgpu.barrier_wait(q_full.at[wg])
        qk_scale = scale * math.log2(math.e)  # exp2 is the fast path; fold log2(e) into the scale
        # The loop carries start in the layout wgmma gives them.
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
        l = plgpu.layout_cast(jnp.full((bq,), 0, jnp.float32), row_layout)
        acc = plgpu.layout_cast(jnp.full((bq, qo_smem.shape[-1]), 0, jnp.float32), plgpu.Layout.WGMMA)
        plgpu.barrier_wait(k_full.at[0])  # kv_len >= 1: there is always a first block
        pl.when(wg == 1)(take_turn)  # warpgroup 0 has the tensor cores first

        def step(j, carry, masked: bool):
            acc, m, l = carry
            slot = lax.rem(j, jnp.int32(stages))

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                take_turn()  # hand the tensor cores over while this product finishes
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                cols = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(cols + j * bkv < kv_len, s, -jnp.inf)
            # m is kept in scaled units, so that the exponent s * scale - m is one multiply-add per score
            # (the softmax's ALU work, not the tensor cores, bounds this loop).
            m_new = jnp.maximum(m, s.max(axis=1) * qk_scale)
            alpha = jnp.exp2(m - m_new)
            prob = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + prob.sum(axis=1)
            prob16 = prob.astype(qo_smem.dtype)
            # Keep the softmax before the barriers: the scheduler would otherwise sink it past them.
            acc, l, m_new, prob16 = lax.optimization_barrier((acc, l, m_new, prob16))
            plgpu.barrier_arrive(turn)  # softmax done
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_wait(turn)  # the tensor cores are ours again

            if p_smem2 is not None:
                p_smem2.at[wg][...] = prob16
                plgpu.commit_smem()

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, prob16 if p_smem2 is None else p_smem2.at[wg], v_smem.at[slot])
                nxt = j + 1

                @pl.when(nxt < steps)
                def _():
                    plgpu.barrier_wait(k_full.at[lax.rem(nxt, jnp.int32(stages))])

            if p_smem2 is None:  # the GPU: wgmma accumulates into the rescaled acc in place
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            else:  # the interpreter has no run_state: a fresh accumulator, then the same sum
                def fresh(acc_ref):
                    pv(acc_ref)
                    return acc_ref[...]
                acc = acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        carry = lax.fori_loop(0, unmasked_steps, lambda j, c: step(j, c, masked=False), (acc, m, l))
        acc, m, l = lax.fori_loop(unmasked_steps, steps, lambda j, c: step(j, c, masked=True), carry)
        pl.when(wg == 0)(take_turn)  # match warpgroup 1's first turn
        acc = acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])
        qo_smem[...] = acc.astype(qo_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def load(j, slot, wait_free: bool):
            keys = (batch, pl.ds(j * bkv, bkv), kv_head)
            for ref, smem, full, free in ((k_ref, k_smem, k_full, k_free), (v_ref, v_smem, v_full, v_free)):
                if wait_free:  # both compute warpgroups are done with the block this buffer held
                    plgpu.barrier_wait(free.at[slot])
                plgpu.copy_gmem_to_smem(ref.at[keys], smem.at[slot], full.at[slot])

        @pl.loop(0, jnp.minimum(steps, stages))
        def _(j):
            load(j, j, wait_free=False)

        @pl.loop(stages, steps)
        def _(j):
            load(j, lax.rem(j, jnp.int32(stages)), wait_free=True)

        # Observe the last blocks' releases too, so that every barrier ends its life fully waited for.
        @pl.loop(jnp.maximum(steps - stages, 0), steps)
        def _(j):
            plgpu.barrier_wait(k_free.at[lax.rem(j, jnp.int32(stages))])
            plgpu.barrier_wait(v_free.at[lax.rem(j, jnp.int32(stages))])


def _interpret_params():
    """Mosaic GPU's interpret mode, public since jax 0.11 (jax 0.10's cannot run this kernel: it has no rule for
    layout_cast and no transposed wgmma operands)."""
    if not INTERPRETABLE:
        raise NotImplementedError(f"paf_mgpu's interpret mode needs jax >= 0.11 (this is jax {jax.__version__}).")
    return plgpu.InterpretGPUParams()
