"""The benchmark still works: one tiny in-process run of Dummy Forcing (speed is not asserted here)."""

import pytest

from dfjax.bench import run_one


@pytest.mark.parametrize("mode,mesh_of_one", [("dummy", False), ("dummy", True), ("dummy-stream", False)],
                         ids=["unsharded", "mesh-of-one", "stream"])
def test_tiny_dummy_forcing_benchmark_run_reports_every_field(mode, mesh_of_one):
    r = run_one(mode, "tiny", frames=33, runs=1, tiny=True, attn_impl="xla", mesh_of_one=mesh_of_one)
    assert r["mesh"] == ("1x1" if mesh_of_one else None)
    for key in ("diffusion_s", "diffusion_fps", "e2e_s", "e2e_fps", "first_chunk_s", "compile_s", "peak_mem_gib",
                "attention_s", "kv_cache_bytes"):
        assert key in r
    assert r["frames"] == 33 and r["diffusion_s"] > 0 and r["e2e_s"] >= r["diffusion_s"]
    assert r["num_dummy"] == 4  # half of the tiny model's 2 x 4 heads
