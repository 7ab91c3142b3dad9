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

Every writer goes through `check_output`: an existing output is replaced (with `overwrite`) only if dfjax wrote
it, i.e. it is a model folder (or train-demo's raw folder) holding nothing but what dfjax puts there, or an
empty folder; anything else is refused before any work, and left untouched. A replacement is atomic: the new
folder is complete before the old one is moved aside and removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping

import jax
import numpy as np

FORMAT = "dfjax-model"
VERSION = 1
COMPONENTS = ("transformer", "text_encoder", "vae")
FLUSH_BYTES = 1 << 30  # a streamed component is written in batches of about this many bytes
RAW_FORMAT = "dfjax-raw-model"  # train-demo's npz folder, made where orbax is missing (dfjax.train_demo)
# What each kind of folder dfjax writes may hold: one holding anything else is not replaced.
MODEL_FOLDER_NAMES = frozenset({"config.json", "tokenizer", *COMPONENTS})
RAW_FOLDER_NAMES = frozenset({"raw_config.json", "params.npz", "tokenizer"})


class ModelFolderError(ValueError):
    """A model folder that is missing, incomplete or does not match what the caller asked for."""


def _json_format(path: Path):
    try:
        return json.loads(path.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def folder_kind(path: str | Path) -> str | None:
    """"empty", "model" (a dfjax model folder), "raw" (train-demo's npz folder) or None (anything else, a
    model folder with foreign files in it included)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return None
    names = {p.name for p in path.iterdir()}
    if not names:
        return "empty"
    if names <= MODEL_FOLDER_NAMES and _json_format(path / "config.json") == FORMAT:
        return "model"
    if names <= RAW_FOLDER_NAMES and _json_format(path / "raw_config.json") == RAW_FORMAT:
        return "raw"
    return None


def check_output(out: str | Path, overwrite: bool = False) -> Path:
    """Checks, before any heavy work, that `out` can be written: it is absent, or (overwrite) a folder dfjax
    wrote or an empty one, and its parent is writable. Returns the absolute path; raises ModelFolderError with
    the reason and the fix."""
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ModelFolderError(f"{out} exists and is not a folder; choose another output path.")
        if not overwrite:
            raise ModelFolderError(f"{out} already exists; choose another output path, or pass --overwrite to "
                                   "replace it (only a dfjax model folder or an empty folder is replaced).")
        cwd = Path.cwd().resolve()
        if cwd == out.resolve() or out.resolve() in cwd.parents:
            raise ModelFolderError(f"{out} holds the current directory; --overwrite will not replace it: choose "
                                   "another output path.")
        if folder_kind(out) is None:
            names = sorted(p.name for p in out.iterdir())
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ModelFolderError(
                f"{out} is not a folder dfjax wrote (it holds {shown}); dfjax replaces only its own model folders "
                "and empty folders: choose another output path, or move it away yourself.")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    try:  # the folder's future siblings are made here: ask the filesystem, not the permission bits
        probe = parent / f".{out.name}.probe-{secrets.token_hex(4)}"
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise ModelFolderError(f"cannot write {out}: {parent} is not writable ({e.strerror or e}); choose another "
                               "output path.") from e
    return out


def _new_sibling(out: Path, tag: str) -> Path:
    """A fresh hidden folder next to `out`, made with the user's umask (tempfile.mkdtemp would make it 0700)."""
    while True:
        path = out.parent / f".{out.name}.{tag}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


@contextmanager
def staged_folder(out: str | Path, overwrite: bool = False):
    """Yields an empty folder beside `out` to fill; when the block ends normally it becomes `out` (an old `out`,
    which check_output allowed to be replaced, goes only after that), and on any error or interruption it is
    removed, leaving `out` as it was."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(out, "tmp")
    try:
        yield tmp
        if out.exists():  # overwrite: move the old folder aside only once the new one is complete
            check_output(out, overwrite)  # still replaceable after the work
            old = _new_sibling(out, "old")
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_folder(
    out: str | Path,
    config: Mapping[str, dict],
    params: Mapping[str, Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]],
    copy_dirs: Mapping[str, str | Path] | None = None,
    overwrite: bool = False,
    flush_bytes: int = FLUSH_BYTES,
) -> Path:
    """Writes a complete model folder to a temporary sibling, then renames it into place (staged_folder).

    A component's parameters are a dict, or an iterator of (key, array) written batch by batch (see above).
    A failure or interruption at any point, a conversion error raised by such an iterator included, leaves
    nothing under `out` (and an `out` being replaced as it was).
    """
    import orbax.checkpoint as ocp

    unknown = set(params) - set(COMPONENTS)
    if unknown:
        raise ModelFolderError(f"unknown component(s) {sorted(unknown)}; known: {COMPONENTS}.")
    with staged_folder(out, overwrite) as tmp:
        meta = {**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()},
                "format": FORMAT, "version": VERSION}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for name, flat in params.items():
            if isinstance(flat, Mapping):
                with ocp.StandardCheckpointer() as ckpt:
                    ckpt.save(tmp / name, {k: np.asarray(v) for k, v in flat.items()})
            else:
                _write_streamed(tmp / name, flat, flush_bytes)
        for name, src in (copy_dirs or {}).items():
            shutil.copytree(src, tmp / name)
    return Path(out).absolute()


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
        raise ModelFolderError(f"{path.parent}: its {path.name} part is damaged (no Orbax checkpoint in "
                               f"{path}); convert the model again with `dfjax convert`.")
    return items[0]


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFolderError(
            f"{folder} is not a dfjax model folder (no config.json); make one with `dfjax convert SRC {folder}`."
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ModelFolderError(f"{cfg_path} is damaged: not valid JSON ({e}); it may be truncated: convert the "
                               "model again with `dfjax convert`.") from e
    if not isinstance(meta, dict):
        raise ModelFolderError(f"{cfg_path} is not a dfjax model config (a JSON {type(meta).__name__}).")
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
        # Orbax/TensorStore errors of a damaged checkpoint are many and long: one line. Raised inside the except
        # block, the error keeps Orbax's (the reads still in flight) alive as its context: dropped, those reads
        # are cancelled and each prints an "Event loop is closed" traceback from a TensorStore thread.
        try:
            stored = _stored_shapes(ckpt.metadata(path))
        except Exception as e:
            raise _damaged(folder, name, e) from None
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
        try:
            return ckpt.restore(path, target)
        except Exception as e:
            raise _damaged(folder, name, e) from None


def _quiet_late_reads() -> None:
    """A failed Orbax read closes its event loop while TensorStore still reads the other arrays; each of those
    then fails too, and Python reports it later as an unraisable exception (a RuntimeError('Event loop is
    closed'), or a read coroutine dropped with its error and TensorStore spec): hundreds of lines after the
    one-line error. From the first failed read on, drop exactly those; anything else goes to the previous hook."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "dfjax_late_reads", False):
        return

    def hook(unraisable):
        exc, obj = unraisable.exc_value, unraisable.object
        late = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        dropped_read = getattr(getattr(obj, "cr_code", None), "co_filename", "").find("orbax") >= 0
        if not (late or dropped_read):
            previous(unraisable)

    hook.dfjax_late_reads = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_late_read_log_filter)  # "Future exception was never retrieved"


def _late_read_log_filter(record) -> bool:
    """False for asyncio's report of an Orbax read future whose error nobody awaited (see _quiet_late_reads)."""
    if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
        return True
    tb = record.exc_info[2]
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return False
        tb = tb.tb_next
    return "OCDBT" not in str(record.exc_info[1]) and "reading array" not in str(record.exc_info[1])


def _damaged(folder, name: str, e: BaseException) -> ModelFolderError:
    """One line for an Orbax/TensorStore failure: the most telling message of the exception chain (a
    TensorStore status such as 'NOT_FOUND: Error reading ...' where there is one)."""
    _quiet_late_reads()
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    lines = [str(x).strip().splitlines()[0] for x in chain if str(x).strip()]
    status = [m for m in lines if re.match(r"[A-Z_]{4,}: ", m)]
    why = (status or lines or [type(e).__name__])[0]
    why = why if len(why) <= 320 else why[:317] + "..."
    return ModelFolderError(f"{folder}: its {name} part is damaged or incomplete ({why}); convert the model again "
                            "with `dfjax convert`.")


def _stored_shapes(meta) -> dict[str, tuple]:
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return {k: tuple(v.shape) for k, v in dict(tree).items()}
