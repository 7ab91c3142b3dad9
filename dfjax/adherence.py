"""Prompt adherence of the demo model: does a video show what its prompt (dfjax.synthetic's language) says?

The detector reads decoded uint8 frames [T, H, W, 3] and nothing else:

  - every pixel within COLOUR_DIST (of 255, RGB) of a palette colour gets that colour; the rest is background;
  - the primary object is the prompt's colour if it is drawn at the start, else the colour that dominates the
    foreground of the first START_FRAMES frames that have any; per frame, its largest 8-connected blob gives
    its area, centroid and bounding box;
  - colour: the colour that dominates the foreground of those first frames is the prompt's;
  - shape: per frame where the blob is whole (off the border, away from other colours), fill = area / bounding
    box area (square ~1, circle ~pi/4, triangle ~1/2) and the centroid's height in the box (2/3 down for the
    upward triangle, 1/2 otherwise); the majority over those frames;
  - direction of motion: a line fitted to the centroid over the first START_FRAMES visible frames; its larger
    component (at least MIN_SPEED px/frame) names it;
  - motion later on: over every window of WINDOW visible frames, the displacement when it is at least
    MIN_MOVE px and at least twice as large along one axis as along the other. "turns <dir>": a window moving
    <dir> after one that moves elsewhere;
  - "bounces": the centroid, along some axis, moves MIN_MOVE px one way and then MIN_MOVE px back while the
    object stays in view (a run of visible frames; light smoothing);
  - "leaves the frame": the object vanishes (under MIN_AREA px) for at least two frames (or until the end)
    right after being seen near the border; "comes back": after that it is seen again, entering near the border,
    for at least two frames;
  - "then a <colour> <shape> appears": that colour is absent from the first frames and later present (at least
    APPEAR_AREA px for three frames in a row); its shape is judged like the primary's, from the frames after.

It is checked against the ground truth of the synthetic clips themselves (validate(); tests/test_adherence.py):
the true colour, shape and direction, and for the events both clips that show them and clips that do not, from
the simulated trajectories.

`dfjax adherence` generates held-out prompts of the language (clips the model was never trained on) with a model
folder, judges each video, and writes a table of the hit rate per attribute:

    dfjax adherence                                  # benchmarks/results/adherence.json and .md
    dfjax adherence --prompts 8 --demo-seeds 2 --out /tmp/adh     # a quick check
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dfjax.synthetic import BACKGROUND, COLOURS, DIRECTIONS, SHAPES, SyntheticConfig, clip_spec

COLOUR_DIST = 80.0  # of 255: a pixel this close to a palette colour is that colour
MIN_AREA = 6  # px: an object smaller than this is not in view
APPEAR_AREA = 20  # px: a second object counts from this size on
SHAPE_AREA = 40  # px: the smallest blob whose shape is judged
START_FRAMES = 8  # the first frames (events start at frame 7 or later in the data)
WINDOW = 8  # frames per motion window
MIN_MOVE = 4.0  # px: displacement that counts as motion (windows, reversals)
MIN_SPEED = 0.3  # px/frame: slower than this over the first frames is no motion
BORDER = 8.0  # px: "near the border" for leaving and coming back
WALL = 6.0  # px: a reversal whose blob comes this close to the border is a bounce
TOGETHER = 4  # frames: a second object is seen with the primary for this many frames after it appears
APART = 6.0  # px: ... with their centroids this far apart (a blob changing colour has both colours in one place)
FILL_SQUARE = 0.88  # fill above this: a square
FILL_TRIANGLE = 0.66  # fill below this (or the centroid low in the box): a triangle
TRIANGLE_CENTROID = 0.58  # centroid height in the box above this: a triangle

ATTRIBUTES = ("colour", "shape", "direction", "bounces", "turns", "leaves the frame", "comes back", "appears",
              "second shape")
NAMES = list(COLOURS)


# ---------------------------------------------------------------- prompts

@dataclass
class Claims:
    """What a prompt of the language says: the primary's colour, shape, first direction, and its events."""

    colour: str
    shape: str
    direction: str
    bounces: bool = False
    turns: list = field(default_factory=list)  # directions, in order
    leaves: bool = False
    comes_back: bool = False
    second: tuple | None = None  # (colour, shape)

    def attributes(self) -> list[str]:
        out = ["colour", "shape", "direction"]
        out += ["bounces"] * self.bounces + ["turns"] * bool(self.turns) + ["leaves the frame"] * self.leaves
        out += ["comes back"] * self.comes_back + ["appears", "second shape"] * (self.second is not None)
        return out


_PROMPT = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) moves ({'|'.join(DIRECTIONS)})(.*)")


def parse_prompt(prompt: str) -> Claims | None:
    """The claims of a prompt of the demo language; None for a prompt outside it."""
    m = _PROMPT.fullmatch(prompt.strip().lower())
    if not m:
        return None
    c = Claims(m.group(1), m.group(2), m.group(3))
    rest = [p.strip() for p in re.split(r",", m.group(4)) if p.strip()]
    for part in rest:
        part = re.sub(r"^then ", "", part)
        if part == "bounces":
            c.bounces = True
        elif part.startswith("turns ") and part[6:] in DIRECTIONS:
            c.turns.append(part[6:])
        elif part == "leaves the frame":
            c.leaves = True
        elif part == "comes back":
            c.comes_back = True
        elif (m2 := re.fullmatch(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) appears", part)):
            c.second = (m2.group(1), m2.group(2))
        else:
            return None
    return c


# ---------------------------------------------------------------- the detector

def colour_labels(frames_u8: np.ndarray) -> np.ndarray:
    """int8 [T, H, W]: the index in COLOURS of each pixel's palette colour, -1 for background or no colour."""
    pal = np.rint(np.asarray([BACKGROUND, *COLOURS.values()], np.float32) * 255).astype(np.int32)
    x = np.asarray(frames_u8).astype(np.int32)
    dist2 = np.stack([np.square(x - p).sum(-1) for p in pal], -1)  # [T, H, W, 6]
    lab = dist2.argmin(-1).astype(np.int8) - 1
    lab[dist2.min(-1) >= COLOUR_DIST ** 2] = -1
    return lab


@dataclass
class Track:
    """One colour's largest blob per frame."""

    area: np.ndarray  # [T] px
    centroid: np.ndarray  # [T, 2] (x, y), nan where area < MIN_AREA
    box: np.ndarray  # [T, 4] x0, y0, x1, y1 (pixel edges: the blob covers x0 <= x < x1), nan out of view
    clear: np.ndarray  # [T] in view and away from other colours (an occluded blob's centroid is off)
    shapes: list  # [T] the shape of a whole blob, or None

    @property
    def visible(self) -> np.ndarray:
        return self.area >= MIN_AREA


def _blob_shape(blob: np.ndarray) -> str:
    ys, xs = np.nonzero(blob)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(xs) / (h * w)
    low = (ys.mean() - ys.min() + 0.5) / h
    if fill < FILL_TRIANGLE or low > TRIANGLE_CENTROID:
        return "triangle"
    return "square" if fill > FILL_SQUARE else "circle"


def track(labels: np.ndarray, colour: str) -> Track:
    from scipy import ndimage

    idx = NAMES.index(colour)
    t_len, h, w = labels.shape
    area = np.zeros(t_len, np.int64)
    cen = np.full((t_len, 2), np.nan)
    box = np.full((t_len, 4), np.nan)
    clear = np.zeros(t_len, bool)
    alone = np.zeros(t_len, bool)
    shapes: list = [None] * t_len
    eight = np.ones((3, 3), bool)
    for t in range(t_len):
        mask = labels[t] == idx
        if mask.sum() < MIN_AREA:
            area[t] = mask.sum()
            continue
        comp, n = ndimage.label(mask, structure=eight)
        sizes = np.bincount(comp.ravel())[1:]
        blob = comp == (np.argmax(sizes) + 1)
        area[t] = sizes.max()
        if area[t] < MIN_AREA:
            continue
        ys, xs = np.nonzero(blob)
        cen[t] = xs.mean() + 0.5, ys.mean() + 0.5
        box[t] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        whole = ys.min() > 0 and xs.min() > 0 and ys.max() < h - 1 and xs.max() < w - 1
        others = (labels[t] >= 0) & ~mask
        near_other = (ndimage.binary_dilation(blob, eight, iterations=3) & others).sum() >= 3
        clear[t] = not near_other
        alone[t] = whole and not near_other
        if alone[t] and area[t] >= SHAPE_AREA:
            shapes[t] = _blob_shape(blob)
    # next to another colour, a blob of its full size is on top (its centroid holds); a smaller one is covered
    full = np.median(area[alone]) if alone.any() else np.median(area[area >= MIN_AREA]) if (area >= MIN_AREA).any() else 0
    clear |= (area >= MIN_AREA) & (area >= 0.9 * full)
    return Track(area, cen, box, clear, shapes)


def _runs(visible: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of True."""
    out, start = [], None
    for t, v in enumerate(list(visible) + [False]):
        if v and start is None:
            start = t
        elif not v and start is not None:
            out.append((start, t))
            start = None
    return out


def _direction(d) -> str | None:
    """The direction of a displacement (x, y) that moves at least MIN_MOVE, mostly along one axis."""
    ax = int(abs(d[1]) > abs(d[0]))
    if abs(d[ax]) < MIN_MOVE or abs(d[ax]) < 2 * abs(d[1 - ax]):
        return None
    return (("left", "right"), ("up", "down"))[ax][int(d[ax] > 0)]


def _smooth(p: np.ndarray) -> np.ndarray:
    if len(p) < 3:
        return p
    return np.concatenate([p[:1], (p[:-2] + p[1:-1] + p[2:]) / 3, p[-1:]])


def _reversals(p: np.ndarray, amount: float = MIN_MOVE) -> list[tuple[int, int]]:
    """Where a 1-D path, having moved `amount` one way, moves `amount` back: [(index of the turning point, the
    sign of the motion before it)]."""
    out, trend, ext, at = [], 0, p[0] if len(p) else 0.0, 0
    for i, x in enumerate(p[1:], 1):
        if trend == 0:
            if abs(x - p[0]) >= amount:
                trend, ext, at = (1 if x > p[0] else -1), x, i
        elif trend * (x - ext) > 0:
            ext, at = x, i
        elif trend * (ext - x) >= amount:
            out.append((at, trend))
            trend, ext, at = -trend, x, i
    return out


@dataclass
class Facts:
    """What the detector sees in a video (about the primary object, and the colours that appear later)."""

    colour: str | None  # dominant foreground colour at the start
    shape: str | None
    direction: str | None
    moves: list  # [(frame, direction)] of the motion windows
    reverses: bool
    leaves: bool
    comes_back: bool
    appeared: dict  # colour -> (first frame, shape or None), for colours absent at the start and present later


def _near_border(c, h, w) -> bool:
    return min(c[0], c[1], w - c[0], h - c[1]) <= BORDER


def describe(frames_u8: np.ndarray, colour: str | None = None) -> Facts:
    """The detector's facts about a video; `colour`: the prompt's primary colour (tracked if it is drawn at the
    start; otherwise the dominant colour is)."""
    labels = colour_labels(frames_u8)
    t_len, h, w = labels.shape
    counts = np.stack([(labels == i).sum((1, 2)) for i in range(len(NAMES))], 1)  # [T, colours]
    any_fg = np.nonzero(counts.sum(1) >= MIN_AREA)[0]
    if not len(any_fg):
        return Facts(None, None, None, [], False, False, False, {})
    t0 = int(any_fg[0])
    start = counts[t0:t0 + START_FRAMES].sum(0)
    dominant = NAMES[int(np.argmax(start))]
    primary = colour if colour is not None and start[NAMES.index(colour)] >= MIN_AREA else dominant
    tr = track(labels, primary)
    vis = tr.visible
    # shape: majority over the frames where the blob is whole
    votes = [s for s in tr.shapes if s is not None]
    shape = max(SHAPES, key=votes.count) if votes else None
    # direction over the first visible frames
    seen = np.nonzero(vis)[0]
    runs = _runs(vis)
    direction = None
    first = np.arange(runs[0][0], min(runs[0][1], runs[0][0] + START_FRAMES)) if runs else seen
    first = first[tr.clear[first]]
    if len(first) >= 3:
        v = np.polyfit(first.astype(float), tr.centroid[first], 1)[0]  # (vx, vy) px/frame
        ax = int(abs(v[1]) > abs(v[0]))
        if abs(v[ax]) >= MIN_SPEED and abs(v[ax]) >= 1.5 * abs(v[1 - ax]):
            direction = (("left", "right"), ("up", "down"))[ax][int(v[ax] > 0)]
    # motion windows and reversals within runs of visible frames
    moves, reverses = [], False
    c = tr.centroid
    joined = []  # runs with a short gap away from the border between them (a covered blob) are one
    for a, b in runs:
        if joined and a - joined[-1][1] <= 4 and not _near_border(c[joined[-1][1] - 1], h, w):
            joined[-1] = (joined[-1][0], b)
        else:
            joined.append((a, b))
    for a, b in joined:
        for t in range(a, b - WINDOW + 1):
            if vis[t] and vis[t + WINDOW - 1]:
                d = _direction(c[t + WINDOW - 1] - c[t])
                if d:
                    moves.append((t, d))
        # a reversal: over the frames where the centroid holds, or twice as large over all of them (a covered
        # blob's centroid wobbles by a few pixels)
        ok = np.arange(a, b)[tr.clear[a:b]]
        for frames, amount in ((ok, MIN_MOVE), (np.arange(a, b)[vis[a:b]], 2 * MIN_MOVE)):
            for k in (0, 1):
                for i, sign in _reversals(_smooth(c[frames, k]), amount) if len(frames) >= 2 else ():
                    # at a wall: the blob's edge on the side it was moving to is within WALL px of the border
                    edges = tr.box[frames[max(0, i - 1):i + 2]]
                    size = (w, h)[k]
                    reverses |= bool(np.nanmin(edges[:, k]) <= WALL if sign < 0 else
                                     np.nanmax(edges[:, k + 2]) >= size - WALL)
    # leaving and coming back
    leaves = comes_back = False
    out_of_frame = np.zeros(t_len, bool)  # frames after leaving by the border, until back in view
    if len(seen):
        t = int(seen[0])
        while t < t_len:
            if vis[t]:
                t += 1
                continue
            gone = t  # first frame out of view after being seen
            back = gone
            while back < t_len and not vis[back]:
                back += 1
            if (back - gone >= 2 or back == t_len) and _near_border(tr.centroid[gone - 1], h, w):
                leaves = True
                out_of_frame[gone:back] = True
                if back < t_len - 1 and vis[back + 1] and _near_border(tr.centroid[back], h, w):
                    comes_back = True
            t = back
    # colours that appear later
    appeared = {}
    for i, name in enumerate(NAMES):
        if name == primary or counts[:3, i].max() >= MIN_AREA:
            continue
        big = counts[:, i] >= APPEAR_AREA
        on = [t for t in range(3, t_len - 2) if big[t:t + 3].all()]
        if not on:
            continue
        ta = on[0]
        tr2 = track(labels[ta:], name)
        # a second object, not the primary changing colour: both in view, APART, for TOGETHER frames after it
        # comes (not necessarily in a row) and the primary still in view 2 TOGETHER frames after it (or at the
        # end), or the primary out of the frame then (it left by the border)
        after = np.arange(ta, t_len)
        gap = np.linalg.norm(tr.centroid[after] - tr2.centroid, axis=1)  # nan where either is out of view
        together = int(((tr.area[after] >= APPEAR_AREA) & (tr2.area >= APPEAR_AREA) & (gap >= APART)).sum())
        later = np.arange(min(ta + 2 * TOGETHER, t_len - 1), t_len)  # and the primary still there (or out) later
        still = bool((tr.area[later] >= APPEAR_AREA).any() or out_of_frame[later].any())
        both = (together >= TOGETHER and still) or bool(out_of_frame[after].any())
        if both:
            votes2 = [s for s in tr2.shapes if s is not None]
            appeared[name] = (ta, max(SHAPES, key=votes2.count) if votes2 else None)
    return Facts(dominant, shape, direction, moves, reverses, leaves, comes_back, appeared)


def _turns_to(moves, d) -> bool:
    """A window moving `d` after one that moves elsewhere."""
    other = [t for t, m in moves if m != d]
    return bool(other) and any(m == d and t > other[0] for t, m in moves)


def judge(frames_u8: np.ndarray, prompt: str | Claims) -> dict[str, bool]:
    """Hit (True) or miss for each attribute the prompt names (ATTRIBUTES; only those it names)."""
    c = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if c is None:
        raise ValueError(f"{prompt!r} is not in the demo language (dfjax.synthetic).")
    f = describe(frames_u8, c.colour)
    out = {"colour": f.colour == c.colour, "shape": f.shape == c.shape, "direction": f.direction == c.direction}
    if c.bounces:
        out["bounces"] = f.reverses
    if c.turns:
        out["turns"] = all(_turns_to(f.moves, d) for d in c.turns)
    if c.leaves:
        out["leaves the frame"] = f.leaves
    if c.comes_back:
        out["comes back"] = f.comes_back
    if c.second is not None:
        got = f.appeared.get(c.second[0])
        out["appears"] = got is not None
        out["second shape"] = got is not None and got[1] == c.second[1]
    return out


# ---------------------------------------------------------------- the detector against the ground truth

def _true_motion(obj, n: int):
    """Per frame t < n-1: the direction of the object's motion from t to t+1 while it is in view at both, else None."""
    pos, vis = obj["pos"][:n], obj["visible"][:n]
    out = []
    for t in range(n - 1):
        d = pos[t + 1] - pos[t]
        if not (vis[t] and vis[t + 1]) or not np.abs(d).max() > 0:
            out.append(None)
            continue
        ax = int(abs(d[1]) > abs(d[0]))
        out.append((("left", "right"), ("up", "down"))[ax][int(d[ax] > 0)])
    return out


def _whole_apart(clip, n: int) -> bool:
    """The second object is, in some frame after it appears, fully in the frame and clear of the primary."""
    a, b = clip.objects
    for t in range(n):
        if not b["visible"][t]:
            continue
        x, y = b["pos"][t]
        r = 1.2 * b["radius"]
        h, w = clip.frames.shape[1:3]
        if not (r + 1 < x < w - r - 1 and r + 1 < y < h - r - 1):
            continue
        if not a["visible"][t] or np.linalg.norm(a["pos"][t] - b["pos"][t]) > 1.2 * (a["radius"] + b["radius"]) + 5:
            return True
    return False


def truth_statements(clip, n: int):
    """(attribute, Claims, true?) statements about a ground-truth clip cut to its first n frames: every event it shows
    clearly, and for each kind of event one it clearly does not show (cases too close to call, such as an event in
    the last frames, are left out). The colour, shape and direction come as the clip's own claims."""
    first = clip.objects[0]
    c = parse_prompt(clip.prompt)
    base = Claims(c.colour, c.shape, c.direction)
    out = [("colour", base, True), ("shape", base, True), ("direction", base, True)]
    motion = _true_motion(first, n)
    size = (clip.frames.shape[2], clip.frames.shape[1])  # (width, height)
    vis = first["visible"][:n]

    def flip_at(t):  # a visible reversal at frame t: motion before and after along one axis, opposite
        a, b = motion[t - 1] if t else None, motion[t]
        return a is not None and b is not None and a != b and {a, b} in ({"left", "right"}, {"up", "down"})

    def at_wall(t):  # the flip's axis: the shape's centre within its radius (+ one step) of a wall
        ax = 0 if motion[t] in ("left", "right") else 1
        p, r = first["pos"][t][ax], first["radius"]
        return min(p - r, size[ax] - p - r) <= 3.0

    flips = [t for t in range(1, n - 1) if flip_at(t) and at_wall(t)]
    clear = [t for t in flips if all(motion[s] is not None for s in range(max(0, t - 6), min(n - 1, t + 6)))
             and t + 6 < n - 1 and t >= 6]
    if clear:
        out.append(("bounces", Claims(**{**base.__dict__, "bounces": True}), True))
    elif not flips:
        out.append(("bounces", Claims(**{**base.__dict__, "bounces": True}), False))
    for d in DIRECTIONS:  # "turns d": moves d for WINDOW frames after moving elsewhere
        seq = [(t, m) for t, m in enumerate(motion) if m is not None]
        after = [t for t, m in seq if m != d]
        later = [t for t, m in seq if m == d and after and t > after[0]]
        long_run = any(all(motion[s] == d for s in range(t, t + WINDOW + 1)) for t in later if t + WINDOW < n - 1)
        if long_run and d in c.turns:
            out.append(("turns", Claims(**{**base.__dict__, "turns": [d]}), True))
        elif not later and not any(s == "turns" for s, _, v in out if v is False):
            out.append(("turns", Claims(**{**base.__dict__, "turns": [d]}), False))
    gone = [t for t in range(1, n) if vis[t - 1] and not vis[t]]
    if gone and gone[0] <= n - 2:
        out.append(("leaves the frame", Claims(**{**base.__dict__, "leaves": True}), True))
        back = [t for t in range(gone[0], n) if vis[t]]
        if back and n - back[0] >= 4:
            out.append(("comes back", Claims(**{**base.__dict__, "comes_back": True}), True))
        elif not back:
            out.append(("comes back", Claims(**{**base.__dict__, "comes_back": True}), False))
    elif vis.all():
        out.append(("leaves the frame", Claims(**{**base.__dict__, "leaves": True}), False))
        out.append(("comes back", Claims(**{**base.__dict__, "comes_back": True}), False))
    others = [k for k in NAMES if k != first["colour"]]
    if len(clip.objects) == 2:
        second = clip.objects[1]
        appear = int(np.argmax(second["visible"]))
        if appear <= n - 4:
            claim = Claims(**{**base.__dict__, "second": (second["colour"], second["shape"])})
            out.append(("appears", claim, True))
            if _whole_apart(clip, n):
                out.append(("second shape", claim, True))
        others = [k for k in others if k != second["colour"]]
    absent = others[clip_hash(clip) % len(others)]
    out.append(("appears", Claims(**{**base.__dict__, "second": (absent, "circle")}), False))
    return out


def clip_hash(clip) -> int:
    return sum(map(ord, clip.prompt)) + int(clip.objects[0]["radius"] * 1000)


def validate(num: int = 200, frames: int = 57, seed: int = 0, start: int = 60_000_000,
             lang: SyntheticConfig = SyntheticConfig()) -> dict:
    """The detector on `num` ground-truth clips of the language `lang` (dfjax.synthetic.make_clip, `frames` long):
    per attribute, how many statements it got right, of how many, and how many of those were true (the rest
    false)."""
    import dataclasses

    from dfjax.synthetic import make_clip, to_uint8

    cfg = dataclasses.replace(lang, frames=frames)
    stats = {a: dict(right=0, judged=0, true=0) for a in ATTRIBUTES}
    wrong = []
    for i in range(start, start + num):
        clip = make_clip(i, seed, cfg)
        px = to_uint8(clip.frames)
        facts = describe(px, clip.objects[0]["colour"])
        for attr, claim, truth in truth_statements(clip, frames):
            got = _verdict(facts, claim, attr)
            s = stats[attr]
            s["judged"] += 1
            s["true"] += truth
            s["right"] += got == truth
            if got != truth:
                wrong.append(dict(index=i, attribute=attr, truth=truth, prompt=clip.prompt))
    for s in stats.values():
        s["accuracy"] = s["right"] / s["judged"] if s["judged"] else None
    return dict(clips=num, frames=frames, seed=seed, start=start, attributes=stats, wrong=wrong)


def _verdict(f: Facts, c: Claims, attr: str) -> bool:
    if attr == "colour":
        return f.colour == c.colour
    if attr == "shape":
        return f.shape == c.shape
    if attr == "direction":
        return f.direction == c.direction
    if attr == "bounces":
        return f.reverses
    if attr == "turns":
        return all(_turns_to(f.moves, d) for d in c.turns)
    if attr == "leaves the frame":
        return f.leaves
    if attr == "comes back":
        return f.comes_back
    got = f.appeared.get(c.second[0])
    if attr == "appears":
        return got is not None
    return got is not None and got[1] == c.second[1]


# ---------------------------------------------------------------- the measurement

HELD_OUT_START = 40_000_000  # clip indices of the held-out prompts (training draws clips 0 .. clips-1)


def training_language(meta: dict) -> tuple[SyntheticConfig, int, int]:
    """(the SyntheticConfig, seed and clip count) a demo model folder was trained on, from its config.json."""
    import dataclasses

    t = meta.get("training", {}).get("config", {})
    names = {f.name for f in dataclasses.fields(SyntheticConfig)}
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in t.items() if k in names}
    if "speed_min" in t:  # train-demo records the speed range as two numbers
        given["speed"] = (float(t["speed_min"]), float(t["speed_max"]))
    return SyntheticConfig(**given), int(t.get("seed", 0)), int(t.get("clips", 0))


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a hit rate."""
    if not n:
        return None
    p = hits / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(max(0.0, mid - half)), float(min(1.0, mid + half))


def _table(rows: list[dict], key: str = "hits") -> dict:
    out = {}
    for attr in ATTRIBUTES:
        got = [r[key][attr] for r in rows if attr in r[key]]
        if got:
            n, h = len(got), int(sum(got))
            out[attr] = dict(judged=n, hits=h, rate=h / n, ci95=wilson(h, n))
    return out


def _by_value(rows: list[dict]) -> dict:
    """Colour, shape and direction hit rates split by the value the prompt names."""
    out = {}
    for attr in ("colour", "shape", "direction"):
        groups: dict = {}
        for r in rows:
            groups.setdefault(getattr(parse_prompt(r["prompt"]), attr), []).append(r["hits"][attr])
        out[attr] = {v: dict(judged=len(g), hits=int(sum(g)), rate=sum(g) / len(g)) for v, g in sorted(groups.items())}
    return out


def plain_prompts(num: int) -> list[str]:
    """Prompts that name no event ("a red square moves left"): every colour, shape and direction (60) in turn."""
    import itertools

    combos = list(itertools.product(NAMES, SHAPES, DIRECTIONS))
    return [f"a {c} {s} moves {d}" for c, s, d in (combos[i % len(combos)] for i in range(num))]


def run_adherence(model_folder=None, num: int = 128, frames=(57, 33), demo_seeds: int = 16, plain: int = 60,
                  validate_clips: int = 200, start: int = HELD_OUT_START, log=print) -> dict:
    """Held-out prompts of the model's training language (clip `start + i`, seed i), judged at every length in
    `frames` (a video cut to its first n frames is the n-frame video of the same seed: the loop and the VAE are
    causal, so the longest is made once), next to the same judgement of the clip itself; the demo prompts (seeds
    0 .. demo_seeds-1) and event-free prompts (seed i) at the model's default length."""
    import dataclasses

    import jax

    from dfjax.api import load
    from dfjax.bench import environment
    from dfjax.demo import demo_model_folder
    from dfjax.model_io import read_config
    from dfjax.synthetic import DEMO_PROMPTS, make_clip, to_uint8

    folder = Path(model_folder) if model_folder else demo_model_folder()
    meta = read_config(folder)
    lang, data_seed, train_clips = training_language(meta)
    if start < train_clips:
        raise ValueError(f"held-out clips must start at or after {train_clips} (the training clips); got {start}.")
    default_frames = meta.get("defaults", {}).get("frames", 33)
    frames = sorted(set(frames), reverse=True)
    t0 = time.perf_counter()
    pipe = load(folder, frames=frames[0])
    clips = [make_clip(start + i, data_seed, lang) for i in range(num)]
    train_list = [clip_spec(i, data_seed, lang).prompt for i in range(train_clips)]
    train_prompts = set(train_list)
    sets = {"held-out": [(c.prompt, i, c) for i, c in enumerate(clips)],
            "demo": [(p, s, None) for p in DEMO_PROMPTS for s in range(demo_seeds)],
            "plain": [(p, i, None) for i, p in enumerate(plain_prompts(plain))]}
    short = load(folder, frames=default_frames) if default_frames != frames[0] else pipe
    videos = {}
    for name, items in sets.items():
        for k, (prompt, seed, _) in enumerate(items):
            if (prompt, seed) not in videos:
                videos[prompt, seed] = (pipe if name == "held-out" else short).generate(prompt, seed=seed)
            if k % 16 == 0:
                log(f"[{time.perf_counter() - t0:5.0f} s] {name} {k + 1}/{len(items)}: {prompt}")
    tables, runs = {}, []
    for n in frames:
        rows = []
        for prompt, seed, clip in sets["held-out"]:
            rows.append(dict(prompt=prompt, seed=seed, clip=start + seed, frames=n,
                             hits=judge(videos[prompt, seed][:n], prompt),
                             data=judge(to_uint8(clip.frames[:n]), prompt)))
        tables[f"held-out@{n}"] = dict(set="held-out", frames=n, model=_table(rows), data=_table(rows, "data"),
                                       by_value=_by_value(rows))
        runs += rows
    for name in ("demo", "plain"):
        rows = [dict(prompt=p, seed=s, frames=default_frames, hits=judge(videos[p, s][:default_frames], p))
                for p, s, _ in sets[name]]
        tables[f"{name}@{default_frames}"] = dict(set=name, frames=default_frames, model=_table(rows),
                                                  by_value=_by_value(rows))
        if name == "demo":
            tables[f"{name}@{default_frames}"]["per_prompt"] = {
                p: _table([r for r in rows if r["prompt"] == p]) for p in DEMO_PROMPTS}
        runs += rows
    gen_s = time.perf_counter() - t0
    checks = [validate(validate_clips, n, data_seed, 60_000_000, lang) for n in frames] if validate_clips else []
    for c in checks:
        c["wrong"] = c["wrong"][:20]
    return dict(
        model=str(folder), model_training=dict(device=meta.get("training", {}).get("device"),
                                               clips=train_clips, seed=data_seed),
        language={k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(lang).items()},
        held_out=dict(start=start, num=num, seed=data_seed,
                      prompt_strings_also_in_training=sum(c.prompt in train_prompts for c in clips)),
        training_prompts_naming_no_event=sum("," not in p for p in train_list) / max(1, len(train_list)),
        default_frames=default_frames, frames=frames, demo_seeds=demo_seeds, plain=plain,
        sampling=meta.get("sampling"), tables=tables, detector=dict(
            constants={k: globals()[k] for k in ("COLOUR_DIST", "MIN_AREA", "APPEAR_AREA", "SHAPE_AREA",
                                                 "START_FRAMES", "WINDOW", "MIN_MOVE", "MIN_SPEED", "BORDER",
                                                 "FILL_SQUARE", "FILL_TRIANGLE", "TRIANGLE_CENTROID")},
            validation=checks),
        runs=runs, seconds=round(time.perf_counter() - t0, 1), generation_seconds=round(gen_s, 1),
        backend=jax.default_backend(), **environment())


# ---------------------------------------------------------------- reports

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def markdown(res: dict) -> str:
    t, h, lang = res["tables"], res["held_out"], res["language"]
    described = f", prompts naming the events before frame {lang['describe_frames']}" if lang.get("describe_frames") else ""
    lines = [
        "# Prompt adherence of the demo model",
        "",
        f"Model `{Path(res['model']).name}` (trained on {res['model_training']['device']}, clips 0 .. "
        f"{res['model_training']['clips'] - 1} of data seed {res['model_training']['seed']}, {lang['frames']}-frame "
        f"clips{described}), sampler {res['sampling']['denoising_steps']} (shift {res['sampling']['shift']}). "
        f"Held-out prompts: the prompts of clips {h['start']} .. {h['start'] + h['num'] - 1} of the same language and "
        f"data seed, never drawn in training (training draws clips 0 .. clips-1; "
        f"{h['prompt_strings_also_in_training']} of the {h['num']} prompt strings also occur word for word among the "
        f"training prompts, the language being small; their clips differ), video i with seed i. Each attribute is "
        f"judged on the videos whose prompt names it (`dfjax.adherence`: detector on the decoded frames). "
        f"*Data*: the same detector on the prompt's own ground-truth clip cut to as many frames (what the language "
        f"itself shows in that many frames). 95 % Wilson intervals.",
        "",
    ]
    held = sorted((v for v in t.values() if v["set"] == "held-out"), key=lambda v: -v["frames"])
    head = "| attribute | " + " | ".join(f"{v['frames']} frames: videos | model | 95 % interval | data"
                                           for v in held) + " |"
    lines += [head, "|---|" + "---|---|---|---|" * len(held)]
    for attr in ATTRIBUTES:
        cells = []
        for v in held:
            m, d = v["model"].get(attr), v["data"].get(attr)
            if m is None:
                cells.append("- | - | - | -")
                continue
            lo, hi = m["ci95"]
            cells.append(f"{m['judged']} | **{_pct(m['rate'])}** | {_pct(lo)} - {_pct(hi)} | {_pct(d['rate'])}")
        lines.append(f"| {attr} | " + " | ".join(cells) + " |")
    lines += ["", "The same, split by the colour, shape or direction the prompt names (hits / videos):", "",
              "| attribute | named | " + " | ".join(f"{v['frames']} frames" for v in held) + " |",
              "|---|---|" + "---|" * len(held)]
    for attr, groups in held[0]["by_value"].items():
        for value in groups:
            cells = [v["by_value"][attr][value] for v in held]
            lines.append(f"| {attr} | {value} | " + " | ".join(f"{c['hits']} / {c['judged']} ({_pct(c['rate'])})"
                                                               for c in cells) + " |")
    d = res["default_frames"]
    demo, plain = t[f"demo@{d}"], t[f"plain@{d}"]
    lines += ["", f"The demo prompts (`dfjax.synthetic.DEMO_PROMPTS`) at the default {d} frames, seeds 0 .. "
              f"{res['demo_seeds'] - 1}: hit rate per attribute the prompt names.", "",
              "| prompt | " + " | ".join(ATTRIBUTES) + " |", "|---|" + "---|" * len(ATTRIBUTES)]
    for prompt, tab in demo["per_prompt"].items():
        lines.append(f"| {prompt} | " + " | ".join(_pct(tab[a]["rate"]) if a in tab else "" for a in ATTRIBUTES)
                     + " |")
    lines += ["", f"Prompts that name no event (\"a red square moves left\"; {res['plain']} of them: every colour, "
              f"shape and direction in turn, seed i) at {d} frames; such prompts are "
              f"{100 * res['training_prompts_naming_no_event']:.1f} % of this model's training prompts (see "
              f"`dfjax.synthetic.SyntheticConfig.describe_frames`):", "",
              "| attribute | videos | model | by the value named (hits / videos) |", "|---|---|---|---|"]
    for attr, m in plain["model"].items():
        split = ", ".join(f"{v} {c['hits']}/{c['judged']}" for v, c in plain["by_value"][attr].items())
        lines.append(f"| {attr} | {m['judged']} | {_pct(m['rate'])} | {split} |")
    lines += ["", "The detector on ground-truth clips (`dfjax.adherence.validate`: statements true of the clip and, "
              "for the events, statements clearly false of it, from the simulated trajectories):", "",
              "| frames | clips | " + " | ".join(ATTRIBUTES) + " |", "|---|---|" + "---|" * len(ATTRIBUTES)]
    for c in res["detector"]["validation"]:
        a = c["attributes"]
        lines.append(f"| {c['frames']} | {c['clips']} | " + " | ".join(
            f"{100 * a[k]['accuracy']:.1f} % of {a[k]['judged']}" if a[k]["judged"] else "-" for k in ATTRIBUTES)
            + " |")
    lines += ["", f"Generated on {res['device']} ({res['backend']}), jax {res['jax_version']}, flax "
              f"{res['flax_version']}, Python {res['python']}, {res['date']}, commit {res['git_commit']}, in "
              f"{res['seconds']:.0f} s by `dfjax adherence`; every video's verdicts in adherence.json.", ""]
    return "\n".join(lines)


def write_reports(res: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "adherence.json", out / "adherence.md"]
    paths[0].write_text(json.dumps(res, indent=1))
    paths[1].write_text(markdown(res))
    return paths


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfjax adherence", description="Prompt adherence of the demo model: a table "
                                "of the hit rate per attribute on held-out prompts of its language.")
    p.add_argument("--model", help="a demo model folder (default: the built-in demo model)")
    p.add_argument("--prompts", type=int, default=128, help="held-out prompts (default 128)")
    p.add_argument("--frames", default="57,33", help="comma-separated lengths the held-out videos are judged at "
                                                     "(default 57,33: the language's clips and the demo default)")
    p.add_argument("--demo-seeds", type=int, default=16, help="seeds per demo prompt (default 16)")
    p.add_argument("--plain", type=int, default=60, help="prompts that name no event (default 60: every colour, shape "
                                                         "and direction)")
    p.add_argument("--validate", type=int, default=200, metavar="N",
                   help="check the detector on N ground-truth clips per length (default 200; 0: skip)")
    p.add_argument("--start", type=int, default=HELD_OUT_START, help="first held-out clip index")
    p.add_argument("--out", default="benchmarks/results", help="folder for adherence.json / .md")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        frames = [int(f) for f in a.frames.split(",")]
    except ValueError:
        print(f"dfjax adherence: error: --frames takes comma-separated numbers, got {a.frames!r}", file=sys.stderr)
        return 2
    res = run_adherence(a.model, a.prompts, frames, a.demo_seeds, a.plain, a.validate, a.start,
                        log=lambda s: print(s, flush=True))
    for path in write_reports(res, Path(a.out)):
        print(f"wrote {path}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
