"""Several processes (hosts, or one per GPU): start-up, who prints, output folders, and an agreement check.

Call `initialize()` first thing, before any JAX computation. It starts jax.distributed when the
process is one of several:
  explicit    coordinator, num_processes and process_id given (CLI flags)
  dfjax       DFJAX_COORDINATOR / DFJAX_NUM_PROCESSES / DFJAX_PROCESS_ID (set by `launch` below)
  slurm       srun with more than one task (SLURM_NTASKS > 1); JAX reads the rest from SLURM
  ompi        mpirun with more than one rank (OMPI_COMM_WORLD_SIZE > 1)
  tpu         a multi-host TPU slice that names its workers (TPU_WORKER_HOSTNAMES/TPU_PROCESS_ADDRESSES)
mode="on" calls jax.distributed.initialize() in any case (JAX's own detection; use it on Cloud
TPU VMs, where the worker list comes from the metadata server), mode="off" never does.

The processes of a run never exchange tensors in dfjax: every data group lives inside one process
(dfjax.sharding.MeshConfig). What they must share is the question: the same model, prompts, run and
mesh config. `check_agreement` all-gathers a fingerprint of each and stops every process with the
list of what differs, before any video is made.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

MAX_PARTS = 15  # fingerprints compared by check_agreement (a fixed size, so every process gathers the same shape)


class AgreementError(ValueError):
    """The processes of one run were started with different configs, models or prompts."""


@dataclass(frozen=True)
class ProcessInfo:
    index: int
    count: int
    how: str  # "single", "explicit", "dfjax", "slurm", "ompi", "tpu" or "on"

    @property
    def is_main(self) -> bool:
        return self.index == 0


# ------------------------------------------------------------------------------------------------ start-up

def detect_launcher(env: Mapping[str, str]) -> str | None:
    """Which multi-process launcher started this process, from its environment (None: a single process)."""
    def count(name):
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    if "DFJAX_COORDINATOR" in env:
        return "dfjax"
    if "SLURM_PROCID" in env and max(count("SLURM_NTASKS"), count("SLURM_STEP_NUM_TASKS")) > 1:
        return "slurm"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if len([h for h in env.get(name, "").split(",") if h.strip()]) > 1:
            return "tpu"
    return None


def initialize(mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, env: Mapping[str, str] | None = None,
               timeout_s: int = 300) -> ProcessInfo:
    """Starts jax.distributed if this is one of several processes (see the module docstring)."""
    import jax

    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}.")
    env = os.environ if env is None else env
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given) and None in given:
        raise ValueError("give all three of --coordinator HOST:PORT, --num-processes N and --process-id I, or none.")
    if mode == "off":
        return ProcessInfo(0, 1, "single")
    kw: dict[str, Any] = {}
    if coordinator is not None:
        how = "explicit"
        kw = dict(coordinator_address=coordinator, num_processes=int(num_processes), process_id=int(process_id))
    else:
        how = detect_launcher(env)
        if how == "dfjax":
            kw = dict(coordinator_address=env["DFJAX_COORDINATOR"], num_processes=int(env["DFJAX_NUM_PROCESSES"]),
                      process_id=int(env["DFJAX_PROCESS_ID"]))
    if how is None and mode == "on":
        how = "on"
    if how is None or kw.get("num_processes") == 1:
        return ProcessInfo(0, 1, "single")
    jax.distributed.initialize(initialization_timeout=timeout_s, **kw)
    return ProcessInfo(jax.process_index(), jax.process_count(), how)


def process_info() -> ProcessInfo:
    import jax

    n = jax.process_count()
    return ProcessInfo(jax.process_index(), n, "single" if n == 1 else "initialized")


def log(*args, info: ProcessInfo | None = None, all_processes: bool = False, **kw) -> None:
    """print() on process 0 only (or on every process, prefixed with its index)."""
    info = info or process_info()
    if all_processes and info.count > 1:
        print(f"[process {info.index}/{info.count}]", *args, **{"flush": True, **kw})
    elif info.is_main:
        print(*args, **{"flush": True, **kw})


def host_output_dir(base: str | Path, info: ProcessInfo, per_host: bool) -> Path:
    """Where this process writes: `base` (a shared folder: NFS, a bucket mount) or, per host,
    `base/process-00003` (local disks, or to keep hosts' files apart)."""
    base = Path(base)
    return base / f"process-{info.index:05d}" if per_host else base


# ------------------------------------------------------------------------------------------------ agreement

def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, np.ndarray):
        return _canonical(value.tolist())
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def fingerprint(value: Any) -> str:
    """sha256 of a canonical JSON form of value (dataclasses, dicts, lists, numpy, paths)."""
    text = json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(folder: str | Path) -> dict:
    """What identifies a model folder without reading its weights: config.json and every file's size."""
    folder = Path(folder)
    files = sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file()
                   and p.name != "config.json")
    cfg = folder / "config.json"
    return {"config": json.loads(cfg.read_text()) if cfg.is_file() else None, "files": files}


def _words(hexdigest: str) -> list[int]:
    return [int(hexdigest[:8], 16), int(hexdigest[8:16], 16)]  # 64 bits of the digest


def agreement_vector(parts: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    """(sorted part names, uint32 [2 * (MAX_PARTS + 1)]): the names' fingerprint, then each part's."""
    names = sorted(parts)
    if len(names) > MAX_PARTS:
        raise ValueError(f"check_agreement compares at most {MAX_PARTS} parts, got {len(names)}.")
    words = _words(fingerprint(names))
    for n in names:
        words += _words(fingerprint(parts[n]))
    words += [0] * (2 * (MAX_PARTS + 1) - len(words))
    return names, np.asarray(words, dtype=np.uint32)


def disagreements(names: Sequence[str], table: np.ndarray) -> list[str]:
    """Lines naming, for each process that differs from process 0, the parts that differ."""
    table = np.asarray(table).reshape(len(table), -1)
    lines = []
    for p in range(1, len(table)):
        if np.array_equal(table[p], table[0]):
            continue
        if not np.array_equal(table[p, :2], table[0, :2]):
            lines.append(f"process {p} compares other parts than process 0 (a different dfjax version?)")
            continue
        bad = [n for i, n in enumerate(names) if not np.array_equal(table[p, 2 + 2 * i:4 + 2 * i],
                                                                   table[0, 2 + 2 * i:4 + 2 * i])]
        lines.append(f"process {p} differs from process 0 in: {', '.join(bad)}")
    return lines


def check_agreement(parts: Mapping[str, Any], info: ProcessInfo | None = None) -> None:
    """All processes must pass equal parts (e.g. run config, mesh config, model_fingerprint, prompts,
    plan, versions); otherwise every process raises AgreementError naming who differs in what."""
    info = info or process_info()
    names, local = agreement_vector(parts)
    if info.count == 1:
        return
    from jax.experimental import multihost_utils

    table = np.asarray(multihost_utils.process_allgather(local))
    lines = disagreements(names, table)
    if lines:
        mine = {n: fingerprint(parts[n])[:12] for n in names}
        raise AgreementError("the processes of this run disagree: " + "; ".join(lines) +
                             f". This process ({info.index}) has fingerprints {mine}. Start every process with "
                             "the same model folder (copied completely), prompts, flags and dfjax version.")


def versions() -> dict:
    """Library versions that must match across processes."""
    import flax
    import jax

    return {"jax": jax.__version__, "flax": flax.__version__, "python": sys.version.split()[0]}


# ------------------------------------------------------------------------------------------------ work of a process

@dataclass
class GroupWork:
    """One data group of this process: its global index, its mesh, and its share of the jobs."""

    group: int
    mesh: Any  # jax.sharding.Mesh: (1, tensor) for replicas, the whole mesh in batch mode
    jobs: list


def local_work(items: Sequence[tuple[str, int]], out_dir: str | Path, mesh_config, info: ProcessInfo | None = None,
               per_host: bool = False, settings: str = ""):
    """(this process's GroupWork list, its Manifest, the output folder) for a prompt list.

    Replicas: the jobs are dealt over all data groups of the run (dfjax.jobs.split_jobs) and this
    process keeps its groups' shares. Batch mode: one group, the whole mesh (one process only).
    """
    from dfjax import jobs as J

    info = info or process_info()
    folder = host_output_dir(out_dir, info, per_host)
    folder.mkdir(parents=True, exist_ok=True)
    all_jobs = J.make_jobs(items, folder, settings)
    if mesh_config.data_mode == "batch":
        if info.count > 1:
            raise ValueError("data_mode 'batch' runs one program over the whole mesh of one process; across "
                             "several processes use 'replicas'.")
        work = [GroupWork(0, mesh_config.mesh(), all_jobs)]
    else:
        num_groups = mesh_config.device_grid().shape[0]
        groups = mesh_config.local_groups()
        split = J.split_jobs(all_jobs, num_groups, [g for g, _ in groups])
        work = [GroupWork(g, mesh, split[g]) for g, mesh in groups]
    return work, J.Manifest(J.manifest_path(folder, info.index)), folder


def run_local_work(work: Sequence[GroupWork], make_video, manifest, info: ProcessInfo | None = None,
                   overwrite: bool = False, on_skip=None) -> list[dict]:
    """Runs every group of this process side by side (one thread each); make_video(group_work, job)
    writes job.out and returns its timings. Returns the manifest records written."""
    from dfjax import jobs as J

    info = info or process_info()
    tasks = [lambda w=w: J.run_jobs(w.jobs, lambda job, w=w: make_video(w, job), manifest, process=info.index,
                                    group=w.group, overwrite=overwrite, on_skip=on_skip) for w in work]
    return [r for rs in J.run_parallel(tasks) for r in rs]


# ------------------------------------------------------------------------------------------------ launching

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: Sequence[str], devices_per_process: int | None = None, gpus: bool | None = None,
           port: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """Runs `argv` as nproc local processes that find each other through DFJAX_* variables.

    With GPUs, process i sees GPUs [i*k, (i+1)*k) (CUDA_VISIBLE_DEVICES, k = devices_per_process,
    default 1). Returns the first non-zero exit status (the others are then stopped), else 0.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}.")
    base = dict(os.environ if env is None else env)
    if gpus is None:
        gpus = "CUDA_VISIBLE_DEVICES" in base or Path("/dev/nvidiactl").exists()
    k = devices_per_process or 1
    visible = base.get("CUDA_VISIBLE_DEVICES")
    gpu_ids = visible.split(",") if visible else [str(i) for i in range(nproc * k)]
    if gpus and len(gpu_ids) < nproc * k:
        raise ValueError(f"{nproc} processes x {k} GPUs need {nproc * k} GPUs, {len(gpu_ids)} are visible.")
    coordinator = f"127.0.0.1:{port or free_port()}"
    procs = []
    for i in range(nproc):
        e = dict(base, DFJAX_COORDINATOR=coordinator, DFJAX_NUM_PROCESSES=str(nproc), DFJAX_PROCESS_ID=str(i))
        if gpus:
            e["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids[i * k:(i + 1) * k])
        procs.append(subprocess.Popen(list(argv), env=e))
    rc = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed:
                rc = failed[0].returncode
                break
            time.sleep(0.2)
        rc = rc or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dfjax.distributed",
                                description="Run a command as several local processes (one per GPU or GPU group).")
    sub = p.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("launch", help="python -m dfjax.distributed launch --nproc 8 -- dfjax generate ...")
    lp.add_argument("--nproc", type=int, required=True)
    lp.add_argument("--devices-per-process", type=int, default=1, help="GPUs per process (its tensor group)")
    lp.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    lp.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("give the command to run after --")
    return launch(a.nproc, cmd, a.devices_per_process, port=a.port)


if __name__ == "__main__":
    sys.exit(main())
