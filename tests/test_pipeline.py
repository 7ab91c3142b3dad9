"""The AR loop: schedule values, determinism, one compile per layout, Dummy Forcing against oracles."""

from __future__ import annotations

import numpy as np
import pytest

import jax
from flax import nnx

from dfjax.config import CacheConfig, DummyForcingConfig, SamplingConfig, VideoShape, WanConfig
from dfjax.dummy import NEIGHBOUR, HeadPlan, standard_table
from dfjax.model.transformer import WanDiT
from dfjax.pipeline import Generator, RunConfig
from dfjax.sampling import schedule

CFG = WanConfig.tiny()
# 32x48 pixels -> latent 4x6 -> 6 tokens per frame; 25 frames -> 7 latent frames... use 6 latent frames
VIDEO = VideoShape(height=32, width=48, frames=21)  # 6 latent frames = 3 chunks of 2
SAMPLING = SamplingConfig(chunk_frames=2)


def make_model(seed=0):
    return WanDiT(CFG, nnx.Rngs(seed))


def context(seed=0, batch=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, CFG.text_len, CFG.text_dim))


def test_schedule_matches_reference_values():
    t, s = schedule(SamplingConfig())
    np.testing.assert_allclose(t, [1000.0, 937.5, 833.3333333333, 625.0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(s, [1.0, 0.9375, 0.8333333333, 0.625], rtol=0, atol=1e-9)


def test_same_seed_same_latents_and_one_compile_for_all_chunks():
    run = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla")
    gen = Generator(make_model(), run)
    a = np.asarray(gen.generate(context(), seed=3))
    b = np.asarray(gen.generate(context(), seed=3))
    c = np.asarray(gen.generate(context(), seed=4))
    assert a.shape == (1, 6, 4, 6, CFG.in_channels)
    assert np.array_equal(a, b)  # bit for bit on the same device
    assert not np.allclose(a, c)
    assert gen.stats.trace_counts == {"step0": 1}  # 3 chunks x 2 videos, traced once


def test_a_chunk_is_yielded_before_its_refresh_and_the_last_refresh_is_not_run():
    """Chunk k comes out after its denoising forwards, before the refresh that caches it (a caller queues its decode
    ahead of that), and the last chunk's refresh, which nothing reads, never runs: 2 x 3 - 1 step calls."""
    gen = Generator(make_model(), RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla"))
    calls, run_step = [], gen._run_step
    gen._run_step = lambda *a, clean=None: calls.append("refresh" if clean is not None else "denoise") or run_step(
        *a, clean=clean)
    seen = [(r.index, list(calls)) for r in gen.chunks(gen.text_kv(context()), seed=3)]
    assert seen == [(0, ["denoise"]), (1, ["denoise", "refresh", "denoise"]),
                    (2, ["denoise", "refresh", "denoise", "refresh", "denoise"])]
    assert len(calls) == 5


@pytest.mark.parametrize("on_mesh", [False, True], ids=["unsharded", "mesh-of-one"])
def test_a_second_video_compiles_nothing(on_mesh):
    """Every program of a video (steps, cache init, head permutation, transition) is compiled by the first video
    only; a program rebuilt per video costs its compile again (the 1x1 mesh did so for its cache: +0.1 s).
    The same prompt and seed give the same Dummy Forcing plan (another plan may need other programs)."""
    from dfjax.sharding import MeshConfig

    mesh = MeshConfig(data=1, tensor=1).mesh(jax.devices()[:1]) if on_mesh else None
    run = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla", dummy=DummyForcingConfig(ar_start=1))
    gen = Generator(make_model(), run, mesh=mesh)
    gen.generate(context(), seed=0)
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(gen.generate(context(), seed=0))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # neither an XLA compile nor a program read back from the persistent compilation cache (tests/conftest.py)
    assert not {"/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec"} & set(
        compiles), compiles


def test_online_dummy_forcing_keeps_a_bounded_number_of_plan_steps():
    """Each new plan layout compiles a step; beyond max_plan_steps the least recently used goes (host memory of a
    long many-prompt run), and a plan seen again is compiled again with the same result."""
    run = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla", dummy=DummyForcingConfig(ar_start=1))
    gen = Generator(make_model(), run, max_plan_steps=1)
    layouts, videos = set(), {}
    for seed in range(4):
        videos[seed] = np.asarray(gen.generate(context(seed), seed=seed))
        layouts.add(gen.dummy.layout(gen.stats.last_plan))
        assert gen._plan_steps.cache_info().currsize <= 1 and gen._transitions.cache_info().currsize <= 1
    assert len(layouts) >= 2  # the plans differed, so steps were dropped
    np.testing.assert_array_equal(np.asarray(gen.generate(context(0), seed=0)), videos[0])


def test_each_chunk_step_updates_the_cache_in_place():
    """The cache is donated: the step's input buffers are consumed (no copy of the cache per chunk)."""
    gen = Generator(make_model(), RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla"))
    kv = gen.text_kv(context())
    layout = gen.first_layout
    cache = gen.placement.init_cache(layout, gen.cache_dtype)
    _, new_cache, _ = gen._run_step(layout, None, gen.params, kv, cache, jax.random.PRNGKey(0), 0)
    assert all(x.is_deleted() for x in jax.tree.leaves(cache))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new_cache))


def test_local_cache_runs_and_differs_from_global():
    model = make_model()
    glob = Generator(model, RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla")).generate(context())
    loc = Generator(model, RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla",
                                     cache=CacheConfig(kind="local", sink_frames=0, window_frames=2))).generate(context())
    # the first chunk sees the same keys under both layouts; later chunks do not
    np.testing.assert_allclose(np.asarray(glob[:, :2]), np.asarray(loc[:, :2]), atol=1e-5)  # padded-key sums reorder
    assert not np.allclose(np.asarray(glob[:, 2:]), np.asarray(loc[:, 2:]))


def test_dummy_forcing_with_all_neighbour_full_window_plan_equals_baseline():
    """A plan where every head is a neighbour head with a window over the whole video is the baseline."""
    model = make_model()
    base = Generator(model, RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla")).generate(context())
    plan = HeadPlan.uniform(CFG.num_layers, CFG.num_heads, NEIGHBOUR, standard_table(3, neighbour_sees_frame0=True))
    df = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla",
                   dummy=DummyForcingConfig(ar_start=0, local_context_length=3))
    gen = Generator(model, df, plan=plan)
    out = gen.generate(context())
    np.testing.assert_allclose(np.asarray(out), np.asarray(base), atol=2e-5, rtol=0)


def test_bad_frame_count_and_num_dummy_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        RunConfig(video=VideoShape(height=32, width=48, frames=17), sampling=SAMPLING)
    with pytest.raises(ValueError, match="frames must be"):
        VideoShape(frames=80)
    with pytest.raises(ValueError, match="multiple of 16x16"):
        VideoShape(height=100, width=48)
    run = RunConfig(video=VIDEO, sampling=SAMPLING, dummy=DummyForcingConfig(num_dummy=9))
    with pytest.raises(ValueError, match="num_dummy 9 is out of range"):
        Generator(make_model(), run)
    with pytest.raises(ValueError, match="2 prompt.*batch 1"):
        Generator(make_model(), RunConfig(video=VIDEO, sampling=SAMPLING)).text_kv(context(batch=2))
    run = RunConfig(video=VIDEO, sampling=SAMPLING, dummy=DummyForcingConfig(ar_start=0))
    with pytest.raises(ValueError, match="ar_start=0 has none"):  # online scoring needs a chunk with history
        Generator(make_model(), run)


def test_first_chunk_schedule_applies_to_chunk_zero_only():
    """Causal Forcing++'s first-chunk schedule: chunk 0 is what a run with that schedule makes; the other chunks run
    the ordinary schedule (another compiled step, since the step count differs)."""
    model = make_model()
    two = SamplingConfig(chunk_frames=2, denoising_steps=(1000.0, 500.0))
    first = SamplingConfig(chunk_frames=2, first_chunk_denoising_steps=(1000.0, 500.0))
    gen = Generator(model, RunConfig(video=VIDEO, sampling=first, attn_impl="xla"))
    out = np.asarray(gen.generate(context(), seed=1))
    ref_two = np.asarray(Generator(model, RunConfig(video=VIDEO, sampling=two, attn_impl="xla")).generate(context(), 1))
    ref_four = np.asarray(Generator(model, RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla")).generate(
        context(), seed=1))
    np.testing.assert_allclose(out[:, :2], ref_two[:, :2], atol=1e-6, rtol=0)
    assert not np.allclose(out[:, :2], ref_four[:, :2], atol=1e-3)
    assert not np.allclose(out[:, 2:], ref_two[:, 2:], atol=1e-3)
    assert gen.stats.trace_counts == {"step0": 1, "step1": 1}


def test_long_context_plan_spends_the_baselines_attention_on_the_neighbour_heads():
    """The neighbour window is the longest whole number of chunks whose attention per chunk stays within the
    baseline's (every head seeing `long_context` frames); the plan records it and the run uses it."""
    from dfjax.dummy.forcing import attention_frames, long_context_plan

    cf = SAMPLING.chunk_frames
    run = RunConfig(video=VideoShape(height=32, width=48, frames=45), sampling=SAMPLING, attn_impl="xla",
                    dummy=DummyForcingConfig(ar_start=1, num_dummy=4, long_context=6))
    gen = Generator(make_model(), run)
    gen.generate(context(), seed=0)
    plan = gen.stats.last_plan
    nbr = plan.table[NEIGHBOUR]
    count = sum(row.count(NEIGHBOUR) for row in plan.head_types)
    assert count > 0 and nbr.history_chunks > 1  # longer than local_context_length's 1 chunk
    budget = CFG.num_layers * CFG.num_heads * 6
    assert budget - count * cf < attention_frames(plan, cf) <= budget
    assert long_context_plan(plan, 6, cf) == plan  # sizing is idempotent (a saved profile keeps its window)
    layout = gen.dummy.layout(plan)
    assert max(g.window_frames for layer in layout.layers for g in layer) == (nbr.history_chunks + 1) * cf


def test_lengths_that_cannot_work_are_refused_before_any_work(monkeypatch):
    """Past RoPE's 1024 positions (it would silently repeat the last one), and a global cache larger than memory
    (the fix named: a local window or Dummy Forcing, whose caches do not grow with the video)."""
    from dfjax import pipeline

    long = VideoShape(height=32, width=48, frames=VideoShape.frames_for_latents(1026))
    with pytest.raises(ValueError, match="past the 1024 positions of the model's RoPE tables"):
        Generator(make_model(), RunConfig(video=long, sampling=SAMPLING, attn_impl="xla"))
    monkeypatch.setattr(pipeline, "free_bytes", lambda devices: 10_000)
    with pytest.raises(ValueError, match="needs .* GiB per device.*--cache local.*--dummy-forcing"):
        Generator(make_model(), RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla"))
