"""Stream batch (dfjax.stream): the pipelined ticks equal a plain chunk-by-chunk, step-by-step loop with one
cache per denoising step; the prefill is the sequential loop's; Dummy Forcing streams with its plan.
(On several devices: tests/test_sharding.py.)"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dfjax.cache import init_cache
from dfjax.config import DummyForcingConfig, SamplingConfig, VideoShape
from dfjax.dummy import NEIGHBOUR, HeadPlan, standard_table
from dfjax.model.rope import rope_tables
from dfjax.model.transformer import ChunkCall, ChunkStep
from dfjax.pipeline import Generator, RunConfig, base_layout
from dfjax.sampling import schedule
from tests.test_pipeline import CFG, context, make_model

VIDEO = VideoShape(height=32, width=48, frames=45)  # 12 latent frames = 6 chunks of 2: the pipeline fills and drains
SAMPLING = SamplingConfig(chunk_frames=2)  # 4 denoising steps
RUN = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla")
STREAM = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla", stream=True)


def noise(key, chunk, step, shape):
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, chunk), step), shape, jnp.float32)


def reference_stream(model, ctx, seed):
    """Chunk 0 as Self Forcing (4 steps on an empty cache, then the clean refresh at t=0); then every step s
    has its own copy of that cache, and chunk c's step s attends to it and writes its noisy K/V there."""
    cf, n = SAMPLING.chunk_frames, len(SAMPLING.denoising_steps)
    t, sig = (np.asarray(a, np.float32) for a in schedule(SAMPLING))
    nxt = np.append(sig[1:], 0.0)
    h, w = VIDEO.latent_hw
    shape = (1, cf, h, w, CFG.in_channels)
    layout = base_layout(CFG, RUN)
    rope = rope_tables(CFG.head_dim, CFG.rope_max_pos, CFG.rope_theta)
    kv = model.text_kv(ctx)
    key = jax.random.PRNGKey(seed)
    tt = lambda v: jnp.full((1, cf), v, jnp.float32)
    cache = init_cache(layout, 1, CFG.head_dim, jnp.float32)
    x = noise(key, 0, 0, shape)
    xla = ChunkCall("xla")
    for s in range(n):
        flow, cache, _ = model(x, tt(t[s]), kv, cache, rope, ChunkStep.at(0), xla)
        x0 = x - sig[s] * flow
        x = (1 - nxt[s]) * x0 + nxt[s] * noise(key, 0, s + 1, shape)
    _, cache, _ = model(x0, tt(0.0), kv, cache, rope, ChunkStep.at(0, is_refresh=True), xla)
    out, caches = [x0], [cache] * n
    for c in range(1, RUN.num_chunks):
        x = noise(key, c, 0, shape)
        for s in range(n):
            flow, caches[s], _ = model(x, tt(t[s]), kv, caches[s], rope, ChunkStep.at(c * cf, is_refresh=True), xla)
            x0 = x - sig[s] * flow
            x = (1 - nxt[s]) * x0 + nxt[s] * noise(key, c, s + 1, shape)
        out.append(x0)
    return np.concatenate([np.asarray(o) for o in out], axis=1)


def test_stream_ticks_equal_the_chunk_by_chunk_loop_with_a_cache_per_step():
    model = make_model()
    gen = Generator(model, STREAM)
    out = np.asarray(gen.generate(context(), seed=2))
    ref = reference_stream(model, context(), seed=2)
    assert out.shape == ref.shape == (1, 12, 4, 6, CFG.in_channels)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # fp32; only the summation order may differ
    seq = np.asarray(Generator(model, RUN).generate(context(), seed=2))
    assert np.array_equal(out[:, :2], seq[:, :2])  # the prefill is the sequential loop's first chunk, bit for bit
    assert not np.allclose(out[:, 2:], seq[:, 2:], atol=1e-3)  # a different sampler after it
    # a second video reuses the compiled tick; the same seed gives the same video
    compile_s = gen.stats.compile_s
    assert np.array_equal(np.asarray(gen.generate(context(), seed=2)), out)
    assert gen.stats.compile_s == compile_s


def test_stream_chunks_come_out_in_order_one_per_tick():
    gen = Generator(make_model(), STREAM)
    idx = [r.index for r in gen.chunks(gen.text_kv(context()), seed=0)]
    assert idx == list(range(RUN.num_chunks))
    assert gen.prefill_chunks == 1


def test_dummy_forcing_streams_after_its_plan_is_fixed():
    """Prefill = chunks 0..ar_start of the sequential Dummy Forcing loop; with a plan whose heads are all neighbour
    heads over the whole video, the stream after it equals the baseline's stream."""
    model = make_model()
    plan = HeadPlan.uniform(CFG.num_layers, CFG.num_heads, NEIGHBOUR, standard_table(6, neighbour_sees_frame0=True))
    df = DummyForcingConfig(ar_start=0, local_context_length=6)
    out = Generator(model, RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla", dummy=df, stream=True),
                    plan=plan).generate(context(), seed=1)
    base = Generator(model, STREAM).generate(context(), seed=1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(base), atol=2e-5, rtol=0)

    online = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla", dummy=DummyForcingConfig(ar_start=2),
                       stream=True)
    gen = Generator(model, online)
    streamed = np.asarray(gen.generate(context(), seed=1))
    seq = np.asarray(Generator(model, online.__class__(**{**online.__dict__, "stream": False}),
                               plan=gen.stats.last_plan).generate(context(), seed=1))
    assert gen.prefill_chunks == 3
    np.testing.assert_allclose(streamed[:, :6], seq[:, :6], atol=2e-5, rtol=0)  # chunks 0..ar_start: sequential
    assert np.all(np.isfinite(streamed)) and not np.allclose(streamed[:, 6:], seq[:, 6:], atol=1e-3)


def test_stream_steps_must_split_over_the_group():
    from dfjax.stream import StreamRunner

    with pytest.raises(ValueError, match="4 denoising steps over the group's 3 devices; choose a group of \\[1, 2, 4\\]"):
        StreamRunner(None, type("M", (), {"shape": {"tensor": 3, "data": 1}})(), 4, (1,), None, None, "xla", "float32",
                     6)
