"""The built-in demo model: its synthetic data, its training forward, and the shipped trained folder."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from dfjax.synthetic import (COLOURS, SHAPES, VOCABULARY, SyntheticConfig, clip_spec, colour_fractions, make_batch,
                             make_clip, make_dataset, prompt_colours, to_uint8)

SMALL = SyntheticConfig(height=32, width=32, frames=21)


# ---------------------------------------------------------------- data

def test_clips_are_a_function_of_seed_and_index():
    a, b = make_clip(7, seed=3), make_clip(7, seed=3)
    assert a.prompt == b.prompt and np.array_equal(a.frames, b.frames)
    assert a.frames.shape == (57, 64, 64, 3) and a.frames.dtype == np.float32
    assert -1.0 <= a.frames.min() and a.frames.max() <= 1.0
    assert not np.array_equal(make_clip(7, seed=4).frames, a.frames)
    assert not np.array_equal(make_clip(8, seed=3).frames, a.frames)
    # the same clip whatever the batch or the worker split
    videos, prompts = make_batch([5, 7], seed=3)
    assert prompts[1] == a.prompt and np.array_equal(videos[1], a.frames)
    u8, p8 = make_dataset(70, seed=3, cfg=SMALL, workers=2)
    v1, p1 = make_batch(range(70), seed=3, cfg=SMALL)
    assert p8 == p1 and np.array_equal(u8, to_uint8(v1))


def test_prompts_describe_the_clip():
    for i in range(60):
        clip = make_clip(i, seed=0, cfg=SMALL)
        first = clip.objects[0]
        words = clip.prompt.replace(",", " ").split()
        assert set(words) <= set(VOCABULARY), clip.prompt
        assert clip.prompt.startswith(f"a {first['colour']} {first['shape']} moves ")
        assert first["shape"] in SHAPES and first["colour"] in COLOURS
        if len(clip.objects) == 2:
            second = clip.objects[1]
            appear = int(np.argmax(second["visible"]))
            assert f"a {second['colour']} {second['shape']} appears" in clip.prompt
            assert not second["visible"][:appear].any() and second["visible"][appear:].all()
        if "leaves the frame" in clip.prompt:
            assert not first["visible"].all()
        # the named colours are in the pixels, in about the area the shapes cover
        fr = colour_fractions(to_uint8(clip.frames))
        assert fr["background"] > 0.5
        assert all(fr[c] > 0.005 for c in prompt_colours(clip.prompt) if c == first["colour"])


def test_motion_needs_history():
    """Shapes keep their velocity between events, and every clip moves: a frame follows from the frames before it
    (position and velocity), not from the prompt alone, which names the direction but not the speed (the start
    side follows the prompt, jittered by a few pixels)."""
    same_velocity, speeds = [], set()
    for i in range(40):
        clip = clip_spec(i, seed=0)
        step = np.diff(clip.objects[0]["pos"], axis=0)
        speed = np.median(np.linalg.norm(step, axis=1))
        assert speed > 0.5
        speeds.add(round(float(speed), 2))
        same_velocity.append(np.mean(np.all(np.abs(step[1:] - step[:-1]) < 1e-4, axis=1)))
    assert np.mean(same_velocity) > 0.8
    assert len(speeds) >= 35  # the speed is drawn per clip, not named by the prompt


# ---------------------------------------------------------------- the DiT's training forward

def test_block_causal_attention_equals_the_masked_softmax():
    from dfjax.train_demo import block_causal_attention, teacher_forcing_mask

    frames, cf, tpf = 6, 2, 3
    mask = teacher_forcing_mask(frames, cf, tpf)
    n = 2 * frames * tpf
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, n, 3, 8)) for i in range(3))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    p = jax.nn.softmax(jnp.where(jnp.asarray(mask), s, -jnp.inf), -1)
    ref = jnp.einsum("bhqk,bkhd->bqhd", p, v)
    np.testing.assert_allclose(np.asarray(block_causal_attention(q, k, v, cf * tpf)), np.asarray(ref), atol=2e-6)
    # clean chunk 1 sees clean chunks 0, 1; noisy chunk 1 sees clean chunk 0 and itself
    row_clean1, row_noisy1 = cf * tpf, frames * tpf + cf * tpf
    assert mask[row_clean1, :2 * cf * tpf].all() and not mask[row_clean1, 2 * cf * tpf:].any()
    assert mask[row_noisy1, :cf * tpf].all() and not mask[row_noisy1, cf * tpf:frames * tpf].any()
    assert mask[row_noisy1, row_noisy1:row_noisy1 + cf * tpf].all()


def test_teacher_forcing_forward_equals_the_kv_cached_loop():
    """One training forward over [clean ; noisy] = the AR loop's refresh forwards of the clean chunks, then the noisy
    chunk, through WanDiT.__call__ and its KV cache (so the trained weights are right for dfjax.pipeline)."""
    from dfjax.cache import AttentionLayout, init_cache
    from dfjax.config import WanConfig
    from dfjax.model.rope import rope_tables
    from dfjax.model.transformer import ChunkCall, ChunkStep, WanDiT
    from dfjax.train_demo import teacher_forcing_flow

    cfg = WanConfig.tiny(num_layers=2)
    model = WanDiT(cfg, nnx.Rngs(0))
    for i, blk in enumerate(model.blocks):  # non-zero modulation, so that per-frame timesteps matter
        blk.modulation.set_value(0.1 * jax.random.normal(jax.random.PRNGKey(10 + i), blk.modulation.shape))
    model.head_modulation.set_value(0.1 * jax.random.normal(jax.random.PRNGKey(1), model.head_modulation.shape))
    cf, nf, h, w = 2, 6, 4, 6
    tpf = (h // 2) * (w // 2)
    rng = np.random.default_rng(0)
    x0, xt = (jnp.asarray(rng.standard_normal((1, nf, h, w, cfg.in_channels)), jnp.float32) for _ in range(2))
    t = jnp.asarray(np.repeat(rng.uniform(0, 1000, (1, nf // cf)), cf, 1), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, cfg.text_len, cfg.text_dim)), jnp.float32)
    rope = rope_tables(cfg.head_dim)
    ours = np.asarray(teacher_forcing_flow(model, x0, xt, t, ctx, rope, cf))
    layout = AttentionLayout.uniform(cfg.num_layers, cfg.num_heads, 0, nf, tpf, cf)
    kv = model.text_kv(ctx)
    ref = []
    for c in range(nf // cf):
        cache = init_cache(layout, 1, cfg.head_dim, jnp.float32)
        for p in range(c):
            sl = slice(p * cf, (p + 1) * cf)
            _, cache, _ = model(x0[:, sl], jnp.zeros((1, cf)), kv, cache, rope, ChunkStep.at(p * cf, True),
                                ChunkCall("xla"))
        sl = slice(c * cf, (c + 1) * cf)
        out = model(xt[:, sl], t[:, sl], kv, cache, rope, ChunkStep.at(c * cf), ChunkCall("xla"))[0]
        ref.append(np.asarray(out))
    ref = np.concatenate(ref, axis=1)
    assert np.abs(ours - ref).max() < 1e-4
    assert np.abs(ref).mean() > 0.1


def test_cpu_friendly_convs_compute_the_same_vae():
    from dfjax.model.vae import WanVAE, WanVAEConfig
    from dfjax.train_demo import cpu_friendly_convs

    cfg = WanVAEConfig.tiny(base_dim=4, num_res_blocks=1)
    vae = WanVAE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 5, 16, 16, 3)) * 2 - 1

    def run(x):
        mu, _ = vae.encoder(x)
        return vae.decoder(mu, vae.decoder.init_cache(1, mu.shape[2], mu.shape[3]))[0]

    ref = np.asarray(jax.jit(run)(x))  # jitted: op by op it took 30 s
    with cpu_friendly_convs():  # traced inside: the patched convolutions
        got = np.asarray(jax.jit(run)(x))
    # fp32, summed in another order through ~20 convolutions: jax 0.11.2's CPU convs differ by up to 1.4e-5 (3.5e-5
    # relative) on outputs of ~0.4, jax 0.10.2's by less than 1e-5
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the shipped model

@pytest.fixture(scope="module")
def demo():
    from dfjax.demo import PACKAGED, demo_model_folder, is_trained

    if not (PACKAGED / "config.json").is_file():
        pytest.skip("the trained demo model is not shipped yet (dfjax/assets/demo; issue 6): `dfjax train-demo`")
    folder = demo_model_folder()
    assert is_trained(folder)
    from dfjax.t2v import VideoModel

    return folder, VideoModel.load(folder)


def test_demo_model_folder_has_what_the_cli_reads(demo):
    from dfjax.config import SamplingConfig, config_from_dict
    from dfjax.demo import DEMO_DEFAULTS
    from dfjax.model_io import read_config

    folder, model = demo
    meta = read_config(folder)
    assert meta["defaults"] == DEMO_DEFAULTS
    sampling = config_from_dict(SamplingConfig, meta["sampling"])
    assert sampling.chunk_frames == 3
    assert meta["transformer"]["in_channels"] == meta["vae"]["z_dim"]
    assert meta["training"]["dit"]["steps"] > 100
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 16 * 2 ** 20


def test_demo_model_draws_the_named_shape(demo):
    """The trained model's frames are not noise: mostly background, and the colour the prompt names is there."""
    from dfjax.config import SamplingConfig, VideoShape, config_from_dict
    from dfjax.demo import DEMO_DEFAULTS
    from dfjax.model.vae import decode
    from dfjax.model_io import read_config
    from dfjax.pipeline import Generator, RunConfig

    folder, model = demo
    sampling = config_from_dict(SamplingConfig, read_config(folder)["sampling"])
    video = VideoShape(DEMO_DEFAULTS["height"], DEMO_DEFAULTS["width"], DEMO_DEFAULTS["frames"])
    gen = Generator(model.dit, RunConfig(video=video, sampling=sampling, attn_impl="xla"), batch=2)
    prompts = ["a red square moves left", "a blue circle moves up, then bounces"]
    ctx = model.text(prompts)
    lat = gen.generate(ctx, seed=0)
    assert lat.shape == (2, 9, 8, 8, model.dit.cfg.in_channels)
    vg, vs = nnx.split(model.vae)
    px = to_uint8(np.asarray(decode(vg, vs, lat)))
    assert px.shape == (2, 33, 64, 64, 3)
    for video, prompt, other in zip(px, prompts, ["blue", "red"]):
        fr = colour_fractions(video)
        assert fr["unmatched"] < 0.2, (prompt, fr)
        assert fr["background"] > 0.6, (prompt, fr)
        named = prompt_colours(prompt)[0]
        assert fr[named] > 0.01, (prompt, fr)
        assert fr[named] > 3 * fr[other], (prompt, fr)  # the prompt's colour, not another one
    # the check can fail: pure noise latents decode to (almost) bare background, with neither colour drawn
    noise = jax.random.normal(jax.random.PRNGKey(0), lat.shape[1:])[None]
    fr = colour_fractions(to_uint8(np.asarray(decode(vg, vs, noise))))
    assert fr["red"] < 0.01 and fr["blue"] < 0.01, fr
