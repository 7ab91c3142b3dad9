"""The prompt-adherence detector (dfjax.adherence) against the ground truth of the synthetic clips, and the
`dfjax adherence` measurement's bookkeeping (held-out clips, tables, reports) with a stand-in generator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dfjax import adherence
from dfjax.synthetic import SyntheticConfig, clip_spec, make_clip, to_uint8


def test_every_prompt_of_the_language_parses():
    for i in range(2000):
        prompt = clip_spec(i).prompt
        c = adherence.parse_prompt(prompt)
        assert c is not None, prompt
        assert prompt.startswith(f"a {c.colour} {c.shape} moves {c.direction}")
        assert c.bounces == ("bounces" in prompt) and c.leaves == ("leaves the frame" in prompt)
        assert c.comes_back == ("comes back" in prompt) and (c.second is not None) == ("appears" in prompt)
    c = adherence.parse_prompt("a yellow triangle moves left, then turns up")
    assert (c.colour, c.shape, c.direction, c.turns) == ("yellow", "triangle", "left", ["up"])
    assert adherence.parse_prompt("a purple square moves left") is None
    assert adherence.parse_prompt("a red square moves left, then explodes") is None
    with pytest.raises(ValueError, match="not in the demo language"):
        adherence.judge(np.zeros((5, 64, 64, 3), np.uint8), "a dog runs")


@pytest.mark.parametrize("frames", [57, 33])
def test_the_detector_is_right_on_ground_truth_clips(frames):
    """On clips it never saw while its constants were set (the constants were set on other indices): at least 97 %
    right per attribute, on statements true of each clip and, for the events, statements clearly false of it."""
    res = adherence.validate(num=40, frames=frames, start=70_000_000)
    for attr, s in res["attributes"].items():
        assert s["judged"] >= 10, (attr, s)
        assert s["accuracy"] >= 0.97, (attr, s, [w for w in res["wrong"] if w["attribute"] == attr])
        if attr in ("bounces", "turns", "leaves the frame", "comes back", "appears"):
            assert 0 < s["true"] < s["judged"], (attr, s)  # both kinds of statement were judged


def test_the_detector_says_no():
    clip = make_clip(70_000_001)  # "a ... moves ...": judged against what it is not
    px = to_uint8(clip.frames)
    c = adherence.parse_prompt(clip.prompt)
    assert all(adherence.judge(px, clip.prompt).values()), clip.prompt
    other = {"left": "right", "right": "left", "up": "down", "down": "up"}[c.direction]
    colour = "blue" if c.colour != "blue" else "red"
    shape = "circle" if c.shape != "circle" else "square"
    verdict = adherence.judge(px, f"a {colour} {shape} moves {other}")
    assert not verdict["colour"] and not verdict["shape"] and not verdict["direction"]
    blank = np.zeros((33, 64, 64, 3), np.uint8) + np.asarray([15, 15, 26], np.uint8)
    assert not any(adherence.judge(blank, "a red square moves left, then a blue circle appears").values())


def test_the_measurement_on_a_stand_in_generator(tmp_path, monkeypatch):
    """run_adherence with the generator replaced by the ground truth (held-out prompts) and blank frames (others):
    the held-out model table equals the data table, the rest misses, and the reports are written."""
    import dfjax.api
    from dfjax.demo import PACKAGED

    start = adherence.HELD_OUT_START

    class Truth:
        def __init__(self, frames):
            self.frames = frames

        def generate(self, prompt, seed=0):
            clip = make_clip(start + seed, 0, SyntheticConfig())
            if clip.prompt == prompt:
                return to_uint8(clip.frames[:self.frames])
            return np.zeros((self.frames, 64, 64, 3), np.uint8)

    monkeypatch.setattr(dfjax.api, "load", lambda folder, frames: Truth(frames))
    # the shipped model's language with fewer training clips: listing 16384 training prompts takes 2.5 s
    monkeypatch.setattr(adherence, "training_language", lambda meta: (SyntheticConfig(), 0, 256))
    res = adherence.run_adherence(PACKAGED, num=6, frames=(57, 33), demo_seeds=1, plain=2, validate_clips=0,
                                  log=lambda s: None)
    assert res["held_out"]["start"] >= res["model_training"]["clips"] > 0
    assert set(res["tables"]) == {"held-out@57", "held-out@33", "demo@33", "plain@33"}
    for n in (57, 33):
        t = res["tables"][f"held-out@{n}"]
        assert t["model"] == t["data"] and t["model"]["colour"]["judged"] == 6
    assert all(v["hits"] == 0 for v in res["tables"]["demo@33"]["model"].values())
    paths = adherence.write_reports(res, tmp_path)
    assert json.loads(paths[0].read_text())["tables"]["plain@33"]["model"]["direction"]["judged"] == 2
    assert paths[1].read_text().startswith("# Prompt adherence of the demo model")
    with pytest.raises(ValueError, match="held-out clips must start"):
        adherence.run_adherence(PACKAGED, num=1, start=255, log=lambda s: None)


def test_prompts_that_describe_the_first_frames():
    """describe_frames: the same clips, their prompts naming only the events before that frame; a prompt without an
    event becomes common (the shipped model's language has almost none, so "a red square moves left" was barely
    trained); the detector holds on that language too."""
    early = SyntheticConfig(describe_frames=25, speed=(1.2, 2.2))
    same = SyntheticConfig(speed=(1.2, 2.2))
    plain = 0
    for i in range(200):
        a, b = clip_spec(i, 0, early), clip_spec(i, 0, same)
        assert all(np.array_equal(x["pos"], y["pos"]) for x, y in zip(a.objects, b.objects))
        ca, cb = adherence.parse_prompt(a.prompt), adherence.parse_prompt(b.prompt)
        assert (ca.colour, ca.shape, ca.direction) == (cb.colour, cb.shape, cb.direction)
        assert set(ca.turns) <= set(cb.turns) and ca.bounces <= cb.bounces and ca.leaves <= cb.leaves
        if len(a.objects) == 2 and ca.second is not None:
            assert int(np.argmax(a.objects[1]["visible"])) < 25
        plain += "," not in a.prompt
    assert plain > 30  # a quarter of the clips (0.4 % in the shipped model's language)
    res = adherence.validate(num=40, frames=33, start=72_000_000, lang=early)
    for attr, s in res["attributes"].items():
        assert s["judged"] == 0 or s["accuracy"] >= 0.97, (attr, s, res["wrong"])
