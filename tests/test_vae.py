"""The Wan2.1 VAE against diffusers' AutoencoderKLWan (fp32, tiny random config), its converters and streaming.

Parity tolerance: atol 2e-5 on outputs of magnitude ~1 in fp32. Both sides compute the same ~40 convs in
fp32 with different summation orders (XLA vs oneDNN conv algorithms, one batched chunk vs one frame at a
time), and rounding differences of ~1e-7 per op grow through the residual stack (measured: 6e-6 for the
decoder, 5e-7 for the encoder).
"""

from __future__ import annotations

import dataclasses
import re

import diffusers  # the parity oracle (the "test" extra): a missing oracle fails, it does not skip
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dfjax.convert.common import ConversionError
from dfjax.convert.vae import convert_vae, infer_vae_config, read_vae_checkpoint
from dfjax.model.vae import AttentionBlock, WanDecoder, WanVAE, WanVAEConfig, decode, decode_chunk, encode, init_decoder_cache
from dfjax.params import assign_params, flat_state

ATOL = 2e-5
CFG = WanVAEConfig.tiny()
LATENT = (5, 4, 6)  # latent frames, height, width -> 17 frames of 32 x 48


@pytest.fixture(scope="module")
def hf_vae():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=CFG.base_dim, z_dim=CFG.z_dim).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a mixed-up gamma or bias shows
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def hf_folder(hf_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_vae")
    hf_vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_sd(hf_vae):
    return {k: v.numpy() for k, v in hf_vae.state_dict().items()}


@pytest.fixture(scope="module")
def model(hf_folder):
    vae = nnx.eval_shape(lambda: WanVAE(CFG, rngs=nnx.Rngs(0)))  # no random init: every parameter is loaded
    assign_params(vae, convert_vae(hf_folder, CFG))
    return nnx.split(vae)


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(0).standard_normal((1, *LATENT, CFG.z_dim)).astype(np.float32)


def _torch(x_ndhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_ndhwc.transpose(0, 4, 1, 2, 3)))


def _ndhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 4, 1)


def to_wan_names(sd: dict) -> dict:
    """diffusers AutoencoderKLWan keys -> the Wan release's, written from the release's module layout
    (num_res_blocks 2, four stages); test_wan_pth checks it against diffusers' own converter."""
    out = {}
    for key, value in sd.items():
        k = key
        if ".resnets." in k or k.startswith("encoder.down_blocks."):
            for new, old in (("residual.0", "norm1"), ("residual.2", "conv1"), ("residual.3", "norm2"),
                             ("residual.6", "conv2"), ("shortcut", "conv_shortcut")):
                k = re.sub(rf"\.{old}\.(\w+)$", rf".{new}.\1", k)
        k = re.sub(r"^quant_conv\.", "conv1.", k)
        k = re.sub(r"^post_quant_conv\.", "conv2.", k)
        k = re.sub(r"^(\w+)\.conv_in\.", r"\1.conv1.", k)
        k = re.sub(r"^(\w+)\.norm_out\.", r"\1.head.0.", k)
        k = re.sub(r"^(\w+)\.conv_out\.", r"\1.head.2.", k)
        k = re.sub(r"^(\w+)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.middle.{2 * int(m[2])}.", k)
        k = re.sub(r"^(\w+)\.mid_block\.attentions\.0\.", r"\1.middle.1.", k)
        k = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.", k)
        out[k] = value
    return out


# ---------------------------------------------------------------- config

def test_config_validation():
    assert WanVAEConfig(dim_mult=[1, 2, 4, 4]) == WanVAEConfig()  # lists from JSON become tuples
    assert hash(WanVAEConfig.wan21()) and CFG.num_frames(21) == 81
    for bad in (dict(z_dim=0), dict(dim_mult=(1,)), dict(temporal_downsample=(True,)),
                dict(latents_std=(1.0,) * 15 + (0.0,)), dict(z_dim=8), dict(dtype="float16")):
        with pytest.raises(ValueError):
            WanVAEConfig(**bad)


# ---------------------------------------------------------------- conversion

def test_infer_config_from_diffusers_folder(hf_folder, hf_sd):
    sd, hf = read_vae_checkpoint(hf_folder)
    assert hf is not None and sorted(sd) == sorted(hf_sd)
    assert infer_vae_config(sd, hf, param_dtype="float32", dtype="float32") == CFG
    assert infer_vae_config(to_wan_names(sd), param_dtype="float32", dtype="float32") == CFG


def test_wan_pth_converts_to_the_same_params(hf_sd, hf_folder, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    wan_sd = to_wan_names(hf_sd)
    back = convert_wan_vae_to_diffusers(wan_sd)  # the renaming really is the inverse of diffusers' map
    assert sorted(back) == sorted(hf_sd) and all(back[k] is hf_sd[k] for k in hf_sd)
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({k: torch.from_numpy(v) for k, v in wan_sd.items()}, path)
    from_pth, from_hf = convert_vae(path), convert_vae(hf_folder)
    assert sorted(from_pth) == sorted(from_hf)
    for k in from_hf:
        np.testing.assert_array_equal(from_pth[k], from_hf[k], err_msg=k)


def test_decoder_only(hf_sd):
    full = convert_vae(hf_sd)
    decoder_sd = {k: v for k, v in hf_sd.items() if not k.startswith(("encoder.", "quant_conv."))}
    assert infer_vae_config(decoder_sd).with_encoder is False
    only = convert_vae(decoder_sd)
    assert sorted(only) == sorted(k for k in full if k.startswith("decoder."))
    # An explicit decode-only config drops a full checkpoint's encoder, in either layout.
    cfg = dataclasses.replace(CFG, with_encoder=False)
    assert sorted(convert_vae(hf_sd, cfg)) == sorted(only)
    assert sorted(convert_vae(to_wan_names(hf_sd), cfg)) == sorted(only)


def test_wan21_preset_has_the_release_shapes():
    with torch.device("meta"):  # shapes only: diffusers' default AutoencoderKLWan is the Wan2.1 VAE
        full = diffusers.AutoencoderKLWan()
    sd = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in full.state_dict().items()}
    assert infer_vae_config(sd) == WanVAEConfig.wan21()
    flat = convert_vae(to_wan_names(sd), WanVAEConfig.wan21())
    assert sum(v.size for v in flat.values()) == sum(v.numel() for v in full.parameters())


@pytest.mark.parametrize(
    "break_it, named",
    [
        (lambda sd: sd.pop("decoder.up_blocks.1.resnets.0.conv_shortcut.bias"), "decoder.up_blocks.1.resnets.0.shortcut.bias"),
        (lambda sd: sd.update({"decoder.conv_out.weight": sd["decoder.conv_out.weight"][:2]}), "decoder.conv_out.weight"),
        (lambda sd: sd.update({"decoder.mid_block.attentions.1.proj.bias": sd["decoder.conv_in.bias"]}),
         "decoder.mid_block.attentions.1.proj.bias"),
        (lambda sd: sd.pop("decoder.conv_in.weight"), "decoder.conv_in.weight"),
    ],
    ids=["missing", "misshaped", "unexpected", "not-a-vae"],
)
def test_malformed_checkpoint_names_the_key(hf_sd, break_it, named):
    sd = dict(hf_sd)
    break_it(sd)
    with pytest.raises(ConversionError, match=re.escape(named)):
        convert_vae(sd, CFG)


# ---------------------------------------------------------------- decoder

# split: the mid block's queries in 5 blocks (the last padded), or one latent frame per decoder pass
@pytest.mark.parametrize("split", [None, "queries", "frames"])
def test_decode_matches_diffusers(hf_vae, model, latents, split, monkeypatch):
    if split == "queries":
        monkeypatch.setattr(AttentionBlock, "max_logits", 700)
    if split == "frames":
        monkeypatch.setattr(WanDecoder, "max_elements", 1000)
        assert nnx.merge(*model).decoder.frames_per_pass(*LATENT[1:]) == 1
    decode.clear_cache()  # both are read at trace time
    raw = latents * np.asarray(CFG.latents_std, np.float32) + np.asarray(CFG.latents_mean, np.float32)
    with torch.no_grad():
        want = _ndhwc(hf_vae.decode(_torch(raw)).sample)  # diffusers decodes un-normalised latents
    got = np.asarray(decode(*model, jnp.asarray(latents)))
    assert got.shape == want.shape == (1, CFG.num_frames(LATENT[0]), 32, 48, 3)
    assert np.mean(np.abs(want) < 1) > 0.5  # mostly unclamped, so the comparison sees the network
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    decode.clear_cache()


@pytest.mark.parametrize("chunks", [(1, 1, 1, 1, 1), (2, 3)])
def test_streaming_equals_whole_video(model, latents, chunks):
    whole = np.asarray(decode(*model, jnp.asarray(latents)))
    cache = init_decoder_cache(CFG, 1, *LATENT[1:])
    start, pieces = 0, []
    for t in chunks:
        pixels, cache = decode_chunk(*model, jnp.asarray(latents[:, start : start + t]), cache)
        assert pixels.shape[1] == (CFG.num_frames(t) if start == 0 else 4 * t)
        pieces.append(np.asarray(pixels))
        start += t
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, rtol=0, atol=ATOL)


def test_decode_chunk_compiles_twice_and_donates_the_cache(model):
    decode_chunk.clear_cache()
    z = jax.random.normal(jax.random.key(0), (1, 6, *LATENT[1:], CFG.z_dim))
    cache = init_decoder_cache(CFG, 1, *LATENT[1:])
    for start in (0, 2, 4):  # 3 chunks of 2 latent frames
        old = cache
        _, cache = decode_chunk(*model, z[:, start : start + 2], cache)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))
    assert decode_chunk._cache_size() == 2


@pytest.mark.parametrize("n", [1, 2, 3, 21])
def test_frame_count(model, n):
    out = jax.eval_shape(lambda z: decode(*model, z), jax.ShapeDtypeStruct((2, n, 4, 6, CFG.z_dim), jnp.float32))
    assert out.shape == (2, 4 * n - 3, 32, 48, 3)


def test_latents_must_fit_the_cache(model, latents):
    cache = init_decoder_cache(CFG, 1, 4, 8)
    with pytest.raises(ValueError, match="init_decoder_cache"):
        decode_chunk(*model, jnp.asarray(latents), cache)


def test_bf16_decode_keeps_the_cache_layout(model, latents):
    graphdef, state = model
    cfg = dataclasses.replace(CFG, param_dtype="bfloat16", dtype="bfloat16")
    vae = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    assign_params(vae, flat_state(state))  # the fp32 parameters, cast to bf16
    cache = init_decoder_cache(cfg, 1, *LATENT[1:])
    layout = jax.tree.map(lambda a: (a.shape, a.dtype), cache.frames)
    pixels, cache = decode_chunk(*nnx.split(vae), jnp.asarray(latents[:, :3]), cache)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), cache.frames) == layout  # donated buffers get reused
    assert pixels.dtype == jnp.bfloat16
    ref = np.asarray(decode(graphdef, state, jnp.asarray(latents[:, :3])))
    # bf16 keeps ~3 significant digits; through ~40 layers the largest difference is ~0.05.
    np.testing.assert_allclose(np.asarray(pixels, np.float32), ref, rtol=0, atol=0.1)


# ---------------------------------------------------------------- encoder

def test_encode_matches_diffusers(hf_vae, model):
    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 9, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():
        dist = hf_vae.encode(_torch(pixels)).latent_dist
    mu, logvar = encode(*model, jnp.asarray(pixels))
    std, mean = np.asarray(CFG.latents_std, np.float32), np.asarray(CFG.latents_mean, np.float32)
    assert mu.shape == (1, 3, 4, 6, CFG.z_dim)
    np.testing.assert_allclose(np.asarray(mu) * std + mean, _ndhwc(dist.mean), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(logvar) + 2 * np.log(std), _ndhwc(dist.logvar), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        encode(*model, jnp.asarray(pixels[:, :8]))



@pytest.mark.parametrize("one_late", [True, False])
def test_decode_chunks_hands_out_each_chunk_once_in_order_one_late_or_at_once(one_late):
    from dfjax.t2v import decode_chunks
    from dfjax.video import to_uint8

    rng = np.random.default_rng(1)
    latents = [jnp.asarray(rng.uniform(-1.2, 1.2, (1, 2, 4, 4, 3)).astype(np.float32)) for _ in range(4)]
    asked = []

    def made():
        for k, z in enumerate(latents):
            asked.append(k)
            yield z, k

    decode = lambda z, cache: (z * 0.9, cache + 1)  # stands in for the VAE: pixels, and a cache it threads
    out = []
    for k, frames in decode_chunks(made(), decode, 0, one_late):
        assert asked[-1] == (min(k + 1, 3) if one_late and k else k)  # when chunk k is handed out (0: at once)
        out.append((k, frames))
    assert [k for k, _ in out] == [0, 1, 2, 3]
    for (k, frames), z in zip(out, latents):  # the device conversion equals the host one
        np.testing.assert_array_equal(frames, to_uint8(np.asarray(z * 0.9)[0]))
