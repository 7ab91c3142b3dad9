"""fp8 (e4m3) linear layers: per-output-channel weight scales, per-token dynamic activation scales (docs/fp8.md).

A kernel w [din, dout] is stored transposed, as q_t = (w / s_w).T [dout, din] in float8_e4m3fn, with
s_w [dout] = amax over din / 448 (fp32). Transposed because cuBLASLt's fp8 GEMM takes both operands K-major: a
[din, dout] kernel is transposed by the program at every call, and that made each fp8 Linear about half as fast
as the bf16 one on an H200, while the GEMM on a [dout, din] kernel runs 1.6-1.7x faster than bf16's
(benchmarks/fp8_gemm.py --parts). At call time each token's activation row x [din] is quantised the same way
(s_x = row amax / 448, computed in fp32), the two fp8 operands go into one dot_general that accumulates in fp32
and writes the compute dtype, and the product is rescaled by outer(s_x, s_w):
x @ w ~= (q_x @ q_t.T) * s_x[:, None] * s_w[None, :].

Everything here is a pure function of arrays; the model (dfjax.model.transformer.Linear) decides where it is used.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn (it has no infinities: an overflow would be NaN, hence the clip)


def _scale_and_cast(x, amax):
    """(x / s clipped to +-448, in e4m3; s = amax / 448, fp32), with s = 1 where amax is 0 (an all-zero row)."""
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    return jnp.clip(x / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3), scale


def quantize_weight(kernel) -> tuple[jax.Array, jax.Array]:
    """kernel [din, dout] -> (float8_e4m3fn kernel_t [dout, din], float32 scale [dout]): the kernel transposed
    (K-major), one scale per output channel."""
    w_t = kernel.astype(jnp.float32).T
    q_t, scale = _scale_and_cast(w_t, jnp.max(jnp.abs(w_t), axis=1, keepdims=True))
    return q_t, scale[:, 0]


def quantize_activation(x) -> tuple[jax.Array, jax.Array]:
    """x [..., din] -> (float8_e4m3fn [..., din], float32 scale [..., 1]): one scale per token (row), in fp32."""
    xf = x.astype(jnp.float32)
    return _scale_and_cast(xf, jnp.max(jnp.abs(xf), axis=-1, keepdims=True))


def fp8_matmul(x, kernel_t, kernel_scale, out_dtype=jnp.bfloat16):
    """x [..., din] (any float dtype) @ a quantised kernel (quantize_weight's pair) -> [..., dout] in out_dtype.

    The matmul itself has two float8_e4m3fn operands (an fp8 GEMM where the device has one; XLA:CPU widens them);
    it accumulates in fp32 and writes out_dtype, then the outer product of the scales is applied in fp32.
    """
    xq, sx = quantize_activation(x)
    y = jax.lax.dot_general(xq, kernel_t, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)
    return (y.astype(jnp.float32) * sx * kernel_scale).astype(out_dtype)


def quantize_params(flat: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
    """A flat parameter dict (dfjax.params keys) of an unquantised model -> the one of its fp8 version.

    `like` is the fp8 model's own parameter spec (dfjax.params.abstract_params): every "<name>.scale" it has, beside
    a float8_e4m3fn "<name>.kernel_t", is made with it from flat's "<name>.kernel" (quantize_weight), which is
    dropped; every other parameter passes through (assign_params casts it). A dict that holds the scales already is
    returned as it is.
    """
    quantize = jax.jit(quantize_weight)
    out = dict(flat)
    for key in like:
        if not key.endswith(".scale") or key in flat:
            continue
        name = key[: -len("scale")]
        if name + "kernel_t" not in like or jnp.dtype(like[name + "kernel_t"].dtype) != jnp.dtype(E4M3):
            raise ValueError(f"parameter {key}: a scale without a float8_e4m3fn {name}kernel_t beside it.")
        if name + "kernel" not in flat:
            raise ValueError(f"parameter {name}kernel is missing: nothing to quantise for {key}.")
        out[name + "kernel_t"], out[key] = quantize(out.pop(name + "kernel"))
    return out
