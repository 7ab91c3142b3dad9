"""Many prompts over many groups of devices and hosts: a deterministic split, a manifest, and resume.

Everything here is plain Python (no jax), so it is tested without devices or processes.

- A job is one prompt of the prompt file with its index, seed and output path. A name carries a
  short key of what made the video (prompt, seed, and the run's settings: model, options, plan):
  `00042_seed7_3f9c0a1b2e.mp4`, so an edited, inserted or reordered prompt, or a changed option, is
  made again instead of being passed off by an old file. Names of older versions (`00042_seed7.mp4`,
  no key) are never reused: legacy_outputs lists them so the command can say so.
- The jobs are dealt round robin over the data groups of the whole run (MeshConfig.local_groups
  gives each process its groups' global indices): group g of G gets jobs g, g+G, g+2G, ... The
  split depends only on the prompt list and G, never on which files exist, so every process
  computes the same split on its own, also when their output folders are local disks.
- An mp4 appears under its final name only when complete (dfjax.video.Mp4Writer writes
  `.NAME.partial.mp4` and renames it), so resume is: skip every job whose final file exists.
  A crash leaves at most a stale partial file, which the job's group removes before redoing it.
- Each process appends one JSON line per finished video to its own manifest
  (`manifest-00003.jsonl`): prompt, seed, file, group, process, timings. Appends are line-sized
  and flushed, so a killed process leaves at worst one torn last line, which readers skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Job:
    index: int  # position in the prompt file (blank lines not counted)
    prompt: str
    seed: int
    out: Path


def content_key(prompt: str, seed: int, settings: str) -> str:
    return hashlib.sha256(json.dumps([prompt, int(seed), settings]).encode()).hexdigest()[:10]


def video_name(index: int, prompt: str, seed: int, settings: str = "") -> str:
    return f"{index:05d}_seed{seed}_{content_key(prompt, seed, settings)}.mp4"


def make_jobs(items: Sequence[tuple[str, int]], out_dir: str | Path, settings: str = "") -> list[Job]:
    """Jobs for (prompt, seed) items (cli.read_prompts), writing into out_dir; `settings` fingerprints everything
    else that shapes a video (the model, the run's options, the plan)."""
    out_dir = Path(out_dir)
    return [Job(i, p, int(s), out_dir / video_name(i, p, int(s), settings)) for i, (p, s) in enumerate(items)]


def legacy_outputs(jobs: Iterable[Job]) -> list[Path]:
    """Videos of these jobs' indices and seeds under the names of dfjax versions that keyed nothing else
    (`00042_seed7.mp4`): what made them is unknown, so they are never taken for done."""
    return [p for j in jobs if (p := j.out.with_name(f"{j.index:05d}_seed{j.seed}.mp4")).is_file()]


def split_jobs(jobs: Sequence[Job], num_groups: int, groups: Iterable[int] | None = None) -> dict[int, list[Job]]:
    """{group: its jobs} for the given global group indices (default: all), dealt round robin by job index."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}.")
    groups = range(num_groups) if groups is None else list(groups)
    for g in groups:
        if not 0 <= g < num_groups:
            raise ValueError(f"group {g} is out of range for {num_groups} group(s).")
    return {g: [j for j in jobs if j.index % num_groups == g] for g in groups}


# ------------------------------------------------------------------------------------------------ resume

def partial_path(out: Path) -> Path:
    """The temporary name dfjax.video.Mp4Writer writes before renaming to `out`."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial.mp4")


def is_complete(out: Path) -> bool:
    out = Path(out)
    return out.is_file() and out.stat().st_size > 0


def pending(jobs: Iterable[Job], overwrite: bool = False) -> list[Job]:
    """The jobs still to do: all of them with overwrite, else those without a complete output file."""
    return [j for j in jobs if overwrite or not is_complete(j.out)]


def clean_partials(jobs: Iterable[Job]) -> list[Path]:
    """Removes stale partial files left by a crash for these jobs (a job belongs to one group, so no
    other process or thread can be writing them); returns what was removed."""
    removed = []
    for j in jobs:
        p = partial_path(j.out)
        if p.exists():
            p.unlink()
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------ manifest

def manifest_path(out_dir: str | Path, process_index: int) -> Path:
    return Path(out_dir) / f"manifest-{process_index:05d}.jsonl"


def job_record(job: Job, *, process: int, group: int, timing: Mapping[str, Any] | None = None) -> dict:
    return {
        "index": job.index,
        "prompt": job.prompt,
        "seed": job.seed,
        "file": str(job.out),
        "process": process,
        "group": group,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timing": dict(timing or {}),
    }


class Manifest:
    """An append-only JSONL file of finished jobs; safe to share between the threads of one process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def records(self) -> list[dict]:
        return read_manifest(self.path)


def read_manifest(path: str | Path) -> list[dict]:
    """The records of one manifest; a torn last line (a process killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a JSON line ({e}); the manifest is damaged.") from None
    return out


def read_manifests(out_dir: str | Path) -> list[dict]:
    """Every process's records under out_dir (and its per-host subfolders), one per job index (the latest)."""
    by_index: dict[int, dict] = {}
    for p in sorted(Path(out_dir).glob("**/manifest-*.jsonl")):
        for r in read_manifest(p):
            by_index[r["index"]] = r
    return [by_index[i] for i in sorted(by_index)]


# ------------------------------------------------------------------------------------------------ running

def run_jobs(jobs: Sequence[Job], make_video: Callable[[Job], Mapping[str, Any] | None], manifest: Manifest, *,
             process: int, group: int, overwrite: bool = False,
             on_skip: Callable[[Job], None] | None = None) -> list[dict]:
    """One group's loop: skip complete outputs, redo the rest, append a manifest record after each video.

    make_video(job) writes job.out (atomically) and returns its timings (a dict) or None.
    """
    todo = pending(jobs, overwrite)
    if on_skip is not None:
        for j in jobs:
            if j not in todo:
                on_skip(j)
    clean_partials(todo)
    records = []
    for job in todo:
        timing = make_video(job)
        rec = job_record(job, process=process, group=group, timing=timing)
        manifest.append(rec)
        records.append(rec)
    return records


def run_parallel(tasks: Sequence[Callable[[], Any]]) -> list[Any]:
    """Runs tasks (one per local data group) in threads and returns their results in order.

    JAX dispatch is asynchronous and releases the GIL while devices work, so one thread per group
    keeps every group busy. Every task runs to its end even if another fails (one bad prompt does not
    stop the other groups); then the first error is raised.
    """
    if len(tasks) == 1:
        return [tasks[0]()]
    results: list[Any] = [None] * len(tasks)
    errors: list[tuple[int, BaseException]] = []

    def run(i, task):
        try:
            results[i] = task()
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i, t), name=f"dfjax-group-{i}") for i, t in enumerate(tasks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise sorted(errors, key=lambda e: e[0])[0][1]
    return results
