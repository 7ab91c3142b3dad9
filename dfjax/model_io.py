"""Model folders: config.json plus one Orbax checkpoint per component, written atomically.

Layout of a folder:
    config.json        {"format": "dfjax-model", "version": 1, "<component>": {config fields}, ...}
    transformer/       Orbax checkpoint of the flat parameter dict (dfjax.params keys)
    text_encoder/      (optional) likewise
    vae/               (optional) likewise
    tokenizer/         (optional) tokenizer files, loaded with transformers

A component given as a dict is one Orbax save. One given as an iterator of (key, array) pairs (conversion
converts tensor by tensor) is written as it comes, a batch of about `flush_bytes` at a time, through Orbax's
partial saving (the checkpoint is then one level down, in its "state" item), so host memory holds one batch,
never the component: the 14B DiT is 28 GB in bf16.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import jax
import numpy as np

FORMAT = "dfjax-model"
VERSION = 1
COMPONENTS = ("transformer", "text_encoder", "vae")
FLUSH_BYTES = 1 << 30  # a streamed component is written in batches of about this many bytes


class ModelFolderError(ValueError):
    """A model folder that is missing, incomplete or does not match what the caller asked for."""


def write_model_folder(
    out: str | Path,
    config: Mapping[str, dict],
    params: Mapping[str, Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]],
    copy_dirs: Mapping[str, str | Path] | None = None,
    overwrite: bool = False,
    flush_bytes: int = FLUSH_BYTES,
) -> Path:
    """Writes a complete model folder to a temporary sibling, then renames it into place.

    A component's parameters are a dict, or an iterator of (key, array) written batch by batch (see above).
    A failure or interruption at any point, a conversion error raised by such an iterator included, leaves
    nothing under `out`.
    """
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ModelFolderError(f"{out} already exists; choose another output path or pass --overwrite.")
    unknown = set(params) - set(COMPONENTS)
    if unknown:
        raise ModelFolderError(f"unknown component(s) {sorted(unknown)}; known: {COMPONENTS}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = {"format": FORMAT, "version": VERSION, **{k: dict(v) for k, v in config.items()}}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for name, flat in params.items():
            if isinstance(flat, Mapping):
                with ocp.StandardCheckpointer() as ckpt:
                    ckpt.save(tmp / name, {k: np.asarray(v) for k, v in flat.items()})
            else:
                _write_streamed(tmp / name, flat, flush_bytes)
        for name, src in (copy_dirs or {}).items():
            shutil.copytree(src, tmp / name)
        if out.exists():  # overwrite: move the old folder aside only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_streamed(path: Path, items: Iterable[tuple[str, np.ndarray]], flush_bytes: int) -> None:
    from orbax.checkpoint.experimental.v1 import partial

    batch, size, saved = {}, 0, False
    for key, value in items:
        batch[key] = np.asarray(value)
        size += batch[key].nbytes
        if size >= flush_bytes:
            partial.save(path, batch)  # each batch goes to disk (its own OCDBT files) and is dropped here
            batch, size, saved = {}, 0, True
    if batch or not saved:
        partial.save(path, batch)
    partial.finalize(path)


def _checkpoint_dir(path: Path) -> Path:
    """Where a component's PyTree checkpoint is: the folder itself, or the item of a partially saved one."""
    if (path / "_METADATA").is_file():
        return path
    items = [d for d in sorted(path.iterdir()) if (d / "_METADATA").is_file()] if path.is_dir() else []
    if len(items) != 1:
        raise ModelFolderError(f"{path} holds no Orbax checkpoint; the folder is damaged: convert it again.")
    return items[0]


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFolderError(
            f"{folder} is not a dfjax model folder (no config.json); make one with `dfjax convert SRC {folder}`."
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise ModelFolderError(f"{cfg_path} is not a dfjax model config (format={meta.get('format')!r}).")
    if meta.get("version") != VERSION:
        raise ModelFolderError(f"{cfg_path} has format version {meta.get('version')}; this dfjax reads {VERSION}.")
    return meta


def has_component(folder: str | Path, name: str) -> bool:
    return (Path(folder) / name).is_dir() and name in read_config(folder)


def load_params(
    folder: str | Path,
    name: str,
    abstract: Mapping[str, jax.ShapeDtypeStruct],
    shardings: Mapping[str, jax.sharding.Sharding] | jax.sharding.Sharding | None = None,
) -> dict[str, jax.Array]:
    """Restores one component straight onto devices, in the dtypes and shardings of `abstract`.

    `abstract` is the model's own parameter spec (dfjax.params.abstract_params); a checkpoint with other
    keys or shapes is an error naming the difference.
    """
    import orbax.checkpoint as ocp

    path = Path(folder).absolute() / name
    if not path.is_dir():
        raise ModelFolderError(f"{folder} has no '{name}' part; convert it with `dfjax convert` (see --help).")
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {}
    for k, a in abstract.items():
        s = shardings[k] if isinstance(shardings, Mapping) else shardings
        target[k] = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    path = _checkpoint_dir(path)
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path)
        stored = _stored_shapes(meta)
        missing = sorted(set(target) - set(stored))
        extra = sorted(set(stored) - set(target))
        if missing or extra:
            raise ModelFolderError(
                f"{path}: checkpoint does not match the model config: missing {missing[:5]}, unexpected {extra[:5]}."
            )
        bad = [(k, stored[k], target[k].shape) for k in target if tuple(stored[k]) != tuple(target[k].shape)]
        if bad:
            k, got, want = bad[0]
            raise ModelFolderError(f"{path}: '{k}' is stored with shape {tuple(got)}, the config expects {tuple(want)}.")
        return ckpt.restore(path, target)


def _stored_shapes(meta) -> dict[str, tuple]:
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return {k: tuple(v.shape) for k, v in dict(tree).items()}
