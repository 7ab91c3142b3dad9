"""`dfjax generate` end to end on the demo model, and every bad input: one clear line, exit 2, no file."""

from __future__ import annotations

import json
import shutil

import pytest

from dfjax.cli import main
from dfjax.demo import demo_model_folder
from dfjax.video import read_mp4_info


@pytest.fixture(scope="module", autouse=True)
def demo_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DFJAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.mark.parametrize("extra", [["--timeline", "timeline.jsonl"], ["--prompt", "a red square moves left",
                                                                      "--stream", "--dummy-forcing"]],
                         ids=["sequential, a prompt switch", "stream"])
def test_generate_writes_the_asked_video(tmp_path, monkeypatch, extra):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "timeline.jsonl").write_text(TIMELINE + '{"start": 1.5, "prompt": "a blue circle moves up"}\n')
    out = tmp_path / "v.mp4"
    timing = tmp_path / "t.json"
    rc = main(["generate", "--out", str(out), "--height", "48", "--width", "64",
               "--frames", "33", "--fps", "12", "--timing-json", str(timing), "--quiet", *extra])
    assert rc == 0
    info = read_mp4_info(out)
    assert info == {"frames": 33, "width": 64, "height": 48, "fps": 12.0}  # 3 chunks: stream mode streams one
    t = json.loads(timing.read_text())[0]
    assert t["frames"] == 33 and t["e2e_s"] > 0 and t["e2e_fps"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".mp4"] == ["v.mp4"]  # no partial file left


def test_prompt_file_dummy_forcing_profile_and_resume(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a blue circle bounces", "seed": 3}\n\n{"prompt": "a red square moves left"}\n')
    out = tmp_path / "videos"
    profile = tmp_path / "profile.json"
    args = ["generate", "--prompts", str(prompts), "--out", str(out), "--quiet", "--dummy-forcing"]
    assert main(args + ["--save-profile", str(profile)]) == 0
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".mp4")
    assert [f[:12] for f in files] == ["00000_seed3_", "00001_seed0_"]
    manifest = [json.loads(line) for line in (out / "manifest-00000.jsonl").read_text().splitlines()]
    assert sorted(r["seed"] for r in manifest) == [0, 3] and all(r["timing"]["e2e_s"] > 0 for r in manifest)
    stamps = {f: (out / f).stat().st_mtime_ns for f in files}
    assert main(args) == 0  # a rerun skips the videos made with this prompt, seed and settings
    assert {f: (out / f).stat().st_mtime_ns for f in files} == stamps and len(list(out.glob("*.mp4"))) == 2
    prompts.write_text('{"prompt": "a blue circle bounces", "seed": 3}\n{"prompt": "a red circle moves down"}\n')
    assert main(args) == 0  # an edited prompt is made again, under its own name; the unchanged one is skipped
    now = sorted(p.name for p in out.glob("*.mp4"))
    assert len(now) == 3 and files[0] in now and (out / files[0]).stat().st_mtime_ns == stamps[files[0]]
    assert json.loads(profile.read_text())["num_dummy"] > 0
    # naming the dtype (here the folder's own, so nothing compiles anew) is a setting of its own: made again
    assert main(args + ["--dtype", "float32"]) == 0 and len(list(out.glob("*.mp4"))) == 5


def _bad_model_folder(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(demo_model_folder(), folder)
    shutil.rmtree(folder / "tokenizer")
    return folder


TIMELINE = '{"start": 0, "prompt": "a red square moves left"}\n'
ARGS = ["generate", "--prompt", "a red square", "--out", "{tmp}/o.mp4", "--quiet"]


@pytest.mark.parametrize("args,files,message", [
    (ARGS + ["--height", "50"], {}, "not a multiple of 16x16"),
    (ARGS + ["--frames", "25"], {}, "not a multiple of the chunk size"),
    (ARGS + ["--frames", "24"], {}, "frames must be 4*k+1"),
    (ARGS + ["--frames", "0"], {}, "frames must be a positive number, got 0"),
    (ARGS + ["--height", "0", "--width", "0"], {}, "height must be a positive number"),
    (ARGS + ["--fps", "-2"], {}, "fps must be > 0"),
    (ARGS + ["--dummy-forcing", "--num-dummy", "100000"], {}, "out of range"),
    (ARGS + ["--num-dummy", "3"], {}, "num_dummy set without Dummy Forcing"),
    (ARGS + ["--dummy-forcing", "--cache", "local"], {}, "Dummy Forcing gives each head type its own cache"),
    (ARGS + ["--out", "/nonexistent-dir/x.mp4"], {}, "does not exist"),
    (ARGS + ["--out", "x.avi"], {}, "must be an .mp4"),
    (ARGS + ["--out", "{tmp}"], {}, "is a folder; give an .mp4 file name"),
    (ARGS + ["--timing-json", "/nonexistent-dir/t.json"], {}, "--timing-json /nonexistent-dir/t.json: the folder"),
    (ARGS + ["--model", "{tmp}/model"], "no-tokenizer", "lacks ['tokenizer']"),
    (ARGS + ["--profile", "{tmp}/foreign.json"], "foreign-profile", "profile made for a model with"),
    (["generate", "--prompts", "{tmp}/p.txt", "--out", "{tmp}/o"], {"p.txt": "\n  \n"}, "has no prompts"),
    (["generate", "--prompts", "{tmp}/p.jsonl"], {"p.jsonl": '{"prompt": "a"}\n{"prompt": "  "}\n'},
     "p.jsonl:2: the prompt is empty"),
    (["generate", "--prompts", "{tmp}/p.txt", "--out", "{tmp}/o.txt"], {"p.txt": "a\n", "o.txt": "x"},
     "is a file; --prompts writes a folder"),
    (["generate", "--timeline", "{tmp}/t.jsonl"], {"t.jsonl": '{"start": 1, "prompt": "a"}\n'},
     "t.jsonl:1: the first prompt must start at 0"),
    (["generate", "--timeline", "{tmp}/t.jsonl"], {"t.jsonl": TIMELINE + '{"start": 2, "prompt": "b"}\n'
                                                 '{"start": 1, "prompt": "c"}\n'}, "t.jsonl:3: starts at 1.0 s"),
    (["generate", "--timeline", "{tmp}/t.jsonl"], {"t.jsonl": TIMELINE + '{"start": 1, "prompt": ""}\n'},
     "t.jsonl:2: the prompt is empty"),
    (["generate", "--timeline", "{tmp}/t.jsonl"], {"t.jsonl": TIMELINE + '{"start": 9, "prompt": "b"}\n'},
     "t.jsonl:2: the switch at 9.0 s is past the last chunk"),
    (["generate", "--timeline", "{tmp}/t.jsonl"], {"t.jsonl": TIMELINE + '{"start": 0.5, "prompt": "b"}\n'
                                                 '{"start": 0.6, "prompt": "c"}\n'}, "t.jsonl:3: the switch at 0.6 s "
                                                                                       "falls in the same chunk"),
    (["generate", "--timeline", "{tmp}/t.jsonl"], {"t.jsonl": TIMELINE + "start: 3\n"}, "t.jsonl:2: expected a JSON"),
], ids=lambda v: None)
def test_bad_input_is_one_clear_line_and_leaves_no_file(tmp_path, capsys, monkeypatch, args, files, message):
    monkeypatch.chdir(tmp_path)
    if files == "no-tokenizer":
        _bad_model_folder(tmp_path)
    elif files == "foreign-profile":
        from dfjax.dummy import HeadPlan

        HeadPlan.uniform(3, 5).save(tmp_path / "foreign.json")
    else:
        for name, text in files.items():
            (tmp_path / name).write_text(text)
    before = set(p.name for p in tmp_path.rglob("*"))
    assert main([x.replace("{tmp}", str(tmp_path)) for x in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfjax: error:") and message in err[0], err
    assert not list(tmp_path.rglob("*.mp4"))
    assert set(p.name for p in tmp_path.rglob("*")) <= before


def test_generate_with_no_arguments_makes_the_demo_video(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--quiet"]) == 0
    info = read_mp4_info(tmp_path / "out.mp4")
    assert info["frames"] > 1 and info["width"] > 0


def test_the_same_seed_gives_the_same_video_across_processes_modes_and_load(tmp_path):
    """One prompt and seed with online Dummy Forcing (its plan made from the video's own scores), made by two
    processes at once, each loading the cores the other computes on: one with --prompt, one with --prompts. The
    decoded frames are byte-identical (the mp4 encoder is deterministic too)."""
    import os
    import subprocess
    import sys

    import numpy as np

    from dfjax.video import read_mp4_frames

    env = dict(os.environ, JAX_PLATFORMS="cpu", DFJAX_CACHE=str(tmp_path / "cache"))
    prompt = "a blue circle moves up, then bounces"
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": prompt, "seed": 3}) + "\n")
    start = lambda *args: subprocess.Popen(
        [sys.executable, "-m", "dfjax.cli", "generate", *args, "--seed", "3", "--quiet", "--dummy-forcing"], env=env,
        stderr=subprocess.PIPE, text=True)
    procs = [start("--prompt", prompt, "--out", str(tmp_path / "a.mp4")),
             start("--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "many"))]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    (made,) = (tmp_path / "many").glob("*.mp4")
    a, b = read_mp4_frames(tmp_path / "a.mp4"), read_mp4_frames(made)
    assert a.shape == b.shape and a.std() > 1 and np.array_equal(a, b)


def test_sigterm_and_ctrl_c_leave_no_video_and_print_one_line(tmp_path):
    """Killed mid-video (the mp4 being written), generate removes its partial file and says so in one line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, JAX_PLATFORMS="cpu", DFJAX_CACHE=str(tmp_path / "cache"))
    procs = {sig: subprocess.Popen([sys.executable, "-m", "dfjax.cli", "generate", "--out", str(tmp_path / f"{sig}.mp4"),
                                    "--frames", "117", "--quiet"], env=env, stderr=subprocess.PIPE, text=True)
             for sig in (signal.SIGTERM, signal.SIGINT)}
    deadline = time.time() + 240
    for sig, p in procs.items():  # wait until the video is being written, then stop it
        while not (tmp_path / f".{sig}.mp4.partial.mp4").exists():
            assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "slow"
            time.sleep(0.05)
        p.send_signal(sig)
    for sig, p in procs.items():
        assert p.wait(timeout=60) == 130
        err = p.stderr.read().strip().splitlines()
        assert err == ["dfjax: interrupted; nothing half-written was left under a final name."], err
    assert not [q.name for q in tmp_path.iterdir() if q.name.endswith(".mp4")]  # neither a video nor a partial one


def test_a_frame_wise_model_folder_generates_one_latent_frame_per_chunk(tmp_path):
    """A model folder recording Causal Forcing++'s sampling (chunks of 1 latent frame, 2 steps, a 4-step first
    chunk, as `dfjax convert --family causal-forcing-framewise --steps 2` writes) is generated with it."""
    from dfjax.convert.families import FAMILIES, records

    folder = tmp_path / "framewise"
    shutil.copytree(demo_model_folder(), folder)
    meta = json.loads((folder / "config.json").read_text())
    meta.update(records(FAMILIES["causal-forcing-framewise"], steps=2))
    (folder / "config.json").write_text(json.dumps(meta))
    out, timing = tmp_path / "f.mp4", tmp_path / "t.json"
    assert main(["generate", "--model", str(folder), "--prompt", "a red circle moves down", "--frames", "9",
                 "--out", str(out), "--timing-json", str(timing), "--quiet"]) == 0
    t = json.loads(timing.read_text())[0]
    assert len(t["chunk_s"]) == 3 and read_mp4_info(out)["frames"] == 9  # 3 latent frames, one chunk each
