"""Meshes, rules and shardable head plans; and, on 8 fake CPU devices in a subprocess, the sharded AR
loop (baseline and Dummy Forcing) against one device on (data, tensor) = (1, 8), (2, 4), (8, 1).

The device checks run in a child process because the number of CPU devices is fixed when JAX's
backend starts, and the other test files of this pytest process have started it already. The child
(this file run as a script) computes everything once and writes a JSON report; the tests below read
it. XLA's backend optimisation is turned down in the child: compiling dominates its run time.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dfjax.dummy import DUMMY, NEIGHBOUR, SINK, HeadPlan, standard_table
from dfjax.dummy.dhp import solve_dhp
from dfjax.dummy.mesh import cache_group_sizes as group_sizes_of
from dfjax.dummy.mesh import plan_is_shardable, shardable_plan
from dfjax.sharding import CACHE_AXES, MeshConfig, Rules, param_logical_axes

ROOT = Path(__file__).resolve().parent.parent
MESHES = ((1, 8), (2, 4), (8, 1))

# ------------------------------------------------------------------------------------------------ rules


def test_default_rules_give_the_tensor_parallel_specs():
    r = Rules()
    assert r.spec(("embed", "heads")) == P(None, "tensor")  # q/k/v columns
    assert r.spec(("heads", "embed")) == P("tensor", None)  # o rows
    assert r.spec(("embed", "mlp")) == P(None, "tensor")
    assert r.spec(CACHE_AXES) == P("data", None, "tensor", None)
    assert r.spec(("embed", "embed")) == P(None, None)


def test_rules_refuse_collisions_unknown_names_and_axes():
    r = Rules().with_overrides({"mlp": "data"})
    assert r.spec(("embed", "mlp")) == P(None, "data")
    with pytest.raises(ValueError, match="both 'batch' and 'mlp'.*'data'"):
        r.spec(("batch", "mlp"))
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'vocab'"):
        Rules().spec(("vocab",))
    with pytest.raises(ValueError, match="unknown logical axis name"):
        Rules().with_overrides({"hedas": "tensor"})
    with pytest.raises(ValueError, match="mesh has no axis 'pipe'"):
        Rules().with_overrides({"heads": "pipe"}).spec(("heads",))
    with pytest.raises(ValueError, match="more than once"):
        Rules((("heads", "tensor"), ("heads", None)))
    with pytest.raises(ValueError, match="repeats a mesh axis"):
        Rules((("heads", ("tensor", "tensor")),))
    with pytest.raises(ValueError, match="unknown logical axis"):
        MeshConfig(rules={"nope": None})


def test_every_dit_parameter_has_logical_axes():
    from flax import nnx

    from dfjax.config import WanConfig
    from dfjax.model.transformer import WanDiT
    from dfjax.params import abstract_params

    cfg = WanConfig.wan_14b()
    abstract = abstract_params(lambda: WanDiT(cfg, nnx.Rngs(0)))
    for key, a in abstract.items():
        assert len(param_logical_axes(key)) == len(a.shape), key
    want = {
        "blocks.7.self_attn.q.kernel": ("embed", "heads"),
        "blocks.7.cross_attn.v.bias": ("heads",),
        "blocks.7.self_attn.norm_k": ("heads",),
        "blocks.7.cross_attn.o.kernel": ("heads", "embed"),
        "blocks.7.self_attn.o.bias": ("embed",),
        "blocks.7.ffn_in.kernel": ("embed", "mlp"),
        "blocks.7.ffn_out.kernel": ("mlp", "embed"),
        "time_projection.kernel": ("embed", "embed_out"),
        "head_modulation": ("modulation", "embed"),
    }
    assert {k: param_logical_axes(k) for k in want} == want
    with pytest.raises(ValueError, match="no logical axes"):
        param_logical_axes("blocks.0.self_attn.lora_a")


# ------------------------------------------------------------------------------------------------ mesh config

def test_mesh_config_files_load():
    files = sorted((ROOT / "configs").glob("mesh-*.json"))
    assert {f.stem for f in files} >= {"mesh-1gpu", "mesh-8gpu-tensor", "mesh-8gpu-data", "mesh-tpu-pod"}
    loaded = {f.stem: MeshConfig.load(f) for f in files}
    assert loaded["mesh-8gpu-tensor"] == MeshConfig(data=1, tensor=8)
    assert loaded["mesh-8gpu-data"] == MeshConfig(data=-1, tensor=1)
    assert MeshConfig.load("mesh-tpu-pod") == loaded["mesh-tpu-pod"]  # a preset by name
    assert MeshConfig.from_dict(MeshConfig(tensor=2, rules={"mlp": None}).to_dict()) == MeshConfig(
        tensor=2, rules={"mlp": None})


def test_mesh_config_errors(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"data": 2, "tensr": 4}))
    with pytest.raises(ValueError, match="unknown field.*tensr"):
        MeshConfig.load(bad)
    y = tmp_path / "m.yaml"
    y.write_text("data: 2\ntensor: 4\ndata_mode: batch\n")
    assert MeshConfig.load(y) == MeshConfig(data=2, tensor=4, data_mode="batch")
    with pytest.raises(ValueError, match="does not exist"):
        MeshConfig.load(tmp_path / "none.json")
    with pytest.raises(ValueError, match="data_mode"):
        MeshConfig(data_mode="pipeline")
    with pytest.raises(ValueError, match="tensor size"):
        MeshConfig(tensor=0)


FakeDevice = namedtuple("FakeDevice", "id process_index")


def test_device_grid_keeps_tensor_groups_inside_processes():
    devices = [FakeDevice(10 * p + i, p) for p in (1, 0) for i in (3, 2, 1, 0)]  # 2 hosts x 4, shuffled
    grid = MeshConfig(tensor=2).device_grid(devices)
    assert [[(d.process_index, d.id) for d in row] for row in grid] == [
        [(0, 0), (0, 1)], [(0, 2), (0, 3)], [(1, 10), (1, 11)], [(1, 12), (1, 13)]]
    assert MeshConfig(tensor=4).device_grid(devices).shape == (2, 4)
    assert MeshConfig(data=1, tensor=4).device_grid(devices).shape == (1, 4)  # the first group only
    with pytest.raises(ValueError, match="tensor groups stay inside one host"):
        MeshConfig(tensor=8).device_grid(devices)
    with pytest.raises(ValueError, match="needs 12 devices"):
        MeshConfig(data=3, tensor=4).device_grid(devices)


# ------------------------------------------------------------------------------------------------ shardable plans

def retained(plan: HeadPlan, scores) -> float:
    """DHP's objective (release normalisation): sink heads keep F0, neighbour heads F1."""
    s = np.asarray(scores, dtype=np.float64)
    f0, f1 = s[..., 0] / s[..., 0].sum(), s[..., 1] / s[..., 1].sum()
    t = np.asarray(plan.head_types)
    return float(np.sum(np.where(t == SINK, f0, 0.0) + np.where(t == NEIGHBOUR, f1, 0.0)))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("tensor,heads", [(2, 8), (4, 8), (8, 16), (4, 12)])
def test_shardable_plan_splits_every_group_and_keeps_the_dummy_budget(packed, tensor, heads):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        scores = rng.random((5, heads, 3)) ** 3
        n_dummy = int(rng.integers(0, 5 * heads + 1))
        plan = HeadPlan.from_scores(scores, n_dummy, table=standard_table(packed_dummy=packed))
        out = shardable_plan(plan, tensor)
        assert plan_is_shardable(out, tensor), group_sizes_of(out)
        assert shardable_plan(out, tensor) is out  # already shardable: unchanged
        if packed:  # the dummy heads themselves do not move
            assert out.dummy_heads() == plan.dummy_heads()
        else:
            assert out.num_dummy == int(round(n_dummy / tensor)) * tensor
            assert all(d % tensor == 0 for _, d, _ in out.group_sizes)
        assert (out.scores, out.normalize, out.table) == (plan.scores, plan.normalize, plan.table)


def test_shardable_plan_packed_keeps_the_most_mass_for_its_dummy_heads():
    """Brute force over every sink/neighbour split of small layers whose group sizes fit the tensor size."""
    tensor, heads = 2, 6
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        scores = rng.random((2, heads, 3))
        plan = HeadPlan.from_scores(scores, 5)
        out = shardable_plan(plan, tensor)
        best = -1.0
        choices = [[(SINK, NEIGHBOUR) if t != DUMMY else (DUMMY,) for t in row] for row in plan.head_types]
        for rows in itertools.product(*[list(itertools.product(*c)) for c in choices]):
            cand = HeadPlan(np.asarray(rows))
            if plan_is_shardable(cand, tensor):
                best = max(best, retained(cand, scores))
        assert retained(out, scores) == pytest.approx(best, abs=1e-12)


def test_shardable_plan_without_scores_moves_few_heads():
    types = np.array([[SINK, SINK, SINK, DUMMY, DUMMY, DUMMY, DUMMY, NEIGHBOUR]])  # groups (7, 1)
    out = shardable_plan(HeadPlan(types), 4)
    assert group_sizes_of(out) == ((8, 0),)  # one neighbour head becomes sink, not three sinks neighbours
    assert int(np.sum(np.asarray(out.head_types) != types)) == 1
    paper = shardable_plan(HeadPlan(types, standard_table(packed_dummy=False)), 2)
    assert paper.group_sizes == ((2, 4, 2),)
    assert int(np.sum(np.asarray(paper.head_types) != types)) == 1
    with pytest.raises(ValueError, match="do not split over tensor=3"):
        shardable_plan(HeadPlan(types), 3)


def test_shardable_plan_with_dhp_scores_and_tensor_one_is_the_plan():
    scores = np.random.default_rng(0).random((3, 8, 3))
    plan = HeadPlan.from_scores(scores, 9)
    assert shardable_plan(plan, 1) is plan
    assert np.array_equal(np.asarray(plan.head_types), solve_dhp(scores, 9))


# ------------------------------------------------------------------------------------------------ 8 devices

def _child_report(tmp_path_factory, part: str) -> dict:
    out = tmp_path_factory.mktemp("sharding") / "report.json"
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                  "--xla_llvm_disable_expensive_passes=true",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    proc = subprocess.run([sys.executable, __file__, part, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode:
        pytest.fail(f"device checks failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


# Two children, one per part, so that a crash in one (XLA:CPU of jax 0.11.2 once segfaulted compiling a zero-size
# cache inside shard_map) still reports the other.
@pytest.fixture(scope="module")
def device_report(tmp_path_factory):
    return _child_report(tmp_path_factory, "tensor")


@pytest.fixture(scope="module")
def stream_report(tmp_path_factory):
    return _child_report(tmp_path_factory, "stream")


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_sharded_baseline_loop_equals_one_device(device_report, mesh):
    r = device_report["baseline"][f"{mesh[0]}x{mesh[1]}"]
    assert r["max_abs_diff"] < 2e-5, r
    assert r["out_spec"] == str(P("data", None, None, None, None))


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_sharded_dummy_forcing_loop_equals_one_device(device_report, mesh):
    r = device_report["dummy"][f"{mesh[0]}x{mesh[1]}"]
    assert r["max_abs_diff"] < 2e-5, r
    assert r["traces"] == {"step0": 1, "step1": 1}  # warm-up layout, then the plan's: one compile each


def test_parameter_shardings_follow_the_rules(device_report):
    specs = device_report["param_specs"]  # Generator on (2, 4)
    assert specs["blocks.0.self_attn.q.kernel"] == str(P(None, "tensor"))
    assert specs["blocks.0.self_attn.q.bias"] == str(P("tensor"))
    assert specs["blocks.0.self_attn.norm_q"] == str(P("tensor"))
    assert specs["blocks.1.cross_attn.k.kernel"] == str(P(None, "tensor"))
    assert specs["blocks.0.self_attn.o.kernel"] == str(P("tensor", None))
    assert specs["blocks.0.self_attn.o.bias"] == str(P(None))
    assert specs["blocks.1.ffn_in.kernel"] == str(P(None, "tensor"))
    assert specs["blocks.1.ffn_out.kernel"] == str(P("tensor", None))
    assert specs["time_projection.kernel"] == str(P(None, None))
    assert specs["patch_embedding.kernel"] == str(P(None, None))


@pytest.mark.parametrize("mesh", [(1, 8), (2, 4)], ids=lambda m: f"{m[0]}x{m[1]}")
def test_kv_caches_are_split_over_heads_never_replicated(device_report, mesh):
    caches = device_report["caches"][f"{mesh[0]}x{mesh[1]}"]
    assert set(caches) == {"warmup", "plan"}
    t = mesh[1]
    for kind, leaves in caches.items():
        for leaf in leaves:  # the compiled step's cache inputs and outputs, and the live arrays
            assert leaf["spec"] == str(P("data", None, "tensor", None)), (kind, leaf)
            assert not leaf["replicated"], (kind, leaf)
            assert leaf["shard_heads"] * t == leaf["heads"], (kind, leaf)
    assert device_report["text_kv_spec"] == str(P("data", None, "tensor", None))


def test_steps_never_gather_a_kv_cache_baseline_and_warmup(device_report):
    gathers = device_report["cache_gathers"]
    assert gathers["baseline"] == [] and gathers["warmup"] == [] and gathers["plan_paper"] == []


def test_steps_never_gather_a_kv_cache_packed_plan(device_report):
    assert device_report["cache_gathers"]["plan_packed"] == []


def test_online_dummy_forcing_on_a_mesh_plans_shardably_and_equals_one_device(device_report):
    r = device_report["online"]
    assert r["shardable"] and r["num_dummy"] == 13  # release plans keep their dummy heads
    assert r["max_abs_diff"] < 2e-5, r


def test_generator_on_a_mesh_rounds_the_plan_and_picks_a_partitionable_kernel(device_report):
    assert device_report["adjusted_plan_ok"]
    assert device_report["attn_impl"] == {"auto": "xla", "pallas_error": True}


def test_stream_stages_on_a_mesh_equal_one_device(stream_report):
    r = stream_report
    assert set(r) == {f"{k} {m}" for k in ("baseline", "dummy") for m in ("1x2", "1x4", "2x4")}
    for name, entry in r.items():
        assert entry["max_abs_diff"] < 2e-5, (name, entry)
    # each of 4 devices holds one step's cache; its step talks to no other device, and the tick's shift moves
    # one chunk's latents to the next stage
    assert r["baseline 1x4"]["cache_specs"] == [str(P("tensor", "data", None, None, None))]
    assert r["baseline 1x4"]["step_collectives"] == []
    assert r["baseline 1x4"]["shift_collectives"] == ["collective-permute"]


# ------------------------------------------------------------------------------------------------ the children

def _plan_8() -> HeadPlan:
    """A packed plan of 2 layers x 16 heads whose groups split over 8: layer 0 groups (8, 8), layer 1 (16, 0)."""
    rng = np.random.default_rng(0)
    types = np.full((2, 16), NEIGHBOUR)
    types[0, rng.permutation(16)[:8]] = [SINK] * 3 + [DUMMY] * 5
    types[1, :] = DUMMY
    types[1, rng.permutation(16)[:6]] = SINK
    return HeadPlan(types, standard_table(1))


def _device_checks(report_path: str) -> None:  # noqa: C901 - one linear script
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    from flax import nnx

    from dfjax.config import DummyForcingConfig, SamplingConfig, VideoShape, WanConfig
    from dfjax.dummy import hma
    from dfjax.model.transformer import WanDiT
    from dfjax.params import path_key
    from dfjax.pipeline import Generator, RunConfig

    assert len(jax.devices()) == 8, jax.devices()
    cfg = WanConfig.tiny(num_heads=16, dim=96)  # head_dim 6; 16 heads give non-trivial groups at tensor 8
    video = VideoShape(height=32, width=48, frames=21)  # 6 tokens per frame, 6 latent frames = 3 chunks of 2
    sampling = SamplingConfig(chunk_frames=2)
    batch = 8
    model = WanDiT(cfg, nnx.Rngs(0))
    ctx = jax.random.normal(jax.random.PRNGKey(1), (batch, cfg.text_len, cfg.text_dim))
    meshes = {f"{d}x{t}": MeshConfig(data=d, tensor=t, data_mode="batch").mesh() for d, t in MESHES}
    report: dict = {"baseline": {}, "dummy": {}, "caches": {}, "cache_gathers": {}}

    def gathers(compiled, capacities):
        """All-gathers in a compiled program whose result has a KV cache's token capacity."""
        found = []
        for line in compiled.as_text().splitlines():
            if " all-gather(" not in line:
                continue
            result = line.split(" all-gather(")[0].split("=", 1)[1]
            for dims in re.findall(r"\w+\[([\d,]+)\]", result):
                shape = [int(x) for x in dims.split(",")]
                if len(shape) == 4 and shape[1] in capacities:
                    found.append(shape)
        return found

    def capacities(layout):
        return {g.capacity_frames * layout.tokens_per_frame for layer in layout.layers for g in layer}

    # baseline: global cache
    run = RunConfig(video=video, sampling=sampling, attn_impl="xla")
    ref = np.asarray(Generator(model, run, batch=batch).generate(ctx, seed=3))
    for name, mesh in meshes.items():
        g = Generator(model, run, batch=batch, mesh=mesh)
        out = g.generate(ctx, seed=3)
        report["baseline"][name] = {"max_abs_diff": float(np.max(np.abs(np.asarray(out) - ref))),
                                    "out_spec": str(out.sharding.spec)}
        if name == "1x8":
            compiled = g.step(g.first_layout).compiled
            report["cache_gathers"]["baseline"] = gathers(compiled, capacities(g.first_layout))

    # Dummy Forcing with a plan whose groups split over 8: layer 0 groups (8, 8), layer 1 (16, 0)
    plan = _plan_8()
    types = np.asarray(plan.head_types)
    assert plan_is_shardable(plan, 8)
    dfrun = RunConfig(video=video, sampling=sampling, attn_impl="xla", dummy=DummyForcingConfig(ar_start=0))
    ref = np.asarray(Generator(model, dfrun, batch=batch, plan=plan).generate(ctx, seed=5))
    for name, mesh in meshes.items():
        g = Generator(model, dfrun, batch=batch, mesh=mesh, plan=plan)
        out = g.generate(ctx, seed=5)
        report["dummy"][name] = {"max_abs_diff": float(np.max(np.abs(np.asarray(out) - ref))),
                                 "traces": g.stats.trace_counts}
        if name not in ("1x8", "2x4"):
            continue
        t = mesh.shape["tensor"]
        caches = {}
        for kind, layout in (("warmup", g.first_layout), ("plan", g.dummy.layout(g.stats.last_plan))):
            compiled = g.step(layout).compiled
            leaves = []
            cache_in = jax.tree.leaves(compiled.input_shardings[0][2])
            cache_out = jax.tree.leaves(compiled.output_shardings[1])
            live = jax.tree.leaves(g.placement.init_cache(layout, jnp.float32))
            heads = [gl.num_heads for layer in layout.layers for gl in layer for _ in (0, 1)]
            for s, n in zip(cache_in + cache_out + [a.sharding for a in live], heads * 3):
                shape = (batch, 1, n, cfg.head_dim)
                leaves.append({"spec": str(s.spec), "replicated": bool(s.is_fully_replicated) and t > 1,
                               "heads": n, "shard_heads": s.shard_shape(shape)[2]})
            caches[kind] = leaves
            if name == "1x8":
                report["cache_gathers"]["warmup" if kind == "warmup" else "plan_packed"] = gathers(
                    compiled, capacities(layout))
        report["caches"][name] = caches
        if name == "2x4":
            flat = {path_key(p): v for p, v in nnx.to_flat_state(g.params)}
            report["param_specs"] = {k: str(v.get_value().sharding.spec) for k, v in flat.items()}
            report["text_kv_spec"] = str(jax.tree.leaves(g.text_kv(ctx))[0].sharding.spec)

    # online scores on a mesh: the plan solved from them is rounded to split over tensor=4
    online = RunConfig(video=video, sampling=sampling, attn_impl="xla",
                       dummy=DummyForcingConfig(ar_start=1, num_dummy=13))  # scored at chunk 1 of 3
    g = Generator(model, online, batch=batch, mesh=meshes["2x4"])
    out = g.generate(ctx, seed=7)
    ref = Generator(model, online, batch=batch, plan=g.stats.last_plan).generate(ctx, seed=7)
    report["online"] = {"max_abs_diff": float(np.max(np.abs(np.asarray(out) - np.asarray(ref)))),
                        "shardable": plan_is_shardable(g.stats.last_plan, 4), "num_dummy": g.stats.last_plan.num_dummy}

    # paper plan (no packed heads): no scatter, so no gathers expected
    paper = HeadPlan(types, standard_table(1, packed_dummy=False))
    paper = shardable_plan(paper, 8)
    pg = Generator(model, RunConfig(video=video, sampling=sampling, attn_impl="xla",
                                    dummy=DummyForcingConfig(ar_start=0, packed_dummy=False)),
                   batch=batch, mesh=meshes["1x8"], plan=paper)
    layout = hma.plan_layout(paper, 6, 2)
    rep = jax.sharding.NamedSharding(meshes["1x8"], P())
    args = (pg.params, pg.text_kv(ctx), pg.placement.init_cache(layout, jnp.float32),
            jax.device_put(jax.random.PRNGKey(0), rep), jax.device_put(jnp.int32(1), rep), pg.schedule, None,
            pg._no_latents, jax.device_put(jnp.bool_(False), rep))
    compiled = pg.step(layout).fn.lower(*args).compile()
    report["cache_gathers"]["plan_paper"] = gathers(compiled, capacities(layout))

    # a mesh rounds an unshardable plan, and keeps Pallas out of GSPMD
    raw = HeadPlan.from_scores(np.random.default_rng(1).random((2, 16, 3)), 11)
    g = Generator(model, dfrun, batch=batch, mesh=meshes["2x4"], plan=raw)
    report["adjusted_plan_ok"] = (not plan_is_shardable(raw, 4)) and g.dummy.plan == shardable_plan(raw, 4)
    try:
        g.placement.attn_impl("pallas", "float32")
        pallas_error = False
    except ValueError:
        pallas_error = True
    report["attn_impl"] = {"auto": g.attn_impl, "pallas_error": pallas_error}

    Path(report_path).write_text(json.dumps(report))


def _stream_checks(report_path: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    from flax import nnx

    from dfjax.config import DummyForcingConfig, SamplingConfig, VideoShape, WanConfig
    from dfjax.model.transformer import WanDiT
    from dfjax.pipeline import Generator, RunConfig

    cfg, sampling, batch = WanConfig.tiny(num_heads=16, dim=96), SamplingConfig(chunk_frames=2), 8
    model = WanDiT(cfg, nnx.Rngs(0))
    ctx = jax.random.normal(jax.random.PRNGKey(1), (batch, cfg.text_len, cfg.text_dim))
    plan = _plan_8()
    report: dict = {}
    # stream batch: a group's devices are the pipeline's stages (4 denoising steps over 2 or 4 devices; 2x4 also
    # splits the batch over data); with Dummy Forcing the prefill is tensor-parallel, then the plan streams
    svideo = VideoShape(height=32, width=48, frames=37)  # 5 chunks of 2
    for name, srun, kw in (
            ("baseline", RunConfig(video=svideo, sampling=sampling, attn_impl="xla", stream=True), {}),
            ("dummy", RunConfig(video=svideo, sampling=sampling, attn_impl="xla", stream=True,
                                dummy=DummyForcingConfig(ar_start=0)), {"plan": plan})):
        ref = np.asarray(Generator(model, srun, batch=batch, **kw).generate(ctx, seed=9))
        for d, t in ((1, 2), (1, 4), (2, 4)):
            mesh = MeshConfig(data=d, tensor=t, data_mode="batch").mesh(jax.devices()[:d * t])
            g = Generator(model, srun, batch=batch, mesh=mesh, **kw)
            out = g.generate(ctx, seed=9)
            entry = {"max_abs_diff": float(np.max(np.abs(np.asarray(out) - ref)))}
            if name == "baseline" and (d, t) == (1, 4):
                (step,) = g._stream._steps.values()
                collectives = lambda compiled: sorted({m.group(1) for m in re.finditer(
                    r"= \S+ (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(",
                    compiled.as_text())})
                entry["cache_specs"] = sorted({str(s.spec) for s in jax.tree.leaves(step.input_shardings[0][2])})
                entry["step_collectives"] = collectives(step)
                entry["shift_collectives"] = collectives(g._stream._shift.lower(
                    jax.device_put(jnp.zeros((4, batch, 2, 4, 6, cfg.in_channels)),
                                   step.input_shardings[0][3])).compile())
            report[f"{name} {d}x{t}"] = entry

    Path(report_path).write_text(json.dumps(report))


if __name__ == "__main__":
    {"tensor": _device_checks, "stream": _stream_checks}[sys.argv[1]](sys.argv[2])
