"""Shared pieces of every converter: reading torch/safetensors files and applying a checked key map."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the key or file and the fix."""


# ---------------------------------------------------------------- reading

def _tensor_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:  # numpy has no bf16: go through fp32, exact
        t = t.float()
    return t.detach().cpu().numpy()


def _flatten_nested(obj, prefix="") -> dict:
    """Flattens nested dicts of tensors (e.g. {"generator": {...}}) into dotted keys."""
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten_nested(v, key + "."))
        else:
            out[key] = v
    return out


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def is_torch_file(path: str | Path) -> bool:
    """A file that only torch can read (a folder or a .safetensors file is read without it)."""
    path = Path(path)
    return path.is_file() and path.suffix != ".safetensors"


def require_torch(path: str | Path):
    """torch, or a one-line error that says which extra installs it."""
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"{path} is a PyTorch file, and reading it needs torch, which is not installed here: "
            "pip install 'dfjax[torch]' (the CPU wheel is enough)."
        ) from e
    return torch


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to several)."""
    text = str(e).strip().splitlines()
    return text[0].split(". ")[0].rstrip(".") if text else type(e).__name__


def read_torch_file(path: str | Path) -> dict:
    """A .pt/.pth/.bin file as a (possibly nested) dict of torch tensors, read with weights_only=True (tensors
    memory-mapped where the file's format allows)."""
    torch = require_torch(path)
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # mmap needs the zipfile format of torch >= 1.6; older files load without it
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except RuntimeError as e:  # torch's zip reader: a truncated or damaged file
        raise ConversionError(f"{path}: the file is truncated or damaged ({_first_line(e)}); download or copy it "
                              "again.") from e
    except Exception as e:  # weights_only refuses pickled code, a non-torch file fails to unpickle
        raise ConversionError(f"{path}: cannot be read as a weights-only torch file ({_first_line(e)}).") from e
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a dict of tensors, found {type(obj).__name__}.")
    return dict(obj)


def is_tensor(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (int, float, str, bytes))


class LazyTensor:
    """One checkpoint tensor, read only when converted (`np.asarray`): a state dict of these holds no weights, so a
    conversion keeps one source tensor in host memory at a time next to its output, not the whole source.
    `.shape` is known without reading."""

    def __init__(self, read: Callable[[], object], shape: tuple[int, ...]):
        self._read, self.shape = read, tuple(shape)

    def __array__(self, dtype=None, copy=None):
        arr = _tensor_to_numpy(self._read())
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape})"


def _safetensors_tensor(path: Path, key: str):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # opened per tensor: its pages are unmapped after the read
        return f.get_tensor(key)


def read_safetensors(paths: list[Path]) -> dict[str, LazyTensor]:
    from safetensors import SafetensorError, safe_open

    out = {}
    for p in paths:
        try:
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    if k in out:
                        raise ConversionError(f"key {k} appears in more than one file ({p}).")
                    out[k] = LazyTensor(functools.partial(_safetensors_tensor, p, k), f.get_slice(k).get_shape())
        except SafetensorError as e:  # the header is read now, so a damaged file fails before any conversion
            raise ConversionError(f"{p}: not a valid .safetensors file ({_first_line(e)}); it is truncated, damaged "
                                  "or another kind of file: download or copy it again.") from e
    return out


def read_state_dict(src: str | Path, subkey: str | None = None, notes: list[str] | None = None,
                    top: Mapping | None = None) -> dict[str, LazyTensor]:
    """Reads a checkpoint file or folder (safetensors shards or one torch file) into {key: LazyTensor}: the keys and
    shapes now, each tensor when it is converted (torch files are memory-mapped where their format allows).

    `subkey` picks a top-level entry of a torch file (e.g. "generator_ema"); its absence is an error
    that lists what the file has. Entries that are not tensors (a training step, optimizer settings) are
    left out, with a line in `notes` when one is given. `top`: the torch file's dict, if already read.
    """
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder.")
    if src.is_dir():
        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            raise ConversionError(f"{src}: folder has no .safetensors files.")
        return read_safetensors(shards)
    if src.suffix == ".safetensors":
        return read_safetensors([src])
    obj = read_torch_file(src) if top is None else top
    if subkey is not None:
        if subkey not in obj:
            raise ConversionError(f"{src}: has no entry '{subkey}' (top-level entries: {sorted(obj)[:10]}).")
        obj = obj[subkey]
        if not isinstance(obj, Mapping):
            raise ConversionError(f"{src}: entry '{subkey}' is not a dict of tensors.")
    flat = _flatten_nested(obj)
    skipped = sorted(k for k, v in flat.items() if not is_tensor(v))
    if skipped and notes is not None:
        notes.append(f"{src.name}: ignored {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that "
                     f"{'is' if len(skipped) == 1 else 'are'} not tensors: {', '.join(skipped[:5])}"
                     f"{', ...' if len(skipped) > 5 else ''}")
    return {k: LazyTensor(lambda v=v: v, v.shape) for k, v in flat.items() if is_tensor(v)}


def strip_prefixes(sd: dict, prefixes: tuple[str, ...]) -> dict:
    """Removes wrapper prefixes anywhere in each key (FSDP/checkpoint/compile wrappers), and leading ones."""
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            k = k.replace(p, "")
        if k in out:
            raise ConversionError(f"two keys become '{k}' after removing prefixes {prefixes}.")
        out[k] = v
    return out


# ---------------------------------------------------------------- layout transforms

def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear [out, in] -> flax kernel [in, out]."""
    return np.ascontiguousarray(w.T)


def conv3d(w: np.ndarray) -> np.ndarray:
    """torch Conv3d OIDHW -> flax DHWIO."""
    return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0))


def conv2d(w: np.ndarray) -> np.ndarray:
    """torch Conv2d OIHW -> flax HWIO."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def identity(w: np.ndarray) -> np.ndarray:
    return w


# ---------------------------------------------------------------- key maps

@dataclass(frozen=True)
class Rule:
    """One key-map entry: a torch key regex, the flat dfjax key it becomes (re.sub template), a transform."""

    pattern: str
    target: str
    transform: Callable[[np.ndarray], np.ndarray] = identity


def apply_key_map(sd, rules, expected, source="checkpoint", ignore=(), stream=False):
    """Maps every torch key through exactly one rule and checks the result against `expected` shapes.

    expected: {flat dfjax key: anything with .shape, and .dtype to store it in} (e.g. dfjax.params.abstract_params):
    each tensor is read, transformed and cast one at a time (with a LazyTensor source, the whole model is never in
    host memory twice). Any unmapped, duplicate, missing or misshaped key raises ConversionError naming it.
    Keys matching a regex in `ignore` are dropped (buffers such as rotary tables).
    Returns {flat key: array}, or with stream=True an iterator of (flat key, array) pairs that converts each
    tensor only when it is asked for (a writer can then hold a few tensors at a time, never the model); its
    checks for missing and unexpected keys raise at its end.
    """
    items = _key_map_items(sd, rules, expected, source, ignore)
    return items if stream else dict(items)


def _key_map_items(sd, rules, expected, source, ignore):
    compiled = [(re.compile(r.pattern + r"\Z"), r) for r in rules]
    ignored = [re.compile(p + r"\Z") for p in ignore]
    origin: dict[str, str] = {}
    unexpected = []
    for key, value in sd.items():
        if any(p.match(key) for p in ignored):
            continue
        for rx, rule in compiled:
            m = rx.match(key)
            if m:
                target = m.expand(rule.target)
                break
        else:
            unexpected.append(key)
            continue
        if target in origin:
            raise ConversionError(f"{source}: keys '{origin[target]}' and '{key}' both map to '{target}'.")
        if target not in expected:
            unexpected.append(key)
            continue
        try:
            arr = rule.transform(np.asarray(value))
        except (ValueError, IndexError) as e:  # e.g. a tensor with the wrong number of dimensions
            raise ConversionError(f"{source}: key '{key}' of shape {tuple(value.shape)} cannot be converted: {e}.") from e
        want = tuple(expected[target].shape)
        if tuple(arr.shape) != want:
            raise ConversionError(
                f"{source}: key '{key}' has shape {tuple(value.shape)}, which becomes {tuple(arr.shape)}; "
                f"the model expects {want} for '{target}'. Is --config the right model size?"
            )
        dtype = getattr(expected[target], "dtype", None)
        origin[target] = key
        yield target, (arr if dtype is None else arr.astype(dtype, copy=False))
    if unexpected:
        raise ConversionError(
            f"{source}: {len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}. "
            "Is this the right checkpoint format for this converter?"
        )
    missing = sorted(set(expected) - set(origin))
    if missing:
        raise ConversionError(f"{source}: {len(missing)} missing key(s) for the model, e.g. {missing[:5]}.")
