"""The causal DiT against diffusers' WanTransformer3DModel (an independent PyTorch implementation).

Tolerance: both sides compute in fp32 on the CPU with the same weights; the differences are
summation order (einsum vs torch matmul, softmax) and the RoPE tables (both float64 angles, fp32
cos/sin). Through 2 blocks with outputs of order 1, that is ~1e-6..1e-5; we allow 1e-4 absolute.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dfjax.cache import AttentionLayout, init_cache  # noqa: E402
from dfjax.config import WanConfig  # noqa: E402
from dfjax.convert.transformer import convert_transformer  # noqa: E402
from dfjax.model.rope import rope_tables  # noqa: E402
from dfjax.model.transformer import ChunkCall, ChunkStep, WanDiT  # noqa: E402
from dfjax.params import assign_params  # noqa: E402
from tests.oracles import diffusers_forward, set_self_attention_mask, tiny_diffusers_transformer  # noqa: E402

TOL = 1e-4
CFG = WanConfig.tiny()
LATENT_HW = (4, 6)  # 2x3 = 6 tokens per frame after the 2x2 patch
TPF = 6


def load_from_diffusers(torch_model) -> WanDiT:
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    model = WanDiT(CFG, nnx.Rngs(0))
    return assign_params(model, convert_transformer(sd, CFG))


@pytest.fixture(scope="module")
def models():
    tm = tiny_diffusers_transformer(CFG)
    return tm, load_from_diffusers(tm)


def to_cfhw(x):  # [B, F, H, W, C] -> [B, C, F, H, W]
    return np.ascontiguousarray(np.transpose(x, (0, 4, 1, 2, 3)))


def run_chunk(model, x, t, context, cache, layout, frame_start, refresh=False):
    kv = model.text_kv(jnp.asarray(context))
    assert cache.layout == layout
    flow, cache, _ = model(jnp.asarray(x), jnp.asarray(t), kv, cache, rope_tables(CFG.head_dim),
                           ChunkStep.at(frame_start, refresh), ChunkCall("xla"))
    return np.asarray(flow), cache


def test_bidirectional_forward_matches_diffusers(models):
    tm, model = models
    rng = np.random.default_rng(0)
    f = 4
    x = rng.standard_normal((2, f, *LATENT_HW, CFG.in_channels)).astype(np.float32)
    t = np.array([[999.0, 937.5, 500.0, 0.0], [10.0, 250.0, 625.0, 833.3]], np.float32)  # per-frame timesteps
    context = rng.standard_normal((2, CFG.text_len, CFG.text_dim)).astype(np.float32)
    layout = AttentionLayout.uniform(CFG.num_layers, CFG.num_heads, 0, f, TPF, f)
    ours, _ = run_chunk(model, x, t, context, init_cache(layout, 2, CFG.head_dim, jnp.float32), layout, 0)
    ref = diffusers_forward(tm, to_cfhw(x), t, context, TPF)
    assert np.abs(to_cfhw(ours) - ref).max() < TOL
    assert np.abs(ref).mean() > 0.1  # the comparison is not between near-zero tensors


def block_causal_mask(num_frames, chunk_frames, sink_frames=None, window_frames=None):
    """Token mask: a chunk sees itself and earlier frames (optionally only sink + the last window)."""
    fq = np.arange(num_frames)[:, None]
    fk = np.arange(num_frames)[None, :]
    end = (fq // chunk_frames + 1) * chunk_frames
    ok = fk < end
    if window_frames is not None:
        ok &= (fk < sink_frames) | (fk >= end - window_frames)
    return np.repeat(np.repeat(ok, TPF, 0), TPF, 1)


@pytest.mark.parametrize("sink,window", [(None, None), (2, 4)])
def test_kv_cached_chunks_match_block_causal_full_forward(models, sink, window):
    """Chunk by chunk with the cache (clean chunks refreshed at t=0) equals one full-prefix forward."""
    tm, model = models
    rng = np.random.default_rng(1)
    cf, n_chunks = 2, 4
    num_frames = cf * n_chunks
    clean = rng.standard_normal((1, num_frames, *LATENT_HW, CFG.in_channels)).astype(np.float32)
    noisy = rng.standard_normal((1, cf, *LATENT_HW, CFG.in_channels)).astype(np.float32)
    context = rng.standard_normal((1, CFG.text_len, CFG.text_dim)).astype(np.float32)
    t_noisy = np.array([[937.5, 833.3]], np.float32)
    if sink is None:
        layout = AttentionLayout.uniform(CFG.num_layers, CFG.num_heads, 0, num_frames, TPF, cf)
    else:
        layout = AttentionLayout.uniform(CFG.num_layers, CFG.num_heads, sink, window, TPF, cf)
    cache = init_cache(layout, 1, CFG.head_dim, jnp.float32)
    # earlier chunks: a noisy forward (written, then overwritten) and the clean refresh
    for c in range(n_chunks - 1):
        sl = slice(c * cf, (c + 1) * cf)
        _, cache = run_chunk(model, noisy, t_noisy, context, cache, layout, c * cf)
        _, cache = run_chunk(model, clean[:, sl], np.zeros((1, cf), np.float32), context, cache, layout, c * cf, True)
    last = (n_chunks - 1) * cf
    ours, _ = run_chunk(model, noisy, t_noisy, context, cache, layout, last)

    full = np.concatenate([clean[:, :last], noisy], axis=1)
    t_full = np.concatenate([np.zeros((1, last), np.float32), t_noisy], axis=1)
    set_self_attention_mask(tm, block_causal_mask(num_frames, cf, sink, window))
    try:
        ref = diffusers_forward(tm, to_cfhw(full), t_full, context, TPF)[:, :, last:]
    finally:
        tm.set_default_attn_processor() if hasattr(tm, "set_default_attn_processor") else None
        for blk in tm.blocks:
            blk.attn1.set_processor(blk.attn1.processor.inner)
    assert np.abs(to_cfhw(ours) - ref).max() < TOL
