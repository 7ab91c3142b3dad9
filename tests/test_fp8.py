"""fp8 (e4m3) linears (dfjax.model.fp8, docs/fp8.md): the quantised matmul within its error bound, an f8 x f8 dot
in the lowered program, a tiny DiT against its unquantised weights, fp8 at load time from a bf16 folder, head
permutation and sharding rules of the scales, and the CLI option.

XLA:CPU runs float8_e4m3fn dots (it widens the operands itself), so nothing here needs a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfjax.cache import AttentionLayout, init_cache
from dfjax.config import WanConfig
from dfjax.model.fp8 import E4M3, E4M3_MAX, fp8_matmul, quantize_activation, quantize_params, quantize_weight
from dfjax.model.rope import rope_tables
from dfjax.model.transformer import ChunkCall, ChunkStep, Linear, WanDiT
from dfjax.params import abstract_params, assign_params, flat_state, to_numpy

# The bound of one fp8 matmul. e4m3 keeps 3 mantissa bits: rounding to nearest, each element's relative error is at
# most u = 2^-4 (the scales map a row's / channel's amax to 448, and none of these Gaussians' elements is small
# enough to land in e4m3's subnormals, 2^-6 * amax / 448 and below, where it could be more). For y = sum_k x_k w_k
# each term becomes x_k w_k (1 + d_k)(1 + e_k) ~ x_k w_k (1 + d_k + e_k), with |d_k|, |e_k| <= u, zero-mean and
# independent, so the error has variance <= 2 u^2 sum_k x_k^2 w_k^2 = 2 u^2 E[y^2] (x, w zero-mean, independent):
# a relative RMS error of at most sqrt(2) u ~ 0.088; the bf16 output rounding adds 2^-9 (relative).
TOL = math.sqrt(2) * 2.0 ** -4 + 2.0 ** -9
TOKENS, DIN, DOUT = 64, 256, 96
ROW_SPAN, COL_SPAN = np.logspace(-3, 3, TOKENS), np.logspace(-2, 2, DOUT)  # token rows 6 decades, channels 4 apart


def operands():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((TOKENS, DIN)) * ROW_SPAN[:, None]).astype(np.float32)
    w = (rng.standard_normal((DIN, DOUT)) * COL_SPAN[None, :] / np.sqrt(DIN)).astype(np.float32)
    return x, w


def rel_rms(y, ref):
    """Relative RMS error with each entry measured in its own row's and column's units (rows and columns span
    decades: a plain norm would see only the largest)."""
    unit = ROW_SPAN[:, None] * COL_SPAN[None, :]
    y, ref = np.asarray(y, np.float64) / unit, np.asarray(ref, np.float64) / unit
    return float(np.sqrt(np.mean((y - ref) ** 2) / np.mean(ref ** 2)))


def scaled_dot(xq, sx, wq_t, sw):
    y = jax.lax.dot_general(xq, wq_t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)
    return y.astype(jnp.float32) * sx * sw


def test_fp8_matmul_is_within_its_rounding_bound_and_wrong_scales_are_not():
    x, w = operands()
    ref = x.astype(np.float64) @ w.astype(np.float64)
    wq, sw = quantize_weight(jnp.asarray(w))
    assert wq.dtype == E4M3 and wq.shape == (DOUT, DIN) and sw.shape == (DOUT,) and sw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(sw), np.abs(w).max(0) / E4M3_MAX, rtol=1e-6)
    xq, sx = quantize_activation(jnp.asarray(x, jnp.bfloat16))
    assert xq.dtype == E4M3 and sx.shape == (TOKENS, 1)
    err = rel_rms(fp8_matmul(jnp.asarray(x), wq, sw, jnp.bfloat16), ref)
    assert err < TOL, (err, TOL)  # measured 0.037
    assert err > 2.0 ** -7  # it did quantise (a bf16 matmul would be ~2^-9)
    # the same dot with wrong scales: one scale for all tokens (the small rows fall into e4m3's subnormals or below
    # its smallest, and vanish: measured 0.38), and the channels' scales reversed (~1600)
    xq1, sx1 = quantize_activation(jnp.asarray(x).reshape(1, -1))
    per_tensor = rel_rms(scaled_dot(xq1.reshape(x.shape), sx1, wq, sw), ref)
    xq, sx = quantize_activation(jnp.asarray(x))
    reversed_channels = rel_rms(scaled_dot(xq, sx, wq, sw[::-1]), ref)
    assert min(per_tensor, reversed_channels) > 3 * TOL, (per_tensor, reversed_channels)
    # zero rows and channels stay zero (scale 1, no NaN)
    y = fp8_matmul(jnp.zeros((2, DIN)), *quantize_weight(jnp.zeros((DIN, 3))), jnp.float32)
    assert np.array_equal(np.asarray(y), np.zeros((2, 3)))


def lowered_dots(lin, dtype):
    graphdef, state = nnx.split(lin)
    text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, jnp.ones((4, 8, 64), dtype)).as_text()
    return [line for line in text.splitlines() if "dot_general" in line]


def test_an_fp8_linear_lowers_to_an_f8_dot():
    cfg = WanConfig.tiny(param_dtype="bfloat16", dtype="bfloat16")
    # the kernel is K-major ([dout, din] = 32x64), as cuBLASLt's fp8 GEMM takes it: no transpose in the program
    f8_operands = re.compile(r"\(tensor<[0-9x]+xf8E4M3FN>, tensor<32x64xf8E4M3FN>\) -> tensor<[0-9x]+xbf16>")
    dots = lowered_dots(Linear(64, 32, cfg, nnx.Rngs(0), fp8=True), jnp.bfloat16)
    assert len(dots) == 1 and f8_operands.search(dots[0]), dots
    dots = lowered_dots(Linear(64, 32, cfg, nnx.Rngs(0)), jnp.bfloat16)
    assert len(dots) == 1 and "f8E4M3FN" not in dots[0], dots


# ---------------------------------------------------------------- the DiT

CFG = WanConfig.tiny()  # fp32 params and compute: the fp8 error is all there is
F, LATENT_HW, TPF = 2, (4, 6), 6


@nnx.jit
def _forward(model, x, t, context):
    cfg = model.cfg
    layout = AttentionLayout.uniform(cfg.num_layers, cfg.num_heads, 0, F, TPF, F)
    flow, _, _ = model(x, t, model.text_kv(context), init_cache(layout, 1, cfg.head_dim, jnp.float32),
                       rope_tables(cfg.head_dim), ChunkStep.at(0), ChunkCall("xla"))
    return flow


def forward(model):
    """The flow of one bidirectional 2-frame forward (an empty cache), fp64 on the host."""
    rng = np.random.default_rng(1)
    cfg = model.cfg
    x = jnp.asarray(rng.standard_normal((1, F, *LATENT_HW, cfg.in_channels)), jnp.float32)
    t = jnp.asarray([[900.0, 400.0]], jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, cfg.text_len, cfg.text_dim)), jnp.float32)
    return np.asarray(_forward(model, x, t, context), np.float64)


def fp8_of(model):
    """The fp8 twin of an unquantised model, through the load path's quantize_params."""
    cfg = dataclasses.replace(model.cfg, fp8=True)
    make = lambda: WanDiT(cfg, nnx.Rngs(0))
    return assign_params(nnx.eval_shape(make), quantize_params(flat_state(model), abstract_params(make)))


def f32(flat):
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def assert_same_params(a, b):
    a, b = f32(flat_state(a)), f32(flat_state(b))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def models():
    ref = WanDiT(CFG, nnx.Rngs(0))
    return ref, fp8_of(ref)


def test_fp8_params_are_the_block_linears_quantised(models):
    ref, fp8 = models
    params = flat_state(fp8)
    quantised = sorted(k for k, v in params.items() if v.dtype == E4M3)
    names = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
             "cross_attn.v", "cross_attn.o", "ffn_in", "ffn_out"]
    assert quantised == sorted(f"blocks.{i}.{n}.kernel_t" for i in range(CFG.num_layers) for n in names)
    assert sorted(k for k in params if k.endswith(".scale")) == sorted(k[:-8] + "scale" for k in quantised)
    assert not any(k[:-2] in params for k in quantised)  # the unquantised kernel is gone
    assert params["head.kernel"].dtype == params["patch_embedding.kernel"].dtype == jnp.float32
    # a random fp8 model (the benchmark's) holds the same weights quantised
    assert_same_params(WanDiT(dataclasses.replace(CFG, fp8=True), nnx.Rngs(0)), fp8)


def test_tiny_dit_in_fp8_stays_close_to_its_unquantised_weights(models):
    ref, fp8 = models
    y_ref, y = forward(ref), forward(fp8)
    err = np.sqrt(np.mean((y - y_ref) ** 2) / np.mean(y_ref ** 2))
    # 16 fp8 matmuls on the path (2 blocks x q/k/v/o self and cross, FFN in and out), each within TOL (above);
    # their errors enter through residual branches, not in series: measured ~0.03, allowed TOL.
    assert err < TOL, err
    other = forward(WanDiT(CFG, nnx.Rngs(1)))  # the same architecture with other weights: the scale of "wrong"
    assert np.sqrt(np.mean((other - y_ref) ** 2) / np.mean(y_ref ** 2)) > 10 * err


def test_head_permutation_moves_the_scales_with_their_columns(models):
    from dfjax.dummy.hma import permute_heads

    ref, fp8 = models
    perm = np.stack([np.random.default_rng(i).permutation(CFG.num_heads) for i in range(CFG.num_layers)])
    ref_p, fp8_p = nnx.clone(ref), nnx.clone(fp8)
    permute_heads(ref_p, perm)
    permute_heads(fp8_p, perm)
    assert_same_params(fp8_p, fp8_of(ref_p))  # quantise, then permute == permute, then quantise


def test_scales_shard_like_their_kernels_output_axis():
    from dfjax.sharding import param_logical_axes

    abstract = abstract_params(lambda: WanDiT(dataclasses.replace(CFG, fp8=True), nnx.Rngs(0)))
    scales = [k for k in abstract if k.endswith(".scale")]
    assert len(scales) == CFG.num_layers * 10
    for key, a in abstract.items():
        assert len(param_logical_axes(key)) == len(a.shape), key
    for key in scales:
        # kernel_t is [dout, din]: its first axis is the output's, as the kernel's last is
        assert param_logical_axes(key) == param_logical_axes(key[:-5] + "kernel_t")[:1], key
        assert param_logical_axes(key[:-5] + "kernel_t") == param_logical_axes(key[:-5] + "kernel")[::-1], key


# ---------------------------------------------------------------- loading and the option

def test_a_bf16_folder_loads_in_fp8(tmp_path):
    from dfjax.model_io import write_model_folder
    from dfjax.t2v import load_transformer

    cfg = WanConfig.tiny(param_dtype="bfloat16", dtype="bfloat16")
    ref = WanDiT(cfg, nnx.Rngs(0))
    stored = to_numpy(flat_state(ref))
    old = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items() if k != "fp8"}
    write_model_folder(tmp_path / "old", {"transformer": old}, {"transformer": stored})  # a folder from before fp8
    assert not load_transformer(tmp_path / "old").cfg.fp8
    model = load_transformer(tmp_path / "old", fp8=True)
    assert model.cfg.fp8 and model.blocks[0].ffn_in.kernel_t[...].dtype == E4M3
    assert_same_params(model, fp8_of(ref))
    write_model_folder(tmp_path / "fp8", {"transformer": {**old, "fp8": True}}, {"transformer": stored})
    assert_same_params(load_transformer(tmp_path / "fp8"), model)  # the folder's choice
    assert_same_params(load_transformer(tmp_path / "fp8", fp8=False), ref)  # overridden
    meta = json.loads((tmp_path / "fp8" / "config.json").read_text())
    with pytest.raises(ValueError, match="fp8 must be true or false"):
        WanConfig(**{**meta["transformer"], "patch": (1, 2, 2), "fp8": "yes"})


def test_the_cli_option_overrides_the_folder():
    from dfjax.api import OptionError, Options
    from dfjax.cli import build_parser, linears, options

    for argv, want in (([], None), (["--fp8"], True), (["--no-fp8"], False)):
        for command in ("generate", "calibrate", "serve"):
            extra = ["--prompts", "p.txt", "--out", "p.json"] if command == "calibrate" else []
            a = build_parser().parse_args([command, *extra, *argv])
            if command == "calibrate":  # as cmd_calibrate sets them
                a.dummy_forcing, a.profile, a.stream = True, None, False
            assert a.fp8 is want and options(a).fp8 is want
    meta = {"transformer": {"fp8": True, "dtype": "float32"}}
    assert linears(Options(), meta).startswith("fp8 e4m3") and linears(Options(fp8=False), meta) == "float32"
    assert linears(Options(fp8=True), {"transformer": {}}).startswith("fp8 e4m3")
    with pytest.raises(OptionError, match="fp8 must be True, False or None"):
        Options(fp8="yes")
