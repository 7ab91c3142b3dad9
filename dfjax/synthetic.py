"""Synthetic text-video clips for the built-in demo model: coloured shapes that move, with a prompt.

Every clip is a pure function of (seed, index): its random parameters come from
numpy.random.default_rng([seed, index]), so clip i is the same whatever the batch or process it is
drawn in. A clip has a primary shape (square, circle or triangle; red, green, blue, yellow or
white) that moves left, right, up or down and then, by its scenario,

  bounce:  reflects off the walls it reaches ("... moves left, then bounces");
  turn:    changes direction at a random frame ("... moves left, then turns up"), reflecting off walls;
  exit:    runs out of the frame, stays out a few frames, and comes back ("... leaves the frame, then
           comes back");

The primary shape starts at the middle of the side it moves away from (or, for exit, of the side
it leaves by), so the first frames follow from the prompt up to a few pixels of jitter; its speed,
turn time and the rest do not. Half of the clips get a second shape that pops in near the centre
later and moves on its own, drawn over or under the first (occlusion): "..., then a blue circle
appears". The prompt lists the events in the order they happen within the clip's frames (or, with
describe_frames, within its first frames). Predicting a frame needs history: the position and the
velocity come from earlier frames, the identity from the first frame or the text, and an exited
shape's return from frames several chunks back.

Pixels are float32 in [-1, 1], [frames, H, W, 3], anti-aliased (coverage = clip(0.5 - signed
distance, 0, 1)) on a dark background.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

COLOURS = {  # RGB in [0, 1]
    "red": (0.92, 0.16, 0.14),
    "green": (0.16, 0.82, 0.22),
    "blue": (0.18, 0.36, 1.00),
    "yellow": (0.96, 0.88, 0.12),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUND = (0.06, 0.06, 0.10)
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SCENARIOS = ("bounce", "turn", "exit")

# prompts in the demo model's language (dfjax.synthetic.VOCABULARY: colours red, green, blue, yellow, white;
# shapes square, circle, triangle; moves left/right/up/down, bounces, turns <dir>, leaves the frame, comes back,
# "then a <colour> <shape> appears"). The ones shown: prompts on which the shipped model shows every attribute
# they name in at least 90 % of seeds at the default 33 frames (benchmarks/results/adherence.md, 16 seeds each).
# They name no event: at 33 frames it shows none of them that often (bounces, turns and a second shape mostly
# come after frame 33 in its training clips), and of the event-free prompts it follows "moves down" only.
DEMO_PROMPTS = [
    "a red circle moves down",
    "a blue triangle moves down",
    "a green circle moves down",
    "a white triangle moves down",
    "a yellow circle moves down",
]
# generation defaults stored with the demo model: 64x64, 33 frames (9 latent frames, 3 chunks)
DEMO_DEFAULTS = {"height": 64, "width": 64, "frames": 33, "fps": 8}


@dataclass(frozen=True)
class SyntheticConfig:
    height: int = 64
    width: int = 64
    frames: int = 57  # 4k+1: 57 frames = 15 latent frames = 5 chunks of 3
    radius: tuple[float, float] = (7.0, 10.0)  # shape size (circumradius-like), pixels
    speed: tuple[float, float] = (0.8, 1.6)  # pixels per frame
    second_shape_p: float = 0.5
    scenario_p: tuple[float, float, float] = (0.45, 0.3, 0.25)  # bounce, turn, exit
    # > 0: the prompt names only the events before this frame, and the clip goes on past it unnamed (a prompt then
    # says what the first frames show, not the whole clip); 0: every event of the clip. The shipped demo model
    # was trained with 0, where a prompt without an event ("a red square moves left") is 0.7 % of the clips
    describe_frames: int = 0


@dataclass
class Clip:
    frames: np.ndarray | None  # [F, H, W, 3] float32 in [-1, 1]
    prompt: str
    objects: list = field(default_factory=list)  # [primary, second?]: dict(colour, shape, pos [F, 2], visible [F], radius)
    draw_order: list = field(default_factory=list, repr=False)


def _direction_name(v) -> str:
    for name, d in DIRECTIONS.items():
        if np.sign(v[0]) == d[0] and np.sign(v[1]) == d[1]:
            return name
    raise ValueError(v)


def _inside(x, y, r, w, h) -> bool:
    return x + r > 0 and x - r < w and y + r > 0 and y - r < h


def _simulate_primary(rng, cfg: SyntheticConfig):
    """Positions [F, 2] and visibility [F] of the primary shape, and its events [(frame, words)]."""
    w, h, n = cfg.width, cfg.height, cfg.frames
    scenario = SCENARIOS[rng.choice(3, p=cfg.scenario_p)]
    r = rng.uniform(*cfg.radius)
    d = list(DIRECTIONS)[rng.integers(4)]
    v = np.array(DIRECTIONS[d])
    if scenario == "exit":
        speed = rng.uniform(1.5, 2.5)
        # start near the wall it runs towards, so that it is out and back within the clip
        gap = r + rng.uniform(1.0, 3.0)
        along = {"left": gap, "right": w - gap, "up": gap, "down": h - gap}[d]
        span = h if d in ("left", "right") else w
        across = span / 2 + rng.uniform(-3.0, 3.0)
        x, y = (along, across) if d in ("left", "right") else (across, along)
        out_frames = int(rng.integers(3, 10))
    else:
        # start on the side it moves away from (jittered), so that the first frames follow from the prompt
        speed = rng.uniform(*cfg.speed)
        back = r + rng.uniform(1.0, 3.0)
        along = {"left": w - back, "right": back, "up": h - back, "down": back}[d]
        span = h if d in ("left", "right") else w
        across = span / 2 + rng.uniform(-3.0, 3.0)
        x, y = (along, across) if d in ("left", "right") else (across, along)
    turn_at = int(rng.integers(8, max(9, n - 12))) if scenario == "turn" else -1
    vel = v * speed
    events = [(0, f"moves {d}")]
    pos = np.zeros((n, 2), np.float32)
    vis = np.zeros((n,), bool)
    state = "in"  # exit scenario: in -> out -> back
    out_since = 0
    for f in range(n):
        pos[f] = (x, y)
        vis[f] = _inside(x, y, r, w, h)
        if f == turn_at:
            choices = [k for k in DIRECTIONS if k != _direction_name(vel)]
            d2 = choices[rng.integers(len(choices))]
            vel = np.array(DIRECTIONS[d2]) * speed
            events.append((f, f"turns {d2}"))
        x, y = x + vel[0], y + vel[1]
        if scenario == "exit" and state == "in":
            if not _inside(x, y, r, w, h):
                state, out_since = "out", f + 1
                events.append((f + 1, "leaves the frame"))
            continue
        if scenario == "exit" and state == "out":
            if f + 1 - out_since >= out_frames:
                vel = -vel
                state = "back"
            continue
        if scenario == "exit" and state == "back" and not _inside(x - vel[0], y - vel[1], r, w, h):
            if _inside(x, y, r, w, h):
                events.append((f + 1, "comes back"))
            continue
        bounced = False
        if x - r < 0 and vel[0] < 0 or x + r > w and vel[0] > 0:
            vel[0] = -vel[0]
            x = -x + 2 * r if x - r < 0 else 2 * (w - r) - x
            bounced = True
        if y - r < 0 and vel[1] < 0 or y + r > h and vel[1] > 0:
            vel[1] = -vel[1]
            y = -y + 2 * r if y - r < 0 else 2 * (h - r) - y
            bounced = True
        if bounced:
            events.append((f + 1, "bounces"))
    return pos, vis, r, events


def _simulate_second(rng, cfg: SyntheticConfig, primary):
    w, h, n = cfg.width, cfg.height, cfg.frames
    appear = int(rng.integers(8, max(9, min(n - 12, 33))))
    r = rng.uniform(*cfg.radius)
    x, y = w / 2 + rng.uniform(-3.0, 3.0), h / 2 + rng.uniform(-3.0, 3.0)  # pops in near the centre
    vel = np.array(DIRECTIONS[list(DIRECTIONS)[rng.integers(4)]]) * rng.uniform(*cfg.speed)
    pos = np.zeros((n, 2), np.float32)
    vis = np.zeros((n,), bool)
    for f in range(n):
        pos[f] = (x, y)
        vis[f] = f >= appear
        if f >= appear:
            x, y = x + vel[0], y + vel[1]
            if x - r < 0 and vel[0] < 0 or x + r > w and vel[0] > 0:
                vel[0] = -vel[0]
            if y - r < 0 and vel[1] < 0 or y + r > h and vel[1] > 0:
                vel[1] = -vel[1]
    return pos, vis, r, appear


def _coverage(shape: str, pos, r, cfg: SyntheticConfig) -> np.ndarray:
    """[F, H, W] anti-aliased coverage of a shape centred at pos [F, 2]."""
    yy, xx = np.mgrid[0:cfg.height, 0:cfg.width].astype(np.float32) + 0.5
    dx = xx[None] - pos[:, 0, None, None]
    dy = yy[None] - pos[:, 1, None, None]
    if shape == "circle":
        sd = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        sd = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    else:  # an upward equilateral triangle with circumradius 1.2 r, centroid at pos
        R = 1.2 * r
        inr = R / 2  # inradius
        sd = dy - inr  # bottom edge
        for a in (math.radians(30), math.radians(150)):  # the two slanted edges' outward normals
            sd = np.maximum(sd, -(dx * math.cos(a) + dy * math.sin(a)) - inr)
    return np.clip(0.5 - sd, 0.0, 1.0).astype(np.float32)


def _describe(colour, shape, events, second, frames) -> str:
    first, rest = events[0], [e for e in events[1:] if e[0] < frames]
    if second is not None and second[2] < frames:
        rest.append((second[2], f"a {second[0]} {second[1]} appears"))
    rest.sort(key=lambda e: e[0])
    rest = [e for i, e in enumerate(rest) if i == 0 or e[1] != rest[i - 1][1]]  # "bounces, bounces" -> "bounces"
    text = f"a {colour} {shape} {first[1]}"
    for i, (_, words) in enumerate(rest):
        text += (", then " if i == len(rest) - 1 else ", ") + words
    return text


def clip_spec(index: int, seed: int = 0, cfg: SyntheticConfig = SyntheticConfig()) -> Clip:
    """Clip `index` of the data set `seed` without its pixels (frames=None): shapes, trajectories, prompt."""
    rng = np.random.default_rng([seed, index])
    colours, shapes = list(COLOURS), list(SHAPES)
    c1, s1 = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
    pos1, vis1, r1, events = _simulate_primary(rng, cfg)
    first = dict(colour=c1, shape=s1, pos=pos1, visible=vis1, radius=r1)
    draw, second = [first], None
    if rng.uniform() < cfg.second_shape_p:
        while True:  # differ from the first shape in colour (so that the two are told apart)
            c2, s2 = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
            if c2 != c1:
                break
        pos2, vis2, r2, appear = _simulate_second(rng, cfg, pos1)
        second = (c2, s2, appear)
        obj2 = dict(colour=c2, shape=s2, pos=pos2, visible=vis2, radius=r2)
        draw = [first, obj2] if rng.uniform() < 0.5 else [obj2, first]  # draw order: who occludes whom
    clip = Clip(None, _describe(c1, s1, events, second, cfg.describe_frames or cfg.frames), [first] + [o for o in draw if o is not first])
    clip.draw_order = draw
    return clip


def render(clip: Clip, cfg: SyntheticConfig = SyntheticConfig()) -> np.ndarray:
    """The pixels of a clip spec: [F, H, W, 3] float32 in [-1, 1]."""
    img = np.broadcast_to(np.asarray(BACKGROUND, np.float32), (cfg.frames, cfg.height, cfg.width, 3)).copy()
    for o in clip.draw_order:
        a = _coverage(o["shape"], o["pos"], o["radius"], cfg) * o["visible"][:, None, None]
        img += a[..., None] * (np.asarray(COLOURS[o["colour"]], np.float32) - img)
    return img * 2 - 1


def make_clip(index: int, seed: int = 0, cfg: SyntheticConfig = SyntheticConfig()) -> Clip:
    """Clip `index` of the data set `seed`: the same pixels and prompt on every call and machine."""
    clip = clip_spec(index, seed, cfg)
    clip.frames = render(clip, cfg)
    return clip


def make_batch(indices, seed: int = 0, cfg: SyntheticConfig = SyntheticConfig()):
    """(videos [B, F, H, W, 3] float32 in [-1, 1], prompts) of clips `indices`."""
    clips = [make_clip(int(i), seed, cfg) for i in indices]
    return np.stack([c.frames for c in clips]), [c.prompt for c in clips]


def make_dataset(num: int, seed: int = 0, cfg: SyntheticConfig = SyntheticConfig(), workers: int = 1):
    """Clips 0..num-1 as (uint8 videos [num, F, H, W, 3], prompts); `workers` processes share the work."""
    if workers > 1 and num >= 64:
        from concurrent.futures import ProcessPoolExecutor

        parts = np.array_split(np.arange(num), workers * 4)
        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(_uint8_part, [(p, seed, cfg) for p in parts]))
        return np.concatenate([r[0] for r in results]), [p for r in results for p in r[1]]
    return _uint8_part((np.arange(num), seed, cfg))


def _uint8_part(args):
    indices, seed, cfg = args
    videos, prompts = make_batch(indices, seed, cfg)
    return to_uint8(videos), prompts


def to_uint8(x) -> np.ndarray:
    return np.clip(np.rint((np.asarray(x, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(x) -> np.ndarray:
    return np.asarray(x, np.float32) / 127.5 - 1.0


VOCABULARY = (*COLOURS, *SHAPES, *DIRECTIONS, *"a moves turns bounces leaves the frame then comes back appears".split())


def unknown_words(prompt: str) -> list[str]:
    """The words of a prompt outside the demo language, in order of first appearance."""
    words = re.findall(r"[a-z]+", prompt.lower())
    return list(dict.fromkeys(w for w in words if w not in VOCABULARY))


def prompt_corpus(num: int = 2000, seed: int = 0, cfg: SyntheticConfig = SyntheticConfig()) -> list[str]:
    """Tokenizer training text: the prompts of the first `num` clips, plus every word of the vocabulary as a
    sentence of its own, 20 times (so that a tiny unigram model keeps whole words as pieces)."""
    return [clip_spec(i, seed, cfg).prompt for i in range(num)] + [w for w in VOCABULARY for _ in range(20)]


# ---------------------------------------------------------------- measuring generated frames

def colour_fractions(frames_uint8: np.ndarray) -> dict[str, float]:
    """Share of pixels [..., 3] (uint8) nearest to each palette colour (background included), among pixels
    within a distance of 60 (of 255) of some palette colour."""
    names = ["background", *COLOURS]
    pal = np.asarray([BACKGROUND, *COLOURS.values()], np.float32) * 255
    x = np.asarray(frames_uint8, np.float32).reshape(-1, 3)
    dist = np.linalg.norm(x[:, None, :] - pal[None], axis=-1)
    nearest = dist.argmin(-1)
    close = dist.min(-1) < 60
    n = max(int(close.sum()), 1)
    return {name: float(((nearest == i) & close).sum()) / n for i, name in enumerate(names)} | {
        "unmatched": 1.0 - float(close.mean())}


def prompt_colours(prompt: str) -> list[str]:
    return [c for c in COLOURS if f" {c} " in f" {prompt} "]
