"""The benchmark still works: one tiny in-process run of Dummy Forcing (speed is not asserted here)."""

from dfjax.bench import run_one


def test_tiny_dummy_forcing_benchmark_run_reports_every_field():
    r = run_one("dummy", "tiny", frames=33, runs=1, tiny=True, attn_impl="xla")
    for key in ("diffusion_s", "diffusion_fps", "e2e_s", "e2e_fps", "first_chunk_s", "compile_s", "peak_mem_gib",
                "attention_s", "kv_cache_bytes"):
        assert key in r
    assert r["frames"] == 33 and r["diffusion_s"] > 0 and r["e2e_s"] >= r["diffusion_s"]
    assert r["num_dummy"] == 4  # half of the tiny model's 2 x 4 heads
