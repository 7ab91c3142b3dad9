"""Wan2.1 VAE checkpoints -> dfjax flat parameters (dfjax.model.vae.WanVAE).

Two source layouts, told apart by their keys:
- "wan": the release's Wan2.1_VAE.pth. decoder.conv1, decoder.middle.{0,1,2}, decoder.upsamples.N (one flat
  list: per up block, num_res_blocks + 1 residual blocks, then its resampler), decoder.head.{0,2}; the
  encoder likewise (encoder.downsamples.N: num_res_blocks residual blocks, then a resampler); top-level conv1 /
  conv2 are the quant / post-quant convs. Residual blocks hold residual.{0,2,3,6} and shortcut.
- "diffusers": AutoencoderKLWan (diffusion_pytorch_model.safetensors + config.json). conv_in, mid_block,
  up_blocks.i.resnets.j, up_blocks.i.upsamplers.0, norm_out, conv_out, quant_conv, post_quant_conv; its encoder
  keeps the release's flat indices as down_blocks.N.

A checkpoint without encoder.* keys converts to a decode-only model (with_encoder=False).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np
from flax import nnx

from dfjax.convert.common import ConversionError, Rule, apply_key_map, conv2d, conv3d, identity, read_state_dict
from dfjax.model.vae import WanVAE, WanVAEConfig
from dfjax.params import abstract_params

FORMATS = ("wan", "diffusers")


def _vector(w: np.ndarray) -> np.ndarray:
    """RMS_norm gamma, (C, 1, 1[, 1]) -> (C,)."""
    return w.reshape(-1)


# Leaf names of each kind of submodule: (source suffix, dfjax suffix, transform), per format.
_CONV3D = [("weight", "kernel", conv3d), ("bias", "bias", identity)]
_CONV2D = [("weight", "kernel", conv2d), ("bias", "bias", identity)]
_NORM = [("gamma", "gamma", _vector)]
_ATTN = [("norm.gamma", "norm.gamma", _vector)] + [
    (f"{m}.{s}", f"{m}.{d}", t) for m in ("to_qkv", "proj") for s, d, t in _CONV2D
]
_RES = {
    "wan": {"residual.0": ("norm1", _NORM), "residual.2": ("conv1", _CONV3D), "residual.3": ("norm2", _NORM),
            "residual.6": ("conv2", _CONV3D), "shortcut": ("shortcut", _CONV3D)},
    "diffusers": {"norm1": ("norm1", _NORM), "conv1": ("conv1", _CONV3D), "norm2": ("norm2", _NORM),
                  "conv2": ("conv2", _CONV3D), "conv_shortcut": ("shortcut", _CONV3D)},
}  # fmt: skip
_LEAVES = {"conv3d": _CONV3D, "conv2d": _CONV2D, "norm": _NORM, "attn": _ATTN}


def _submodules(cfg: WanVAEConfig, fmt: str) -> list[tuple[str, str, str]]:
    """(source prefix, dfjax prefix, kind) of every parameterised submodule of the model `cfg` describes."""
    wan = fmt == "wan"
    R, n = cfg.num_res_blocks, len(cfg.dim_mult)
    out = [("conv2" if wan else "post_quant_conv", "decoder.post_quant_conv", "conv3d")]
    for side in ("decoder", "encoder") if cfg.with_encoder else ("decoder",):
        out.append((f"{side}.conv1" if wan else f"{side}.conv_in", f"{side}.conv_in", "conv3d"))
        mid = f"{side}.middle" if wan else f"{side}.mid_block"
        out += [
            (f"{mid}.0" if wan else f"{mid}.resnets.0", f"{side}.mid_block.resnets.0", "res"),
            (f"{mid}.1" if wan else f"{mid}.attentions.0", f"{side}.mid_block.attention", "attn"),
            (f"{mid}.2" if wan else f"{mid}.resnets.1", f"{side}.mid_block.resnets.1", "res"),
            (f"{side}.head.0" if wan else f"{side}.norm_out", f"{side}.norm_out", "norm"),
            (f"{side}.head.2" if wan else f"{side}.conv_out", f"{side}.conv_out", "conv3d"),
        ]
    for i in range(n):  # decoder up block i: R + 1 residual blocks, then (not the last) an upsampler
        first = i * (R + 2)  # its index in the release's flat decoder.upsamples
        for j in range(R + 1):
            src = f"decoder.upsamples.{first + j}" if wan else f"decoder.up_blocks.{i}.resnets.{j}"
            out.append((src, f"decoder.up_blocks.{i}.resnets.{j}", "res"))
        if i < n - 1:
            src = f"decoder.upsamples.{first + R + 1}" if wan else f"decoder.up_blocks.{i}.upsamplers.0"
            out += [(f"{src}.resample.1", f"decoder.up_blocks.{i}.upsampler.conv", "conv2d"),
                    (f"{src}.time_conv", f"decoder.up_blocks.{i}.upsampler.time_conv", "conv3d")]
    if cfg.with_encoder:
        out.append(("conv1" if wan else "quant_conv", "encoder.quant_conv", "conv3d"))
        for i in range(n):  # encoder stage i: R residual blocks, then (not the last) a downsampler
            first = i * (R + 1)  # both formats keep the release's flat index
            block = "encoder.downsamples" if wan else "encoder.down_blocks"
            for j in range(R):
                out.append((f"{block}.{first + j}", f"encoder.down_blocks.{i}.resnets.{j}", "res"))
            if i < n - 1:
                out += [(f"{block}.{first + R}.resample.1", f"encoder.down_blocks.{i}.downsampler.conv", "conv2d"),
                        (f"{block}.{first + R}.time_conv", f"encoder.down_blocks.{i}.downsampler.time_conv", "conv3d")]
    return out


def vae_rules(cfg: WanVAEConfig, fmt: str) -> list[Rule]:
    """The exact key map of one format. Rules that match no key (a 2D upsampler's time_conv, a residual block
    without shortcut) are harmless: apply_key_map checks the result against the model's own keys."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown VAE format {fmt!r}; one of {FORMATS}.")
    rules = []
    for src, dst, kind in _submodules(cfg, fmt):
        parts = _RES[fmt].items() if kind == "res" else [("", ("", _LEAVES[kind]))]
        for sub_src, (sub_dst, leaves) in parts:
            for leaf_src, leaf_dst, transform in leaves:
                s = ".".join(p for p in (src, sub_src, leaf_src) if p)
                d = ".".join(p for p in (dst, sub_dst, leaf_dst) if p)
                rules.append(Rule(re.escape(s), d, transform))
    return rules


def detect_format(sd: Mapping[str, object]) -> str:
    if "decoder.conv1.weight" in sd:
        return "wan"
    if "decoder.conv_in.weight" in sd:
        return "diffusers"
    raise ConversionError(
        "not a Wan2.1 VAE checkpoint: it has neither 'decoder.conv1.weight' (the Wan release) nor "
        f"'decoder.conv_in.weight' (diffusers AutoencoderKLWan); keys look like {sorted(sd)[:5]}."
    )


def _indices(sd, pattern: str) -> list[int]:
    rx = re.compile(pattern + r"\Z")
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def _shape(sd, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"VAE checkpoint: key '{key}' is missing.")
    return tuple(sd[key].shape)


def infer_vae_config(sd: Mapping[str, object], hf_config: Mapping | None = None, **overrides) -> WanVAEConfig:
    """The architecture from the checkpoint's keys and shapes; latent mean/std from a diffusers config.json
    (`hf_config`) when given, else Wan2.1's. `overrides` set the other fields (dtypes, with_encoder)."""
    fmt = detect_format(sd)
    if fmt == "wan":
        resamplers = _indices(sd, r"decoder\.upsamples\.(\d+)\.resample\.1\.weight")
        n = len(resamplers) + 1
        R = len(_indices(sd, r"decoder\.upsamples\.(\d+)\.residual\.2\.weight")) // n - 1
        block_conv1 = lambda i: f"decoder.upsamples.{i * (R + 2)}.residual.2.weight"  # noqa: E731
        time_conv = lambda i: f"decoder.upsamples.{i * (R + 2) + R + 1}.time_conv.weight"  # noqa: E731
        post_quant = "conv2.weight"
    else:
        n = len(_indices(sd, r"decoder\.up_blocks\.(\d+)\.resnets\.0\.conv1\.weight"))
        R = len(_indices(sd, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.conv1\.weight")) - 1
        block_conv1 = lambda i: f"decoder.up_blocks.{i}.resnets.0.conv1.weight"  # noqa: E731
        time_conv = lambda i: f"decoder.up_blocks.{i}.upsamplers.0.time_conv.weight"  # noqa: E731
        post_quant = "post_quant_conv.weight"
    if n < 2 or R < 1:
        raise ConversionError(f"VAE checkpoint ({fmt}): cannot find the decoder's up blocks and residual blocks.")
    widths = [_shape(sd, block_conv1(i))[0] for i in range(n)]  # base_dim * dim_mult, reversed
    # dim_mult[0] is 1 in Wan VAEs; the decoder only sees the products, and a wrong guess for the encoder
    # fails the shape check of the conversion.
    base = widths[-1]
    if any(w % base for w in widths):
        raise ConversionError(f"VAE checkpoint: decoder block widths {widths} are not multiples of the last, {base}.")
    arch = dict(
        z_dim=_shape(sd, post_quant)[0],
        base_dim=base,
        dim_mult=tuple(w // base for w in reversed(widths)),
        num_res_blocks=R,
        temporal_downsample=tuple(time_conv(i) in sd for i in range(n - 1))[::-1],
    )
    extra = {"with_encoder": any(k.startswith("encoder.") for k in sd)}
    if hf_config is not None:
        _check_hf_config(hf_config, arch)
        extra.update(latents_mean=hf_config.get("latents_mean", WanVAEConfig.latents_mean),
                     latents_std=hf_config.get("latents_std", WanVAEConfig.latents_std))
    return WanVAEConfig(**{**arch, **extra, **overrides})


def _check_hf_config(hf: Mapping, arch: dict) -> None:
    if hf.get("is_residual") or hf.get("patch_size") is not None:
        raise ConversionError("this is a Wan2.2 VAE (is_residual / patch_size); dfjax supports the Wan2.1 VAE only.")
    names = {"z_dim": "z_dim", "base_dim": "base_dim", "dim_mult": "dim_mult", "num_res_blocks": "num_res_blocks",
             "temperal_downsample": "temporal_downsample"}
    for hf_name, name in names.items():
        said = tuple(hf[hf_name]) if isinstance(hf.get(hf_name), list) else hf.get(hf_name)
        if hf_name in hf and said != arch[name]:
            raise ConversionError(f"config.json says {hf_name}={hf[hf_name]!r}, but the weights have {arch[name]!r}.")


def read_vae_checkpoint(src: str | Path) -> tuple[dict[str, np.ndarray], dict | None]:
    """(state dict, diffusers config.json or None) of a .pth/.safetensors file or a diffusers folder."""
    src = Path(src)
    hf = None
    if (src / "config.json").is_file():
        try:
            hf = json.loads((src / "config.json").read_text())
        except ValueError as e:
            raise ConversionError(f"{src / 'config.json'} is damaged: not valid JSON ({e}); it may be truncated: "
                                  "download or copy it again.") from e
    return read_state_dict(src), hf


def convert_vae(src: str | Path | Mapping[str, np.ndarray], cfg: WanVAEConfig | None = None, stream: bool = False):
    """A Wan2.1 VAE checkpoint (path, diffusers folder or state dict) -> dfjax flat parameters of WanVAE(cfg).

    cfg None: inferred from the checkpoint. A cfg with with_encoder=False skips the checkpoint's encoder.
    Any unmapped, missing or misshaped key raises ConversionError naming it. stream: see apply_key_map.
    """
    if isinstance(src, Mapping):
        sd, hf, source = dict(src), None, "VAE state dict"
    else:
        (sd, hf), source = read_vae_checkpoint(src), str(src)
    cfg = cfg or infer_vae_config(sd, hf)
    fmt = detect_format(sd)
    # A decode-only model leaves the encoder and the quant conv (release 'conv1', diffusers 'quant_conv') out.
    ignore = () if cfg.with_encoder else (r"encoder\..*", r"conv1\..*" if fmt == "wan" else r"quant_conv\..*")
    expected = abstract_params(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    return apply_key_map(sd, vae_rules(cfg, fmt), expected, source=f"{source} ({fmt} layout)", ignore=ignore,
                         stream=stream)
