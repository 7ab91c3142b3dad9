"""`dfjax convert`: PyTorch checkpoints -> one dfjax model folder (written atomically).

Everything that can be checked without converting is checked first (the output path, every input's existence
and format, torch where a file needs it, the family, entry, heads, LoRA rank and alpha), then a summary of what
the conversion does is printed, then the tensors are converted and written one at a time. The same summary goes
into the folder's config.json as "conversion", next to the family's "sampling", "cache" and "dummy_forcing".
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

from dfjax.config import WanConfig, config_from_dict, dtype_of
from dfjax.convert.common import ConversionError
from dfjax.model_io import FLUSH_BYTES, ModelFolderError, check_output, write_model_folder

LARGE_PART = 1 << 30  # a part this big (bytes as stored) shows progress even when stderr is not a terminal


def _given_config(config: str | None) -> WanConfig | None:
    if config is None:
        return None
    if config.endswith(".json"):
        path = Path(config)
        if not path.is_file():
            raise ConversionError(f"--config {config}: no such file.")
        try:
            return config_from_dict(WanConfig, json.loads(path.read_text()))
        except ValueError as e:  # bad JSON or unknown fields
            raise ConversionError(f"--config {config}: {e}") from e
    try:
        return WanConfig.preset(config)
    except ValueError as e:
        raise ConversionError(f"--config: {e}") from e


def _dtypes(dtype: str, compute_dtype: str | None) -> tuple[str, str]:
    compute_dtype = compute_dtype or dtype  # computing in what is stored is what --dtype float32 is asked for
    for flag, d in (("--dtype", dtype), ("--compute-dtype", compute_dtype)):
        try:
            dtype_of(d)
        except ValueError as e:
            raise ConversionError(f"{flag}: {e}") from e
    return dtype, compute_dtype


# ---------------------------------------------------------------- the transformer (and its LoRA)

@dataclasses.dataclass
class TransformerPart:
    cfg: WanConfig
    items: object  # iterator of (flat key, array), converted as the writer asks
    records: dict  # "family", "sampling", "cache", "dummy_forcing" for the folder's config
    summary: dict  # what was done, for config.json "conversion"
    lines: list[tuple[str, str]]  # the printed summary
    count: int  # tensors
    nbytes: int  # bytes as stored


def read_lora(path, notes: list[str]) -> tuple[dict, tuple[float, str] | None]:
    """(LoRA pairs, (alpha, where from) or None) of a LoRA file: a torch file with a 'generator_lora' entry (LongLive's
    training saves) or a bare peft dict, a .safetensors file, or a peft folder (adapter_model.* with
    adapter_config.json); alpha is read from an adapter_config.json when one comes with it."""
    from dfjax.convert.common import is_tensor, read_state_dict, read_torch_file
    from dfjax.convert.transformer import is_lora_dict, lora_pairs, model_entries

    path = Path(path)
    cfg_file = path / "adapter_config.json" if path.is_dir() else path.parent / "adapter_config.json"
    if path.is_dir():
        weights = [p for p in (path / "adapter_model.safetensors", path / "adapter_model.bin") if p.is_file()]
        if not weights:
            raise ConversionError(f"--lora {path}: a folder without adapter_model.safetensors or adapter_model.bin.")
        path = weights[0]
    if path.suffix == ".safetensors":
        sd = read_state_dict(path)
    else:
        top = read_torch_file(path)
        if isinstance(top.get("generator_lora"), dict):
            others = sorted(str(k) for k in top if k != "generator_lora")
            if others:
                notes.append(f"{path.name}: took 'generator_lora'; left out {', '.join(others)}")
            sd = {k: v for k, v in top["generator_lora"].items() if is_tensor(v)}
        elif is_lora_dict(top):
            skipped = sorted(str(k) for k, v in top.items() if not is_tensor(v))
            if skipped:
                notes.append(f"{path.name}: ignored entries that are not tensors: {', '.join(skipped)}")
            sd = {k: v for k, v in top.items() if is_tensor(v)}
        elif model_entries(top) or "critic" in top:
            raise ConversionError(
                f"--lora {path} is a full checkpoint (entries {', '.join(model_entries(top) or ('critic',))}), not a "
                "LoRA; give it as the source (the first argument) and the LoRA file (lora.pt) as --lora.")
        else:
            raise ConversionError(f"--lora {path}: no LoRA weights in it (neither a 'generator_lora' entry nor "
                                  f"'*.lora_A.weight' keys; first entries: {sorted(map(str, top))[:5]}).")
    if not is_lora_dict(sd):
        raise ConversionError(f"--lora {path}: no '*.lora_A.weight' / '*.lora_B.weight' keys in it; is it a LoRA?")
    file_alpha = None
    if cfg_file.is_file():
        try:
            acfg = json.loads(cfg_file.read_text())
            if isinstance(acfg.get("lora_alpha"), (int, float)):
                file_alpha = (float(acfg["lora_alpha"]), str(cfg_file))
        except ValueError as e:
            raise ConversionError(f"{cfg_file} is damaged: not valid JSON ({e}).") from e
    return lora_pairs(sd), file_alpha


def transformer_part(src, config=None, num_heads=None, ema=None, lora=None, lora_alpha=None, dtype="bfloat16",
                     *, family=None, entry=None, steps=None, compute_dtype=None):
    """(config, items) of the DiT (plan_transformer has the rest)."""
    part = plan_transformer(src, config=config, num_heads=num_heads, ema=ema, lora=lora, lora_alpha=lora_alpha,
                            dtype=dtype, family=family, entry=entry, steps=steps, compute_dtype=compute_dtype)
    return part.cfg, part.items


def plan_transformer(src, *, config=None, num_heads=None, ema=None, lora=None, lora_alpha=None, dtype="bfloat16",
                     family=None, entry=None, steps=None, compute_dtype=None) -> TransformerPart:
    from dfjax.convert import families as fams
    from dfjax.convert.common import is_torch_file, read_torch_file
    from dfjax.convert.transformer import (check_sizes, choose_entry, convert_transformer, detect_format,
                                           expected_params, infer_sizes, is_lora_dict, lora_rank, merge_pairs,
                                           model_entries, read_transformer_state, resolve_heads, resolve_lora_alpha)

    src = Path(src)
    dtype, compute_dtype = _dtypes(dtype, compute_dtype)
    notes: list[str] = []
    lines: list[tuple[str, str]] = []
    top = read_torch_file(src) if is_torch_file(src) else None
    if top is not None and not model_entries(top) and ("generator_lora" in top or is_lora_dict(top)):
        what = "a generator_lora entry" if "generator_lora" in top else "lora_A / lora_B keys"
        raise ConversionError(f"{src} is a LoRA file ({what}), not a base model; give it as --lora, and the base "
                              "checkpoint (longlive_base.pt) as the source.")
    entries = model_entries(top) if top is not None else ()
    if ema is not None and entry is None:  # the older switch: --no-ema is --entry generator
        if entries:
            entry = "generator_ema" if ema else "generator"
        else:
            notes.append(f"--no-ema has no effect: {src.name} has no training entries to choose from")
    pairs, file_alpha = read_lora(lora, notes) if lora else (None, None)

    if family is None:
        fsdp = any("_fsdp_wrapped_module." in str(k) for e in entries for k in list(top[e])[:4])
        name, why = fams.detect_family(entries, bool(lora), fsdp)
        fam, family_from = fams.family(name), f"detected: {why}; --family to choose another"
    else:
        fam, family_from = fams.family(family), "--family"
    entry, entry_from = choose_entry(src, entries, fam, entry)
    if fam.name == "causal-forcing-framewise" and steps is None:
        steps = fams.steps_from_name(src)
        steps_from = f"{steps} steps, from the file name; --steps to choose" if steps else \
            "4 steps (Causal Forcing); --steps 1 or 2 for the Causal Forcing++ releases"
    else:
        steps_from = "--steps" if steps else None
    records = fams.records(fam, steps)

    sd = read_transformer_state(src, entry=entry, top=top, notes=notes) if top is not None else \
        read_transformer_state(src, notes=notes)
    lora_summary = None
    if pairs is not None:
        rank = lora_rank(pairs)
        alpha, alpha_from = resolve_lora_alpha(rank, lora_alpha, file_alpha)
        sd = merge_pairs(sd, pairs, alpha)
        lora_summary = dict(file=Path(lora).name, rank=rank, alpha=alpha, alpha_from=alpha_from, scale=alpha / rank,
                            pairs=len(pairs))
        lines.append(("lora", f"{Path(lora).name}: rank {rank}, alpha {alpha:g} ({alpha_from}), scale "
                              f"{alpha / rank:g}, {len(pairs)} weights merged (W + scale B A)"))
    elif fam.name == "longlive":
        notes.append("no --lora: LongLive's inference merges its lora.pt into this base; these are the base weights")

    fmt = detect_format(sd)
    sizes = infer_sizes(sd, fmt)
    given = _given_config(config)
    if given is not None:
        check_sizes(sizes, given, config)
    heads, heads_from, head_notes = resolve_heads(sizes, src, num_heads, given, config)
    notes += head_notes
    base = given if given is not None else WanConfig()
    try:
        cfg = replace(base, **sizes, num_heads=heads, param_dtype=dtype, dtype=compute_dtype)
    except ValueError as e:
        raise ConversionError(f"{heads} heads ({heads_from}) do not fit this {sizes['dim']}-wide model: {e}") from e
    expected = expected_params(cfg)
    count = len(expected)
    nparams = sum(math.prod(v.shape) for v in expected.values())
    nbytes = sum(math.prod(v.shape) * v.dtype.itemsize for v in expected.values())

    size = f"{nparams / 1e9:.2f}B" if nparams >= 1e8 else f"{nparams / 1e6:.2f}M"
    lines[:0] = [
        ("family", f"{fam.name} ({family_from})"),
        ("weights", f"'{entry}' of {src.name} ({entry_from})" if entry else f"{src.name} ({entry_from}, {fmt} names)"),
        ("transformer", f"dim {cfg.dim}, {cfg.num_layers} layers, {heads} heads of {cfg.head_dim} (heads: "
                        f"{heads_from}), {size} parameters"),
    ]
    lines.append(("dtypes", f"stored {dtype}, computed {compute_dtype} (norms, modulation and the time embedding "
                            f"stored float32)"))
    lines.append(("sampling", fams.describe(records) + (f" [{steps_from}]" if steps_from else "")))
    summary = dict(family=fam.name, family_from=family_from, entry=entry, entry_from=entry_from,
                   key_names=fmt, num_heads=heads, num_heads_from=heads_from, parameters=nparams,
                   storage_dtype=dtype, compute_dtype=compute_dtype, lora=lora_summary)
    if steps_from:
        summary["steps_from"] = steps_from
    summary["notes"] = notes
    return TransformerPart(cfg, convert_transformer(sd, cfg, stream=True, expected=expected),
                           {"family": fam.name, **records}, summary, lines, count, nbytes)


# ---------------------------------------------------------------- text encoder, VAE

def text_encoder_part(src, dtype="bfloat16", compute_dtype=None):
    from dfjax.convert.common import read_state_dict
    from dfjax.convert.text_encoder import infer_text_encoder_config, text_encoder_params

    dtype, compute_dtype = _dtypes(dtype, compute_dtype)
    sd = read_state_dict(src)
    cfg = replace(infer_text_encoder_config(sd), param_dtype=dtype, dtype=compute_dtype)
    return cfg, text_encoder_params(sd, cfg, source=str(src), stream=True), _source_size(sd, dtype)


def vae_part(src, dtype="bfloat16", compute_dtype=None):
    from dfjax.convert.vae import convert_vae, infer_vae_config, read_vae_checkpoint

    dtype, compute_dtype = _dtypes(dtype, compute_dtype)
    sd, hf = read_vae_checkpoint(src)
    cfg = infer_vae_config(sd, hf, param_dtype=dtype, dtype=compute_dtype)
    return cfg, convert_vae(sd, cfg, stream=True), _source_size(sd, dtype)


def _source_size(sd: dict, dtype: str) -> tuple[int, int]:
    import numpy as np

    return len(sd), sum(math.prod(v.shape) for v in sd.values()) * np.dtype(dtype_of(dtype)).itemsize


# ---------------------------------------------------------------- the folder

def _progress(items, name: str, count: int, nbytes: int, enabled: bool | None):
    """tqdm over a part's tensors on stderr: when asked, or (None) when stderr is a terminal or the part is big."""
    if enabled is None:
        enabled = nbytes >= LARGE_PART or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=count, desc=f"converting {name}", unit="tensor", file=sys.stderr, mininterval=1.0,
                leave=False)


def _check_inputs(src, lora, text_encoder, vae, tokenizer) -> None:
    """Every input exists, and torch is installed where a file needs it: before anything is read."""
    from dfjax.convert.common import is_torch_file, require_torch

    given = [("the source", src), ("--lora", lora), ("--text-encoder", text_encoder), ("--vae", vae),
             ("--tokenizer", tokenizer)]
    for what, path in given:
        if path is not None and not Path(path).exists():
            raise ConversionError(f"{what} {path}: no such file or folder.")
    for what, path in given[:4]:
        if path is not None and is_torch_file(path):
            require_torch(path)


def convert_model_folder(src, out, *, config=None, num_heads=None, ema=None, lora=None, lora_alpha=None,
                         text_encoder=None, vae=None, tokenizer=None, dtype="bfloat16", compute_dtype=None,
                         family=None, entry=None, steps=None, overwrite=False, flush_bytes=FLUSH_BYTES,
                         log: Callable[[str], None] | None = None, progress: bool | None = None) -> Path:
    """Converts every given part into the folder, tensor by tensor as it is written (host memory holds about
    `flush_bytes` of the output, never a whole part), and makes the folder appear in one atomic step.

    family: self-forcing, longlive, causal-forcing, causal-forcing-framewise or wan (None: detected from the
    file); entry: the training-save entry to convert (None: the family's); ema: the older switch (True:
    generator_ema, False: generator). dtype: how weights are stored; compute_dtype: what the model computes
    in (default: dtype). log: called with each line of the summary (nothing is printed without it)."""
    check_output(out, overwrite)
    _check_inputs(src, lora, text_encoder, vae, tokenizer)
    dtype, compute_dtype = _dtypes(dtype, compute_dtype)
    dit = plan_transformer(src, config=config, num_heads=num_heads, ema=ema, lora=lora, lora_alpha=lora_alpha,
                           dtype=dtype, family=family, entry=entry, steps=steps, compute_dtype=compute_dtype)
    configs = {"transformer": dit.cfg}
    params = {"transformer": _progress(dit.items, "transformer", dit.count, dit.nbytes, progress)}
    lines = list(dit.lines)
    sources = {"transformer": Path(src).name}
    for name, path, make in (("text_encoder", text_encoder, text_encoder_part), ("vae", vae, vae_part)):
        if path:
            cfg, items, (count, nbytes) = make(path, dtype, compute_dtype)
            configs[name], params[name] = cfg, _progress(items, name.replace("_", " "), count, nbytes, progress)
            sources[name] = Path(path).name
            lines.append((name.replace("_", " "), f"{Path(path).name}: {_describe_part(name, cfg)}"))
    dirs = {}
    if tokenizer:
        from dfjax.text import load_tokenizer

        load_tokenizer(tokenizer)  # fails now, with the fix, rather than at generation time
        dirs["tokenizer"] = tokenizer
        sources["tokenizer"] = Path(tokenizer).name
    if lora:
        sources["lora"] = Path(lora).name
    summary = {**dit.summary, "sources": sources}
    summary["notes"] = list(dit.summary["notes"])
    lines += [("note", n) for n in summary["notes"]]
    if log is not None:
        log(f"converting {src} -> {out}")
        for key, text in lines:
            log(f"  {key:13s}{text}")
    meta = {k: v.__dict__ for k, v in configs.items()}
    meta.update(dit.records)
    meta["conversion"] = summary
    try:
        return write_model_folder(out, meta, params, copy_dirs=dirs, overwrite=overwrite, flush_bytes=flush_bytes)
    except OSError as e:  # e.g. the disk filled up: nothing is left behind, say why in one line
        raise ModelFolderError(f"writing {out} failed: {e.strerror or e} ({e.filename or out}); nothing was "
                               "written.") from e


def _describe_part(name: str, cfg) -> str:
    if name == "text_encoder":
        return f"UMT5, {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads"
    return f"Wan VAE, base {cfg.base_dim}, z {cfg.z_dim}" + ("" if cfg.with_encoder else " (decoder only)")
