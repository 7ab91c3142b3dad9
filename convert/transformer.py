"""Wan2.1 DiT checkpoints -> dfjax flat parameters.

Sources: the original Wan2.1 names (a Wan .safetensors/.pth, a Self Forcing .pt with
"generator"/"generator_ema" and wrapper prefixes, a LongLive base .pt plus a LoRA file) and the
diffusers WanTransformer3DModel names (a folder or a state dict).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from dfjax.convert.common import ConversionError, Rule, apply_key_map, linear, read_state_dict, read_torch_file, strip_prefixes
from dfjax.config import WanConfig

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
LEADING_PREFIXES = ("model.diffusion_model.", "model.")


def patch_embedding(w: np.ndarray) -> np.ndarray:
    """Conv3d [dim, C, pt, ph, pw] -> Linear kernel [(pt ph pw C), dim] in dfjax's patchify order."""
    return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0]))


def squeeze0(w: np.ndarray) -> np.ndarray:
    """Modulation tables [1, n, dim] -> [n, dim]."""
    return w.reshape(w.shape[1:]) if w.ndim == 3 and w.shape[0] == 1 else w


def _linear_rules(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".kernel", linear), Rule(src + r"\.bias", dst + ".bias")]


def _attn_rules(src_block: str, names: dict[str, str]) -> list[Rule]:
    rules = []
    for kind_src, kind_dst in (("self", "self_attn"), ("cross", "cross_attn")):
        for p_src, p_dst in names[kind_src].items():
            rules += _linear_rules(rf"blocks\.(\d+)\.{src_block[kind_src]}\.{p_src}", rf"blocks.\1.{kind_dst}.{p_dst}")
        for n in ("norm_q", "norm_k"):
            rules.append(Rule(rf"blocks\.(\d+)\.{src_block[kind_src]}\.{n}\.weight", rf"blocks.\1.{kind_dst}.{n}"))
    return rules


def wan_rules() -> list[Rule]:
    """Original Wan2.1 (and Self Forcing) key names."""
    qkvo = {p: p for p in "qkvo"}
    return [
        Rule(r"patch_embedding\.weight", "patch_embedding.kernel", patch_embedding),
        Rule(r"patch_embedding\.bias", "patch_embedding.bias"),
        *_linear_rules(r"text_embedding\.0", "text_embedding_1"),
        *_linear_rules(r"text_embedding\.2", "text_embedding_2"),
        *_linear_rules(r"time_embedding\.0", "time_embedding_1"),
        *_linear_rules(r"time_embedding\.2", "time_embedding_2"),
        *_linear_rules(r"time_projection\.1", "time_projection"),
        Rule(r"blocks\.(\d+)\.modulation", r"blocks.\1.modulation", squeeze0),
        *_attn_rules({"self": "self_attn", "cross": "cross_attn"}, {"self": qkvo, "cross": qkvo}),
        Rule(r"blocks\.(\d+)\.norm3\.weight", r"blocks.\1.norm3_weight"),
        Rule(r"blocks\.(\d+)\.norm3\.bias", r"blocks.\1.norm3_bias"),
        *_linear_rules(r"blocks\.(\d+)\.ffn\.0", r"blocks.\1.ffn_in"),
        *_linear_rules(r"blocks\.(\d+)\.ffn\.2", r"blocks.\1.ffn_out"),
        *_linear_rules(r"head\.head", "head"),
        Rule(r"head\.modulation", "head_modulation", squeeze0),
    ]


def diffusers_rules() -> list[Rule]:
    """diffusers WanTransformer3DModel key names (note: its blocks.N.norm2 is Wan's norm3)."""
    qkvo = {"to_q": "q", "to_k": "k", "to_v": "v", r"to_out\.0": "o"}
    return [
        Rule(r"patch_embedding\.weight", "patch_embedding.kernel", patch_embedding),
        Rule(r"patch_embedding\.bias", "patch_embedding.bias"),
        *_linear_rules(r"condition_embedder\.text_embedder\.linear_1", "text_embedding_1"),
        *_linear_rules(r"condition_embedder\.text_embedder\.linear_2", "text_embedding_2"),
        *_linear_rules(r"condition_embedder\.time_embedder\.linear_1", "time_embedding_1"),
        *_linear_rules(r"condition_embedder\.time_embedder\.linear_2", "time_embedding_2"),
        *_linear_rules(r"condition_embedder\.time_proj", "time_projection"),
        Rule(r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation", squeeze0),
        *_attn_rules({"self": "attn1", "cross": "attn2"}, {"self": qkvo, "cross": qkvo}),
        Rule(r"blocks\.(\d+)\.norm2\.weight", r"blocks.\1.norm3_weight"),
        Rule(r"blocks\.(\d+)\.norm2\.bias", r"blocks.\1.norm3_bias"),
        *_linear_rules(r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn_in"),
        *_linear_rules(r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn_out"),
        *_linear_rules(r"proj_out", "head"),
        Rule(r"scale_shift_table", "head_modulation", squeeze0),
    ]


def detect_format(sd: dict) -> str:
    if any(k.startswith("condition_embedder.") for k in sd):
        return "diffusers"
    if any(k.startswith("time_embedding.") for k in sd):
        return "wan"
    raise ConversionError(
        "not a Wan2.1 transformer checkpoint: found neither 'time_embedding.*' (Wan / Self Forcing) nor "
        f"'condition_embedder.*' (diffusers) keys; first keys: {sorted(sd)[:5]}."
    )


def infer_config(sd: dict, fmt: str, num_heads: int | None = None, **overrides) -> WanConfig:
    """The model size read off the weight shapes. Heads are not visible in shapes: Wan uses head_dim 128."""
    names = {
        "wan": ("text_embedding.0.weight", "time_embedding.0.weight", "blocks.0.ffn.0.weight", "head.head.weight"),
        "diffusers": ("condition_embedder.text_embedder.linear_1.weight", "condition_embedder.time_embedder.linear_1.weight",
                      "blocks.0.ffn.net.0.proj.weight", "proj_out.weight"),
    }[fmt]
    for n in names + ("patch_embedding.weight",):
        if n not in sd:
            raise ConversionError(f"cannot infer the model size: key '{n}' is missing.")
    pe = sd["patch_embedding.weight"]
    dim, cin, pt, ph, pw = pe.shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    heads = num_heads or (dim // 128 if dim % 128 == 0 else None)
    if heads is None:
        raise ConversionError(f"dim {dim} is not a multiple of 128; give the number of heads (--num-heads).")
    return WanConfig(
        dim=dim, num_layers=layers, num_heads=heads, ffn_dim=sd[names[2]].shape[0], freq_dim=sd[names[1]].shape[1],
        text_dim=sd[names[0]].shape[1], in_channels=cin, out_channels=sd[names[3]].shape[0] // (pt * ph * pw),
        patch=(pt, ph, pw), **overrides,
    )


def check_config(inferred: WanConfig, given: WanConfig) -> None:
    """Refuses a --config whose sizes differ from the weights'."""
    keys = ("dim", "num_layers", "num_heads", "ffn_dim", "freq_dim", "text_dim", "in_channels", "out_channels", "patch")
    diff = [f"{k}: weights {getattr(inferred, k)} vs config {getattr(given, k)}" for k in keys
            if getattr(inferred, k) != getattr(given, k)]
    if diff:
        raise ConversionError("the checkpoint does not match the given config (" + "; ".join(diff) + ").")


def merge_lora(sd: dict, lora: dict, alpha: float | None = None) -> dict:
    """W += (alpha / r) B @ A for every LoRA pair; keys '<module>.lora_A.weight' [r, in] / 'lora_B' [out, r].

    PEFT's 'base_model.model.' and '.default' name parts are accepted. alpha defaults to r (scale 1).
    """
    lora = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in lora.items()}
    lora = strip_prefixes(lora, WRAPPER_PREFIXES)
    lora = {_strip_leading(k): v for k, v in lora.items()}
    out = dict(sd)
    a_keys = [k for k in lora if k.endswith(".lora_A.weight")]
    if not a_keys:
        raise ConversionError(f"LoRA file has no '*.lora_A.weight' keys; first keys: {sorted(lora)[:5]}.")
    for ka in a_keys:
        base = ka[: -len(".lora_A.weight")]
        kb = base + ".lora_B.weight"
        if kb not in lora:
            raise ConversionError(f"LoRA key {ka} has no matching {kb}.")
        target = base + ".weight"
        if target not in out:
            raise ConversionError(f"LoRA key {ka} targets '{target}', which the base checkpoint lacks.")
        a, b = np.asarray(lora[ka], np.float32), np.asarray(lora[kb], np.float32)
        r = a.shape[0]
        w = np.asarray(out[target])
        if b.shape[1] != r or (b.shape[0], a.shape[1]) != w.shape:
            raise ConversionError(f"LoRA {base}: A {a.shape}, B {b.shape} do not fit the weight {w.shape}.")
        out[target] = (w.astype(np.float32) + ((alpha or r) / r) * (b @ a)).astype(w.dtype)
    unused = [k for k in lora if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))]
    if unused:
        raise ConversionError(f"LoRA file has keys that are not LoRA pairs, e.g. {unused[:5]}.")
    return out


def _strip_leading(k: str) -> str:
    for p in LEADING_PREFIXES:
        if k.startswith(p):
            return k[len(p):]
    return k


def read_transformer_state(src: str | Path, ema: bool = True) -> tuple[dict, dict]:
    """Reads a transformer checkpoint (any supported source) -> (state dict with bare names, extra config)."""
    src = Path(src)
    extra: dict = {}
    if src.is_dir() and (src / "config.json").is_file():
        cfg = json.loads((src / "config.json").read_text())
        if "num_attention_heads" in cfg:
            extra["num_heads"] = int(cfg["num_attention_heads"])
    if src.is_file() and src.suffix in (".pt", ".pth", ".bin"):
        top = read_torch_file(src)
        if "generator" in top or "generator_ema" in top:  # Self Forcing / LongLive / Causal Forcing
            key = "generator_ema" if ema and "generator_ema" in top else "generator"
            if ema and key != "generator_ema":
                raise ConversionError(f"{src} has no 'generator_ema'; convert the non-EMA weights with --no-ema.")
            sd = read_state_dict(src, subkey=key)
        else:
            sd = read_state_dict(src)
    else:
        sd = read_state_dict(src)
    sd = strip_prefixes(sd, WRAPPER_PREFIXES)
    sd = {_strip_leading(k): v for k, v in sd.items()}
    return sd, extra


def convert_transformer(sd: dict, cfg: WanConfig, stream: bool = False):
    """A bare-named state dict -> dfjax flat params for `cfg`, with every key and shape checked."""
    from flax import nnx

    from dfjax.model.transformer import WanDiT
    from dfjax.params import abstract_params

    fmt = detect_format(sd)
    expected = abstract_params(lambda: WanDiT(cfg, nnx.Rngs(0)))
    rules = wan_rules() if fmt == "wan" else diffusers_rules()
    # Wan keeps RoPE tables as plain attributes; diffusers registers none in the state dict either.
    return apply_key_map(sd, rules, expected, source=f"{fmt} transformer checkpoint", ignore=(r"freqs",),
                         stream=stream)
