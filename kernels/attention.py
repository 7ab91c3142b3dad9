"""Attention for the KV-cached DiT: head groups with their own key lengths (Dummy Forcing's PAF).

One call serves a whole self-attention layer. Heads are split into contiguous groups; group g
attends to its own keys k_g, v_g [B, Lk_g, H_g, D], of which the first kv_len_g are valid (the
cache may hold more slots than are filled yet). Every query sees every valid key of its group
(no causal mask: inside a chunk attention is bidirectional, and the cache only holds the past).

    grouped_attention(q, ((k_sink, v_sink, None), (k_nbr, v_nbr, None)))   # PAF, two groups
    attention(q, k_cache, v_cache, kv_len)                                  # dense baseline

Implementations (KERNELS, the one registry: every caller resolves a name through resolve_impl): "xla" (the
plain-jnp reference below), "cudnn" (one cuDNN call per group), "pallas" (one kernel launch for all groups: paf_gpu
on GPU, paf_tpu on TPU) and "auto".
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal

import jax
import jax.numpy as jnp
from jax import lax

from dfjax.kernels import paf_gpu, paf_mgpu, paf_tpu

Group = tuple[jax.Array, jax.Array, jax.Array | None]
Impl = Literal["auto", "xla", "cudnn", "pallas"]


def grouped_attention(q: jax.Array, groups: tuple[Group, ...], *, impl: Impl = "auto",
                      interpret: bool = False) -> jax.Array:
    """Softmax attention of q [B, Lq, H, D] (heads ordered group by group) over per-group keys.

    groups: (k, v, kv_len) per group, k and v [B, Lk_g, H_g, D] with sum(H_g) == H. kv_len is
    None (all Lk_g keys valid) or an int32 scalar (traced is fine) in [1, Lk_g]: keys
    [kv_len, Lk_g) are ignored; the pallas kernels also skip their blocks. Larger values are
    clamped to Lk_g. Groups with H_g == 0 are skipped.
    Scale 1/sqrt(D), softmax in float32, output [B, Lq, H, D] in q.dtype.
    impl: a name of KERNELS or "auto" (see resolve_impl); interpret=True runs a Pallas kernel's semantics on CPU.
    """
    groups = _checked_groups(q, groups)
    return KERNELS[resolve_impl(impl, q.dtype, interpret=interpret)].run(q, groups, interpret)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array | None = None, *,
              impl: Impl = "auto", interpret: bool = False) -> jax.Array:
    """Dense attention with a dynamic number of valid keys: one group of all heads."""
    return grouped_attention(q, ((k, v, kv_len),), impl=impl, interpret=interpret)


def reference_attention(q: jax.Array, groups: tuple[Group, ...]) -> jax.Array:
    """Plain-jnp attention with an exact (not online) softmax: the oracle for the kernels.

    Scores, softmax and the value product all run in float32 at HIGHEST precision, so the only
    rounding is float32's (and bf16 inputs enter exactly). Memory: B*H_g*Lq*Lk_g float32 scores.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs, head = [], 0
    for k, v, kv_len in groups:
        h = k.shape[2]
        if h == 0:
            continue
        qg = q[:, :, head:head + h].astype(jnp.float32)
        head += h
        s = jnp.einsum("bqhd,bkhd->bhqk", qg, k.astype(jnp.float32),
                       precision=lax.Precision.HIGHEST) * scale
        if kv_len is not None:
            s = jnp.where(jnp.arange(k.shape[1]) < kv_len, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        outs.append(jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32),
                               precision=lax.Precision.HIGHEST))
    return jnp.concatenate(outs, axis=2).astype(q.dtype)


def _cudnn_attention(q: jax.Array, groups: tuple[Group, ...]) -> jax.Array:
    """One cuDNN flash-attention call per group; kv_len becomes cuDNN's padding mask."""
    outs, head = [], 0
    for k, v, kv_len in groups:
        h = k.shape[2]
        lengths = None if kv_len is None else jnp.full((q.shape[0],), kv_len, jnp.int32)
        outs.append(jax.nn.dot_product_attention(
            q[:, :, head:head + h], k, v, key_value_seq_lengths=lengths, implementation="cudnn"))
        head += h
    return jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]


def _pallas_attention(q: jax.Array, groups: tuple[Group, ...], interpret: bool) -> jax.Array:
    ks = tuple(k for k, _, _ in groups)
    vs = tuple(v for _, v, _ in groups)
    kernel = _shared_jit(_pallas_kernel(q, ks, interpret).paf_attention)
    return kernel(q, ks, vs, _kv_lens(groups), interpret=interpret)


@functools.cache
def _shared_jit(kernel_fn):
    """The kernel under its own jit. XLA lowers and compiles a Pallas kernel once per call site (about 3 s each for
    the Mosaic GPU one), but a nested jit's calls of one signature share a single lowering and compile: the 30
    layers' identical cross-attention calls, and self-attention layers with the same head split, compile once."""
    return jax.jit(kernel_fn, static_argnames="interpret")


def _pallas_kernel(q: jax.Array, ks: tuple[jax.Array, ...], interpret: bool):
    """The Pallas PAF kernel for this backend and input: paf_tpu on TPU; on a Hopper GPU paf_mgpu (Mosaic GPU,
    wgmma) for the 16-bit inputs it takes; paf_gpu (Triton) for the rest, and in interpret mode on CPU (paf_mgpu's
    own interpret mode is tested directly: it is far slower)."""
    if _platform() == "tpu":
        return paf_tpu
    lengths = (q.shape[1], *(k.shape[1] for k in ks))
    if not interpret and paf_mgpu.supports(q.dtype, q.shape[-1], lengths) and _is_hopper():
        return paf_mgpu
    return paf_gpu


def _is_hopper() -> bool:
    """sm90: wgmma exists there only (Blackwell has tcgen05 instead)."""
    return getattr(jax.devices()[0], "compute_capability", None) == "9.0"


# ---------------------------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Kernel:
    """One attention implementation and what it needs."""

    run: Callable[[jax.Array, tuple[Group, ...], bool], jax.Array]  # (q, groups, interpret) -> out
    platforms: tuple[str, ...]  # backends it compiles for (a Pallas kernel also runs anywhere in interpret mode)
    half_only: bool  # bf16/f16 inputs only
    partitionable: bool  # GSPMD can split it over a mesh's devices (a Pallas custom call cannot be split)


KERNELS: dict[str, Kernel] = {
    "xla": Kernel(lambda q, groups, _: reference_attention(q, groups), ("cpu", "gpu", "tpu"), False, True),
    "cudnn": Kernel(lambda q, groups, _: _cudnn_attention(q, groups), ("gpu",), True, True),
    "pallas": Kernel(_pallas_attention, ("gpu", "tpu"), False, False),
}
IMPLS = ("auto", *KERNELS)  # every name a user may give (the CLI's choices)

# Which kernel "auto" takes for bf16/f16 on NVIDIA GPUs: cuDNN. It is 1.3-1.5x faster than the Triton kernel at
# every real shape (kernels-*h100-2026-11-25.json). On Hopper the Mosaic GPU kernel beats it at 480P (0.87x the time;
# 1.8 % of a video's diffusion) but not at 720P or 1080P, and adds ~28 s of compile (kernels-*h200-2026-12-03.json,
# docs/performance.md).
AUTO_GPU_IMPL = "cudnn"


def resolve_impl(impl: str, dtype, *, platform: str | None = None, partitioned: bool = False,
                 interpret: bool = False) -> str:
    """The kernel that runs for `impl` on `platform` (default: JAX's default backend).

    partitioned: the program is split over several devices by GSPMD (a mesh, outside shard_map), which cannot
    split a Pallas custom call (it would gather every input, KV caches included, onto each device): "auto" then
    takes the fastest partitionable kernel and an explicit "pallas" is refused. Otherwise "auto" is Pallas on
    TPU; on GPU Pallas for float32 (cuDNN has no float32 flash attention), else AUTO_GPU_IMPL; XLA elsewhere.
    An explicit name is checked against the platform and dtype, so a bad choice fails before any compile.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}.")
    platform = platform or _platform()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "auto":
        if partitioned:
            return "cudnn" if platform == "gpu" and half else "xla"
        if platform == "tpu":
            return "pallas"
        if platform == "gpu":
            return AUTO_GPU_IMPL if half else "pallas"
        return "xla"
    kernel = KERNELS[impl]
    if partitioned and not kernel.partitionable:
        raise ValueError(f"attn_impl {impl!r} is not partitioned across a mesh of several devices (its inputs would "
                         "be gathered onto every device); use 'auto', 'cudnn' or 'xla', or data-parallel replicas "
                         "with tensor=1.")
    if platform not in kernel.platforms and not (interpret and impl == "pallas"):
        fix = "; pass interpret=True to run it on CPU" if impl == "pallas" else ""
        raise ValueError(f"attn_impl {impl!r} needs one of {kernel.platforms} (backend is {platform!r}){fix}.")
    if kernel.half_only and not half:
        raise ValueError(f"attn_impl {impl!r} takes bfloat16/float16 only, not {jnp.dtype(dtype).name}.")
    return impl


def _platform() -> str:
    """The backend that picks the kernel: "gpu", "tpu" or "cpu" (one seam for the tests)."""
    return jax.default_backend()


def _checked_groups(q: jax.Array, groups) -> tuple[Group, ...]:
    """Validates shapes and drops empty groups (H_g == 0)."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Lq, H, D], got shape {q.shape}")
    b, _, h, d = q.shape
    kept, total = [], 0
    for k, v, kv_len in groups:
        if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != d:
            raise ValueError(f"k and v must be [B={b}, Lk, H_g, D={d}], got {k.shape}, {v.shape}")
        if kv_len is not None and jnp.shape(kv_len) != ():
            raise ValueError(f"kv_len must be a scalar, got shape {jnp.shape(kv_len)}")
        total += k.shape[2]
        if k.shape[2] > 0:
            kept.append((k, v, kv_len))
    if total != h or not kept:
        raise ValueError(f"group heads sum to {total}, q has {h} heads (at least one needed)")
    return tuple(kept)


def _kv_lens(groups: tuple[Group, ...]) -> jax.Array:
    """int32 [G] valid key counts, clamped to each group's length so that no kernel reads past it."""
    return jnp.stack([
        jnp.int32(k.shape[1]) if kv_len is None
        else jnp.minimum(jnp.asarray(kv_len, jnp.int32), k.shape[1])
        for k, _, kv_len in groups])
