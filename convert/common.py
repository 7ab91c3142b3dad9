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


def read_torch_file(path: str | Path) -> dict:
    """A .pt/.pth/.bin file as a (possibly nested) dict of torch tensors, read with weights_only=True."""
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # mmap needs the new zipfile format; old-format files load without it
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code: say so instead of a pickle trace
        raise ConversionError(f"{path}: cannot be read as a weights-only torch file ({e}).") from e
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a dict of tensors, found {type(obj).__name__}.")
    return dict(obj)


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
    from safetensors import safe_open

    out = {}
    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                if k in out:
                    raise ConversionError(f"key {k} appears in more than one file ({p}).")
                out[k] = LazyTensor(functools.partial(_safetensors_tensor, p, k), f.get_slice(k).get_shape())
    return out


def read_state_dict(src: str | Path, subkey: str | None = None) -> dict[str, LazyTensor]:
    """Reads a checkpoint file or folder (safetensors shards or one torch file) into {key: LazyTensor}: the keys and
    shapes now, each tensor when it is converted (torch files are memory-mapped where their format allows).

    `subkey` picks a top-level entry of a torch file (e.g. "generator_ema"); its absence is an error
    that lists what the file has.
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
    obj = read_torch_file(src)
    if subkey is not None:
        if subkey not in obj:
            raise ConversionError(f"{src}: has no entry '{subkey}' (top-level entries: {sorted(obj)[:10]}).")
        obj = obj[subkey]
        if not isinstance(obj, Mapping):
            raise ConversionError(f"{src}: entry '{subkey}' is not a dict of tensors.")
    return {k: LazyTensor(lambda v=v: v, v.shape) for k, v in _flatten_nested(obj).items()}


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
