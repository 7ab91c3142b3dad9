"""Prompt splitting, manifests and resume (pure functions), the distributed helpers, and one real
jax.distributed run of two local CPU processes."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from dfjax import distributed as dist
from dfjax import jobs as J

ROOT = Path(__file__).resolve().parent.parent


def items(n, seed=0):
    return [(f"prompt {i}", seed + i % 3) for i in range(n)]


# ------------------------------------------------------------------------------------------------ split

def test_job_names_are_keyed_by_what_makes_the_video(tmp_path):
    jobs = J.make_jobs([("a cat", 7), ("a dog", 0)], tmp_path, settings="run A")
    names = [j.out.name for j in jobs]
    assert [n[:len("00000_seed7_")] for n in names] == ["00000_seed7_", "00001_seed0_"]
    assert [(j.index, j.prompt, j.seed) for j in jobs] == [(0, "a cat", 7), (1, "a dog", 0)]
    assert names == [j.out.name for j in J.make_jobs([("a cat", 7), ("a dog", 0)], tmp_path, settings="run A")]
    # an edited prompt, another seed, other settings, an inserted line: another name, so it is made again
    for other in ([("a cat!", 7), ("a dog", 0)], [("a cat", 8), ("a dog", 0)]):
        assert J.make_jobs(other, tmp_path, "run A")[0].out.name != names[0]
    assert J.make_jobs([("a cat", 7)], tmp_path, "run B")[0].out.name != names[0]
    inserted = J.make_jobs([("a bird", 7), ("a cat", 7), ("a dog", 0)], tmp_path, "run A")
    assert {j.out.name for j in inserted}.isdisjoint(names)
    (tmp_path / "00001_seed0.mp4").write_bytes(b"old")  # an older dfjax's name: never taken for done
    assert J.legacy_outputs(jobs) == [tmp_path / "00001_seed0.mp4"]
    assert J.pending(jobs) == jobs


@pytest.mark.parametrize("n,groups", [(1, 1), (10, 3), (17, 8), (5, 8)])
def test_split_covers_every_job_once_round_robin_and_deterministically(tmp_path, n, groups):
    jobs = J.make_jobs(items(n), tmp_path)
    split = J.split_jobs(jobs, groups)
    seen = sorted(j.index for js in split.values() for j in js)
    assert seen == list(range(n))
    for g, js in split.items():
        assert [j.index for j in js] == list(range(g, n, groups))
    assert J.split_jobs(jobs, groups) == split
    # processes holding different groups compute the same split for their part
    half = J.split_jobs(jobs, groups, [g for g in range(groups) if g % 2])
    assert all(half[g] == split[g] for g in half)
    sizes = [len(js) for js in split.values()]
    assert max(sizes) - min(sizes) <= 1


def test_split_rejects_bad_groups(tmp_path):
    jobs = J.make_jobs(items(3), tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        J.split_jobs(jobs, 2, [2])
    with pytest.raises(ValueError, match="num_groups"):
        J.split_jobs(jobs, 0)


# ------------------------------------------------------------------------------------------------ resume

def test_partial_name_is_the_mp4_writers(tmp_path):
    from dfjax.video import Mp4Writer

    out = tmp_path / "00003_seed1.mp4"
    w = Mp4Writer(out, 16)
    try:
        assert J.partial_path(out) == w.tmp
    finally:
        w.abort()


def test_pending_skips_complete_files_only_and_cleans_stale_partials(tmp_path):
    jobs = J.make_jobs(items(4), tmp_path)
    jobs[0].out.write_bytes(b"mp4")  # complete
    jobs[1].out.write_bytes(b"")  # empty: not complete
    J.partial_path(jobs[2].out).write_bytes(b"half")  # a crash mid-video
    todo = J.pending(jobs)
    assert [j.index for j in todo] == [1, 2, 3]
    assert [j.index for j in J.pending(jobs, overwrite=True)] == [0, 1, 2, 3]
    assert J.clean_partials(todo) == [J.partial_path(jobs[2].out)]
    assert not J.partial_path(jobs[2].out).exists()


def test_run_jobs_resumes_and_writes_a_manifest(tmp_path):
    jobs = J.make_jobs(items(5), tmp_path)
    made = []

    def make_video(job, fail_at=None):
        if job.index == fail_at:
            J.partial_path(job.out).write_bytes(b"half")
            raise RuntimeError("killed")
        made.append(job.index)
        job.out.write_bytes(b"mp4")
        return {"e2e_s": 1.5, "frames": 81}

    manifest = J.Manifest(J.manifest_path(tmp_path, 3))
    mine = J.split_jobs(jobs, 2, [1])[1]  # jobs 1, 3
    with pytest.raises(RuntimeError):
        J.run_jobs(mine, lambda j: make_video(j, fail_at=3), manifest, process=3, group=1)
    assert made == [1] and J.partial_path(jobs[3].out).exists() and not jobs[3].out.exists()
    skipped = []
    recs = J.run_jobs(mine, make_video, manifest, process=3, group=1, on_skip=lambda j: skipped.append(j.index))
    assert made == [1, 3] and skipped == [1] and not J.partial_path(jobs[3].out).exists()
    assert [r["index"] for r in recs] == [3]
    assert J.run_jobs(mine, make_video, manifest, process=3, group=1) == []  # all done: nothing redone
    records = manifest.records()
    assert [(r["index"], r["seed"], r["process"], r["group"]) for r in records] == [(1, 1, 3, 1), (3, 0, 3, 1)]
    assert records[0]["prompt"] == "prompt 1" and records[0]["file"] == str(jobs[1].out)
    assert records[0]["timing"] == {"e2e_s": 1.5, "frames": 81}
    assert manifest.path.name == "manifest-00003.jsonl"


def test_manifest_threads_torn_lines_and_merge(tmp_path):
    m = J.Manifest(tmp_path / "process-00000" / "manifest-00000.jsonl")
    jobs = J.make_jobs(items(40), tmp_path)
    threads = [threading.Thread(target=lambda js=js: [m.append(J.job_record(j, process=0, group=g)) for j in js])
               for g, js in J.split_jobs(jobs, 4).items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["index"] for r in m.records()) == list(range(40))
    other = tmp_path / "process-00001" / "manifest-00001.jsonl"
    other.parent.mkdir()
    other.write_text(json.dumps({"index": 40, "prompt": "p"}) + "\n" + '{"index": 41, "pro')  # killed mid-line
    merged = J.read_manifests(tmp_path)
    assert [r["index"] for r in merged] == list(range(41))
    other.write_text('{"index": 4\n' + json.dumps({"index": 40}) + "\n")
    with pytest.raises(ValueError, match="damaged"):
        J.read_manifest(other)


def test_run_parallel_keeps_order_and_raises_after_all_finish():
    done = []
    assert J.run_parallel([lambda i=i: i * i for i in range(4)]) == [0, 1, 4, 9]

    def bad():
        raise KeyError("group 1")

    with pytest.raises(KeyError):
        J.run_parallel([lambda: done.append(0), bad, lambda: done.append(2)])
    assert sorted(done) == [0, 2]


# ------------------------------------------------------------------------------------------------ distributed (pure)

@pytest.mark.parametrize("env,want", [
    ({}, None),
    ({"DFJAX_COORDINATOR": "h:1", "DFJAX_NUM_PROCESSES": "2", "DFJAX_PROCESS_ID": "0"}, "dfjax"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
])
def test_detect_launcher(env, want):
    assert dist.detect_launcher(env) == want


def test_initialize_single_process_and_bad_flags():
    assert dist.initialize("off") == dist.ProcessInfo(0, 1, "single")
    assert dist.initialize("auto", env={}) == dist.ProcessInfo(0, 1, "single")
    with pytest.raises(ValueError, match="all three"):
        dist.initialize(coordinator="localhost:1234")
    with pytest.raises(ValueError, match="mode"):
        dist.initialize("maybe")


def test_fingerprints_and_disagreements():
    from dfjax.config import WanConfig
    from dfjax.sharding import MeshConfig

    assert dist.fingerprint({"a": 1, "b": (1, 2)}) == dist.fingerprint({"b": [1, 2], "a": 1})
    assert dist.fingerprint(WanConfig.tiny()) != dist.fingerprint(WanConfig.tiny(num_heads=8, dim=96))
    assert dist.fingerprint(MeshConfig(tensor=2)) == dist.fingerprint(MeshConfig(tensor=2))
    parts = {"run": {"frames": 81}, "mesh": MeshConfig(tensor=2), "prompts": ["a", "b"]}
    names, v0 = dist.agreement_vector(parts)
    _, v1 = dist.agreement_vector({**parts, "prompts": ["a", "c"]})
    _, v2 = dist.agreement_vector({**parts, "extra": 1})
    assert v0.shape == v1.shape == v2.shape == (2 * (dist.MAX_PARTS + 1),)
    assert dist.disagreements(names, np.stack([v0, v0, v0])) == []
    lines = dist.disagreements(names, np.stack([v0, v0, v1, v2]))
    assert lines == ["process 2 differs from process 0 in: prompts",
                     "process 3 compares other parts than process 0 (a different dfjax version?)"]
    dist.check_agreement(parts, dist.ProcessInfo(0, 1, "single"))  # one process: nothing to compare


def test_model_fingerprint_and_host_folders(tmp_path):
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"transformer": {"dim": 48}}))
    (tmp_path / "m" / "transformer" / "w").write_bytes(b"x" * 10)
    a = dist.model_fingerprint(tmp_path / "m")
    (tmp_path / "m" / "transformer" / "w").write_bytes(b"x" * 9)  # a partly copied folder
    assert dist.fingerprint(a) != dist.fingerprint(dist.model_fingerprint(tmp_path / "m"))
    info = dist.ProcessInfo(3, 4, "slurm")
    assert dist.host_output_dir(tmp_path, info, per_host=False) == tmp_path
    assert dist.host_output_dir(tmp_path, info, per_host=True) == tmp_path / "process-00003"


# ------------------------------------------------------------------------------------------------ two real processes

CHILD = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    from dfjax import distributed as dist
    from dfjax.sharding import MeshConfig
    info = dist.initialize()
    out = {"index": info.index, "count": info.count, "how": info.how}
    parts = {"run": {"frames": 81}, "prompts": ["a", "b"], "model": {"seed": 0}}
    dist.check_agreement(parts, info)
    out["groups_t2"] = [g for g, _ in MeshConfig(tensor=2).local_groups()]
    out["groups_t1"] = [g for g, _ in MeshConfig(tensor=1).local_groups()]
    try:
        dist.check_agreement({**parts, "model": {"seed": info.index}}, info)
        out["mismatch"] = None
    except dist.AgreementError as e:
        out["mismatch"] = str(e)
    with open(f"{sys.argv[1]}/{info.index}.json", "w") as f:
        json.dump(out, f)
    jax.distributed.shutdown()
""")


def test_two_local_processes_initialize_split_groups_and_check_agreement(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    rc = dist.launch(2, [sys.executable, "-c", CHILD, str(tmp_path)], gpus=False, env=env)
    assert rc == 0
    res = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    assert [(r["index"], r["count"], r["how"]) for r in res] == [(0, 2, "dfjax"), (1, 2, "dfjax")]
    assert [r["groups_t2"] for r in res] == [[0], [1]]  # tensor groups stay inside a process
    assert [r["groups_t1"] for r in res] == [[0, 1], [2, 3]]
    for r in res:
        assert "process 1 differs from process 0 in: model" in r["mismatch"]


def test_launch_reports_a_failing_process(tmp_path):
    env = dict(os.environ)
    code = "import os, sys; sys.exit(3 if os.environ['DFJAX_PROCESS_ID'] == '1' else 0)"
    assert dist.launch(2, [sys.executable, "-c", code], gpus=False, env=env) == 3


def test_local_work_of_a_single_process(tmp_path):
    from dfjax.sharding import MeshConfig

    info = dist.ProcessInfo(0, 1, "single")
    work, manifest, folder = dist.local_work(items(5), tmp_path / "out", MeshConfig(data=-1, tensor=1), info,
                                             per_host=True)
    assert folder == tmp_path / "out" / "process-00000" and folder.is_dir()
    n = len(work)  # one group per local device
    assert [w.group for w in work] == list(range(n)) and sum(len(w.jobs) for w in work) == 5
    assert all(w.mesh.shape == {"data": 1, "tensor": 1} for w in work)

    def make_video(w, job):
        job.out.write_bytes(b"mp4")
        return {"group": w.group}

    recs = dist.run_local_work(work, make_video, manifest, info)
    assert sorted(r["index"] for r in recs) == list(range(5))
    assert dist.run_local_work(work, make_video, manifest, info) == []  # resumed: all done
    assert len(J.read_manifests(tmp_path / "out")) == 5
