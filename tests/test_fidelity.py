"""`dfjax train-demo` at its smallest, end to end, and `dfjax fidelity` on the model it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dfjax import fidelity
from dfjax.dummy import DUMMY, NEIGHBOUR, SINK, HeadPlan


def test_metrics():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-8, 9, a.shape), 0, 255).astype(np.uint8)
    assert fidelity.psnr(a, a) == float("inf") and abs(fidelity.ssim(a, a) - 1) < 1e-9
    assert 25 < fidelity.psnr(a, b) < 40 and 0.5 < fidelity.ssim(a, b) < 1
    assert fidelity.ssim(a, 255 - a) < 0.1
    assert fidelity.rel_l2(np.ones(4), np.ones(4)) == 0.0


def test_random_plan_and_kept_mass():
    scores = np.random.default_rng(1).dirichlet(np.ones(3), size=(4, 6))  # [layers, heads, 3]
    plan = fidelity.random_plan(scores, 10, np.random.default_rng(0))
    assert plan.num_dummy == 10
    dhp = HeadPlan.from_scores(scores, 10)
    types, dtypes = plan.head_type_array(), dhp.head_type_array()
    both = (types != DUMMY) & (dtypes != DUMMY)
    assert np.array_equal(types[both], dtypes[both])  # non-dummy heads typed as DHP types them
    kept = fidelity.kept_mass(scores, plan)
    s = scores
    want = np.where(types == SINK, s[..., 0] + s[..., 2], np.where(types == NEIGHBOUR, s[..., 1] + s[..., 2], s[..., 2]))
    assert abs(kept["total"] - want.mean()) < 1e-12 and kept["dummy_heads"] == 10
    # DHP keeps at least as much as any random choice under its own (raw) objective
    raw = HeadPlan.from_scores(scores, 10, normalize="none")
    assert fidelity.kept_mass(scores, raw)["total"] >= kept["total"] - 1e-12


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dfjax.train_demo import main

    out = tmp_path_factory.mktemp("demo") / "tiny"
    assert main(["--out", str(out), "--size", "tiny", "--height", "32", "--width", "32", "--frames", "33",
                 "--clips", "8", "--vae-clips", "8", "--vae-window", "5", "--vae-steps", "1", "--vae-batch", "1",
                 "--dit-steps", "2", "--dit-batch", "2", "--workers", "1", "--log-every", "1"]) == 0
    return out


def test_train_demo_writes_a_loadable_model_folder(tiny_model):
    from dfjax.model_io import read_config
    from dfjax.t2v import VideoModel

    meta = read_config(tiny_model)
    assert meta["defaults"] == {"height": 32, "width": 32, "frames": 33, "fps": 8}
    assert meta["sampling"]["chunk_frames"] == 3
    assert meta["training"]["vae"]["steps"] == 1 and meta["training"]["dit"]["steps"] == 2
    assert meta["vae"]["with_encoder"] is False and meta["vae"]["z_dim"] == meta["transformer"]["in_channels"]
    model = VideoModel.load(tiny_model)
    ctx = model.text(["a red square moves left"])
    assert ctx.shape == (1, model.text.cfg.text_len, model.dit.cfg.text_dim)


def test_fidelity_command_on_a_tiny_setting(tiny_model, tmp_path):
    out = tmp_path / "fid"
    assert fidelity.main(["--model", str(tiny_model), "--prompts", "2", "--seeds", "0", "--shares", "0,0.5",
                          "--frames", "33", "--out", str(out), "--no-plot"]) == 0
    res = json.loads((out / "fidelity.json").read_text())
    assert (out / "fidelity.md").read_text().startswith("# Dummy Forcing fidelity")
    methods = {(a["method"], a["share"]) for a in res["summary"]}
    assert methods == {("baseline", 0.0), ("dhp", 0.0), ("dhp", 0.5), ("random", 0.5)}
    heads = res["heads"]["total"]
    for a in res["summary"]:
        if a["method"] == "baseline":
            continue
        assert a["num_dummy"] == round(a["share"] * heads)
        assert 0 < a["ssim"] <= 1 and a["psnr"] > 0 and a["latent_rel_l2"] >= 0
        assert 0 < a["kept_total"] <= 1 + 1e-6
    assert set(res["overlap"]) == {"0.5"} and 0 <= res["overlap"]["0.5"]["mean"] <= 1
    assert 0 <= res["current_chunk_heads"]["share_mean"] <= 1
    assert len(res["runs"]) == 2 * 4  # per prompt: baseline, DHP 0%, DHP 50%, random 50%
