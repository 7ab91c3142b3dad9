"""Wan2.1 DiT checkpoints -> dfjax flat parameters.

Sources: the original Wan2.1 names (a Wan .safetensors/.pth, a Self Forcing .pt with
"generator"/"generator_ema" and wrapper prefixes, a LongLive base .pt plus a LoRA file) and the
diffusers WanTransformer3DModel names (a folder or a state dict).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from dfjax.convert.common import (ConversionError, Rule, apply_key_map, linear, read_state_dict, read_torch_file,
                                  strip_prefixes)
from dfjax.config import WanConfig

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
LEADING_PREFIXES = ("model.diffusion_model.", "model.", "module.")


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


SIZE_KEYS = ("dim", "num_layers", "ffn_dim", "freq_dim", "text_dim", "in_channels", "out_channels", "patch")
# Wan2.1's released widths; heads are not visible in the weights' shapes
KNOWN_HEADS = {1536: (12, "Wan2.1 1.3B"), 5120: (40, "Wan2.1 14B")}


def infer_sizes(sd: dict, fmt: str) -> dict:
    """The model's sizes read off the weight shapes (everything WanConfig needs but the head count)."""
    names = {
        "wan": ("text_embedding.0.weight", "time_embedding.0.weight", "blocks.0.ffn.0.weight", "head.head.weight"),
        "diffusers": ("condition_embedder.text_embedder.linear_1.weight", "condition_embedder.time_embedder.linear_1.weight",
                      "blocks.0.ffn.net.0.proj.weight", "proj_out.weight"),
    }[fmt]
    for n in names + ("patch_embedding.weight",):
        if n not in sd:
            raise ConversionError(f"cannot infer the model size: key '{n}' is missing.")
    pe = sd["patch_embedding.weight"]
    if len(pe.shape) != 5:
        raise ConversionError(f"'patch_embedding.weight' has shape {tuple(pe.shape)}; a Wan2.1 DiT's is 5-dimensional.")
    dim, cin, pt, ph, pw = pe.shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return dict(dim=int(dim), num_layers=layers, ffn_dim=int(sd[names[2]].shape[0]),
                freq_dim=int(sd[names[1]].shape[1]), text_dim=int(sd[names[0]].shape[1]), in_channels=int(cin),
                out_channels=int(sd[names[3]].shape[0] // (pt * ph * pw)), patch=(int(pt), int(ph), int(pw)))


def check_sizes(sizes: dict, given: WanConfig, name: str) -> None:
    """Refuses a --config whose sizes differ from the weights', naming each size that differs."""
    diff = [f"{k} {sizes[k]} vs {getattr(given, k)}" for k in SIZE_KEYS
            if tuple(np.atleast_1d(sizes[k])) != tuple(np.atleast_1d(getattr(given, k)))]
    if diff:
        raise ConversionError(f"the checkpoint does not match the given config --config {name}: the sizes disagree "
                              f"(weights vs config: {', '.join(diff)}).")


def source_heads(src: str | Path, dim: int) -> tuple[int | None, str, list[str]]:
    """(heads, where from, notes) from a config the source ships: a diffusers folder's config.json, or the
    config.json / <name>.json beside a checkpoint file (Wan2.1's releases ship one). A config that describes
    another width is not used (a note says so)."""
    src = Path(src)
    cands = [src / "config.json"] if src.is_dir() else [src.parent / "config.json", src.with_suffix(".json")]
    notes = []
    for c in cands:
        if not c.is_file():
            continue
        try:
            cfg = json.loads(c.read_text())
        except ValueError as e:
            raise ConversionError(f"{c} is damaged: not valid JSON ({e}); it may be truncated: download or copy it "
                                  "again (or give --num-heads).") from e
        if not isinstance(cfg, dict):
            continue
        heads = cfg.get("num_attention_heads", cfg.get("num_heads"))
        if not isinstance(heads, int):
            continue
        width = cfg.get("dim", heads * cfg["attention_head_dim"] if isinstance(cfg.get("attention_head_dim"), int)
                        else None)
        if width is not None and width != dim:
            notes.append(f"{c} describes a {width}-wide model, the weights are {dim} wide; not used for the head count")
            continue
        return heads, str(c), notes
    return None, "", notes


def resolve_heads(sizes: dict, src, num_heads: int | None, given: WanConfig | None, given_name: str | None):
    """(heads, where from, notes): --num-heads, else --config, else a config beside the source, else Wan's known
    widths; any other width is refused (a wrong guess runs, and is silently a few percent off)."""
    dim = sizes["dim"]
    notes: list[str] = []
    if num_heads:
        heads, origin = num_heads, "--num-heads"
    elif given is not None:
        heads, origin = given.num_heads, f"--config {given_name}"
    else:
        heads, origin, notes = source_heads(src, dim)
        if heads is None and dim in KNOWN_HEADS:
            heads, model = KNOWN_HEADS[dim]
            origin = f"{model}'s width ({dim} = {heads} heads of 128)"
        elif heads is None:
            raise ConversionError(
                f"cannot tell how many attention heads this {dim}-wide model has: no config.json came with it, and "
                f"only Wan2.1's widths are known ({', '.join(f'{d} -> {h}' for d, (h, _) in KNOWN_HEADS.items())}); "
                "give --num-heads.")
    if given is not None and num_heads and given.num_heads != num_heads:
        raise ConversionError(f"--num-heads {num_heads} disagrees with --config {given_name} "
                              f"({given.num_heads} heads).")
    if heads < 1 or dim % heads:
        raise ConversionError(f"{heads} heads ({origin}) do not divide the model width {dim}.")
    return heads, origin, notes


def infer_config(sd: dict, fmt: str, num_heads: int | None = None, **overrides) -> WanConfig:
    """The model read off the weight shapes; heads: `num_heads`, else Wan's known widths (resolve_heads)."""
    sizes = infer_sizes(sd, fmt)
    heads = num_heads or KNOWN_HEADS.get(sizes["dim"], (None,))[0]
    if heads is None:
        raise ConversionError(f"cannot tell how many attention heads this {sizes['dim']}-wide model has; give "
                              "--num-heads.")
    return WanConfig(**sizes, num_heads=heads, **overrides)


def check_config(inferred: WanConfig, given: WanConfig) -> None:
    """Refuses a --config whose sizes (or heads) differ from the weights'."""
    check_sizes({k: getattr(inferred, k) for k in SIZE_KEYS}, given, "")
    if inferred.num_heads != given.num_heads:
        raise ConversionError(f"the checkpoint does not match the given config: {inferred.num_heads} heads vs "
                              f"{given.num_heads}.")


# ---------------------------------------------------------------- LoRA

LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
KNOWN_LORA_ALPHA = {256: "LongLive's release config (adapter rank 256, alpha 256)"}


class MergedTensor:
    """W + scale * B @ A, computed in float64 when converted (like LazyTensor, nothing is read before), then
    rounded once to float32."""

    def __init__(self, w, a, b, scale: float):
        self.w, self.a, self.b, self.scale, self.shape = w, a, b, scale, tuple(w.shape)

    def __array__(self, dtype=None, copy=None):
        w, a, b = (np.asarray(x, np.float64) for x in (self.w, self.a, self.b))
        out = (w + self.scale * (b @ a)).astype(np.float32)
        return out if dtype is None else out.astype(dtype, copy=False)


def lora_pairs(lora: dict) -> dict[str, tuple]:
    """{module: (A, B)} from a peft-style dict ('base_model.model.' and '.default' name parts and the wrapper
    prefixes accepted); a key that is not half of a pair is an error."""
    lora = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in lora.items()}
    lora = strip_prefixes(lora, WRAPPER_PREFIXES)
    lora = {_strip_leading(k): v for k, v in lora.items()}
    a_keys = [k for k in lora if k.endswith(".lora_A.weight")]
    if not a_keys:
        raise ConversionError(f"LoRA file has no '*.lora_A.weight' keys; first keys: {sorted(lora)[:5]}.")
    unused = [k for k in lora if not k.endswith(LORA_SUFFIXES)]
    if unused:
        raise ConversionError(f"LoRA file has keys that are not LoRA pairs, e.g. {unused[:5]}.")
    pairs = {}
    for ka in a_keys:
        base = ka[: -len(".lora_A.weight")]
        kb = base + ".lora_B.weight"
        if kb not in lora:
            raise ConversionError(f"LoRA key {ka} has no matching {kb}.")
        pairs[base] = (lora[ka], lora[kb])
    orphans = [k for k in lora if k.endswith(".lora_B.weight") and k[: -len(".lora_B.weight")] not in pairs]
    if orphans:
        raise ConversionError(f"LoRA key {orphans[0]} has no matching lora_A.")
    return pairs


def lora_rank(pairs: dict) -> int:
    ranks = sorted({int(a.shape[0]) for a, _ in pairs.values()})
    if len(ranks) != 1:
        raise ConversionError(f"the LoRA's pairs have different ranks {ranks}; dfjax merges one rank with one alpha.")
    return ranks[0]


def resolve_lora_alpha(rank: int, alpha: float | None, file_alpha: tuple[float, str] | None) -> tuple[float, str]:
    """(alpha, where from): --lora-alpha, else the adapter config saved with the LoRA, else the release's value for
    its rank; LongLive's LoRA files do not store alpha, so any other rank is refused rather than guessed."""
    if alpha is not None:
        return float(alpha), "--lora-alpha"
    if file_alpha is not None:
        return float(file_alpha[0]), file_alpha[1]
    if rank in KNOWN_LORA_ALPHA:
        return float(rank), KNOWN_LORA_ALPHA[rank] + "; the file does not store alpha"
    raise ConversionError(
        f"the LoRA has rank {rank}, and its file does not store alpha (LongLive's do not); the merge scale is "
        f"alpha / rank, so give the alpha it was trained with: --lora-alpha A (LongLive's configs set it as "
        f"adapter.alpha; alpha = rank gives scale 1).")


def merge_lora(sd: dict, lora: dict, alpha: float | None = None) -> dict:
    """W += (alpha / r) B @ A for every LoRA pair; keys '<module>.lora_A.weight' [r, in] / 'lora_B' [out, r].

    PEFT's 'base_model.model.' and '.default' name parts are accepted. alpha: as resolve_lora_alpha (no file
    config). Each merged weight is computed (in float64) only when the conversion asks for it.
    """
    pairs = lora_pairs(lora)
    alpha, _ = resolve_lora_alpha(lora_rank(pairs), alpha, None)
    return merge_pairs(sd, pairs, alpha)


def merge_pairs(sd: dict, pairs: dict, alpha: float) -> dict:
    out = dict(sd)
    for base, (a, b) in pairs.items():
        target = base + ".weight"
        if target not in out:
            raise ConversionError(f"LoRA key {base}.lora_A.weight targets '{target}', which the base checkpoint lacks "
                                  f"(its first keys: {sorted(sd)[:3]}).")
        w, r = out[target], int(a.shape[0])
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ConversionError(f"LoRA {base}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the weight "
                                  f"{tuple(w.shape)}.")
        out[target] = MergedTensor(w, a, b, alpha / r)
    return out


def _strip_leading(k: str) -> str:
    changed = True
    while changed:  # e.g. DDP's "module." around Self Forcing's "model."
        changed = False
        for p in LEADING_PREFIXES:
            if k.startswith(p):
                k, changed = k[len(p):], True
                break
    return k


# ---------------------------------------------------------------- reading the base

MODEL_ENTRIES = ("generator", "generator_ema", "model")


def model_entries(top: dict) -> tuple[str, ...]:
    return tuple(e for e in MODEL_ENTRIES if isinstance(top.get(e), Mapping))


def is_lora_dict(d: Mapping) -> bool:
    return any(isinstance(k, str) and (".lora_A." in k or ".lora_B." in k) for k in d)


def choose_entry(src, entries: tuple[str, ...], fam, entry: str | None) -> tuple[str | None, str]:
    """(entry, why): --entry, else the first of the family's entries the file has, else its only entry."""
    if not entries:
        if entry is not None:
            raise ConversionError(f"--entry {entry}: {src} is a bare state dict, with no training entries.")
        return None, "a bare state dict"
    if entry is not None:
        if entry not in entries:
            raise ConversionError(f"--entry {entry}: {src} has no such entry (it has {', '.join(entries)}).")
        return entry, "--entry"
    for e in fam.entries:
        if e in entries:
            return e, fam.entry_why
    if len(entries) == 1:
        return entries[0], (f"the only weights in the file ({fam.title}'s inference loads "
                            f"{' or '.join(repr(e) for e in fam.entries) or 'a bare state dict'})")
    raise ConversionError(f"{src} has the entries {', '.join(entries)}, and {fam.title}'s inference loads none of "
                          f"them; choose one with --entry.")


def read_transformer_state(src: str | Path, ema: bool = True, entry: str | None = None, top: dict | None = None,
                           notes: list[str] | None = None) -> dict:
    """Reads a transformer checkpoint (any supported source) -> its state dict with bare names.

    A torch file with training entries gives `entry` (default: 'generator_ema' if ema, else 'generator'); the
    other entries and non-tensor values are left out (with a line in `notes`).
    """
    src = Path(src)
    if src.is_file() and src.suffix != ".safetensors":
        top = read_torch_file(src) if top is None else top
        entries = model_entries(top)
        if entries:
            if entry is None:
                entry = "generator_ema" if ema else "generator"
                if entry not in entries:
                    raise ConversionError(f"{src} has no '{entry}' entry (it has {', '.join(entries)}); choose one "
                                          "with --entry.")
            others = sorted(str(k) for k in top if k != entry)
            if others and notes is not None:
                notes.append(f"{src.name}: took '{entry}'; left out {', '.join(others[:6])}"
                             f"{', ...' if len(others) > 6 else ''}")
            sd = read_state_dict(src, subkey=entry, top=top, notes=notes)
        else:
            sd = read_state_dict(src, top=top, notes=notes)
    else:
        sd = read_state_dict(src)
    if is_lora_dict(sd):
        raise ConversionError(f"{src} holds LoRA weights (lora_A / lora_B keys), not a base model; give it as --lora "
                              "and the base checkpoint as the source.")
    sd = strip_prefixes(sd, WRAPPER_PREFIXES)
    return {_strip_leading(k): v for k, v in sd.items()}


def expected_params(cfg: WanConfig) -> dict:
    """{flat key: ShapeDtypeStruct} of the DiT `cfg` describes, as a model folder stores it (nothing allocated):
    unquantised, also for a config with fp8 on (such a folder is quantised as it loads, dfjax.t2v)."""
    from flax import nnx

    from dfjax.model.transformer import WanDiT
    from dfjax.params import abstract_params

    return abstract_params(lambda: WanDiT(dataclasses.replace(cfg, fp8=False), nnx.Rngs(0)))


def convert_transformer(sd: dict, cfg: WanConfig, stream: bool = False, expected: dict | None = None):
    """A bare-named state dict -> dfjax flat params for `cfg`, with every key and shape checked (`expected`:
    expected_params(cfg), if already made)."""
    fmt = detect_format(sd)
    expected = expected_params(cfg) if expected is None else expected
    rules = wan_rules() if fmt == "wan" else diffusers_rules()
    # Wan keeps RoPE tables as plain attributes; diffusers registers none in the state dict either.
    return apply_key_map(sd, rules, expected, source=f"{fmt} transformer checkpoint", ignore=(r"freqs",),
                         stream=stream)
