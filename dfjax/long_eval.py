"""`dfjax long-eval`: what long videos, long context and prompt switches do on the demo model.

Three tables (benchmarks/results/long-video/long_eval.json and .md), judged by the synthetic-clip detector
(dfjax.adherence):

  drift:   a 60 s video per prompt, the sequential baseline (global cache) and Dummy Forcing: per chunk, the PSNR /
           SSIM of Dummy Forcing's frames against the baseline's, and whether each video still shows the prompt's
           colour as its dominant foreground;
  memory:  prompts whose object leaves the frame and comes back; by neighbour window (plain Dummy Forcing and the
           long-context mode at two budgets): how often the object comes back, and comes back with its colour and
           shape;
  switch:  a prompt switch at chunk K: how many chunks until the new prompt's colour is seen (and dominant), with
           and without re-cache.

    dfjax long-eval                       # the committed tables (CPU, about 10 minutes on 2 cores)
    dfjax long-eval --prompts 2 --seconds 10 --out /tmp/le      # a quick check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

FPS = 8  # the demo model's
SWITCH_PAIRS = [("a red square moves left", "a blue circle moves up"),
                ("a white square moves down", "a yellow triangle moves right"),
                ("a green circle moves right", "a red triangle moves down"),
                ("a blue triangle moves up", "a white circle moves left")]
MEMORY = "a {c} {s} moves {d}, leaves the frame, then comes back"


def chunk_frames(run, chunk: int) -> slice:
    """The pixel frames chunk `chunk` decodes to: latent frame k >= 1 gives frames 4k-3 .. 4k."""
    cf = run.sampling.chunk_frames
    first = 0 if chunk == 0 else 4 * chunk * cf - 3
    return slice(first, 4 * (chunk + 1) * cf - 3)


def dominant(labels: np.ndarray) -> str | None:
    from dfjax.adherence import NAMES

    counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(NAMES))
    return NAMES[int(counts.argmax())] if counts.sum() >= 6 else None


def plain_prompts(count: int, template: str = "a {c} {s} moves {d}") -> list[str]:
    """Seeded prompts of the demo language."""
    from dfjax.synthetic import COLOURS, DIRECTIONS, SHAPES

    rng = np.random.default_rng(0)
    return [template.format(c=rng.choice(list(COLOURS)), s=rng.choice(SHAPES), d=rng.choice(list(DIRECTIONS)))
            for _ in range(count)]


def drift(load, prompts, seconds, log):
    from dfjax.adherence import colour_labels, parse_prompt
    from dfjax.fidelity import psnr, ssim

    rows = []
    base, df = load(seconds=seconds), load(seconds=seconds, dummy_forcing=True)
    for i, prompt in enumerate(prompts):
        a, b = base.generate(prompt, seed=i), df.generate(prompt, seed=i)
        colour = parse_prompt(prompt).colour
        for c in range(df.run.dummy.ar_start + 1, base.run.num_chunks):  # the chunks before the plan are the same
            sl = chunk_frames(base.run, c)
            rows.append(dict(prompt=prompt, chunk=c, psnr=psnr(b[sl], a[sl]), ssim=ssim(b[sl], a[sl]),
                             baseline_colour=dominant(colour_labels(a[sl])) == colour,
                             dummy_colour=dominant(colour_labels(b[sl])) == colour))
        log(f"drift {prompt!r}: mean PSNR {np.mean([r['psnr'] for r in rows if r['prompt'] == prompt]):.1f} dB")
    return rows


def comeback(frames, colour: str, shape: str):
    """(left and came back, came back with the same colour, ... and shape) by the detector."""
    from dfjax.adherence import colour_labels, describe, track

    f = describe(frames, colour)
    if not (f.leaves and f.comes_back):
        return False, False, False
    t = track(colour_labels(frames), colour)
    gone = np.flatnonzero(~t.visible)
    back = gone[-1] + 1 if len(gone) and gone[-1] + 1 < len(frames) else None
    if back is None:
        return True, False, False
    later = [s for s in t.shapes[back:] if s is not None]
    same_colour = bool(t.visible[back:].mean() > 0.5)
    return True, same_colour, same_colour and bool(later) and max(set(later), key=later.count) == shape


def memory(load, seconds, count, log):
    prompts = plain_prompts(count, MEMORY)
    rows = []
    for name, opts in (("Dummy Forcing, window 1 chunk", {}), ("long context, 12-frame budget",
                                                               {"long_context": 12}),
                       ("long context, 21-frame budget", {"long_context": 21})):
        pipe = load(seconds=seconds, dummy_forcing=True, **opts)
        for i, prompt in enumerate(prompts):
            frames = pipe.generate(prompt, seed=i)
            words = prompt.split()
            back, colour, shape = comeback(frames, words[1], words[2])
            plan = pipe.generator.stats.last_plan
            window = max(t.history_chunks for t in plan.table.types) * pipe.run.sampling.chunk_frames
            rows.append(dict(mode=name, window_frames=window, prompt=prompt, came_back=back, same_colour=colour,
                             same_shape=shape))
        log(f"memory {name}: came back {np.mean([r['came_back'] for r in rows[-len(prompts):]]):.2f}")
    return rows


def switch(load, seconds, at_chunk, log):
    from dfjax.adherence import APPEAR_AREA, NAMES, colour_labels

    rows = []
    for recache in (True, False):
        pipe = load(seconds=seconds, dummy_forcing=True)
        at = (4 * at_chunk * pipe.run.sampling.chunk_frames - 3) / pipe.fps
        for i, (a, b) in enumerate(SWITCH_PAIRS):
            frames = pipe.generate(a, seed=i, timeline=[(at, b)], recache=recache)
            new = b.split()[1]
            seen = dom = None
            for c in range(at_chunk, pipe.run.num_chunks):
                lab = colour_labels(frames[chunk_frames(pipe.run, c)])
                if seen is None and ((lab == NAMES.index(new)).sum(axis=(1, 2)) >= APPEAR_AREA).any():
                    seen = c - at_chunk
                if dom is None and dominant(lab) == new:
                    dom = c - at_chunk
            rows.append(dict(recache=recache, before=a, after=b, chunks_until_seen=seen, chunks_until_dominant=dom))
        log(f"switch recache={recache}: {[r['chunks_until_seen'] for r in rows[-len(SWITCH_PAIRS):]]}")
    return rows


def markdown(result: dict) -> str:
    d, m, s = result["drift"], result["memory"], result["switch"]
    lines = [f"# Long videos on the demo model ({result['device']}, jax {result['jax_version']}, {result['date']})", "",
             f"## Drift over {result['seconds']} s ({len(result['prompts'])} prompts)", "",
             "Chunks from the first planned one (the earlier ones are the baseline's).", "",
             "| chunks | PSNR DF vs baseline (dB) | SSIM | baseline shows the colour | Dummy Forcing shows it |",
             "|---|---|---|---|---|"]
    first, n = min(r["chunk"] for r in d), max(r["chunk"] for r in d) + 1
    step = max(1, (n - first) // 5)
    for lo in range(first, n, step):
        sel = [r for r in d if lo <= r["chunk"] < lo + step]
        lines.append(f"| {lo}-{min(lo + step, n) - 1} | {np.mean([r['psnr'] for r in sel]):.1f} | "
                     f"{np.mean([r['ssim'] for r in sel]):.3f} | {np.mean([r['baseline_colour'] for r in sel]):.2f} | "
                     f"{np.mean([r['dummy_colour'] for r in sel]):.2f} |")
    lines += ["", f"## Leaving and coming back ({result['memory_seconds']} s videos)", "",
              "| mode | neighbour window (frames) | came back | with its colour | and shape |", "|---|---|---|---|---|"]
    for mode in dict.fromkeys(r["mode"] for r in m):
        sel = [r for r in m if r["mode"] == mode]
        lines.append(f"| {mode} | {sel[0]['window_frames']} | {np.mean([r['came_back'] for r in sel]):.2f} | "
                     f"{np.mean([r['same_colour'] for r in sel]):.2f} | {np.mean([r['same_shape'] for r in sel]):.2f} |")
    lines += ["", f"## A prompt switch at chunk {result['switch_chunk']} (Dummy Forcing)", "",
              "| re-cache | chunks until the new colour is seen | until it dominates | never seen |", "|---|---|---|---|"]
    for rc in (True, False):
        sel = [r for r in s if r["recache"] == rc]
        seen = [r["chunks_until_seen"] for r in sel if r["chunks_until_seen"] is not None]
        dom = [r["chunks_until_dominant"] for r in sel if r["chunks_until_dominant"] is not None]
        lines.append(f"| {'yes' if rc else 'no'} | {np.mean(seen) if seen else float('nan'):.1f} | "
                     f"{np.mean(dom) if dom else float('nan'):.1f} | {len(sel) - len(seen)} of {len(sel)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import dfjax
    from dfjax.bench import environment

    p = argparse.ArgumentParser(prog="dfjax long-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model folder (default: the built-in demo model)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per table")
    p.add_argument("--seconds", type=float, default=60, help="length of the drift videos")
    p.add_argument("--memory-seconds", type=float, default=12, help="length of the leave-and-return videos")
    p.add_argument("--switch-chunk", type=int, default=4, help="the chunk the prompt switches at")
    p.add_argument("--out", default="benchmarks/results/long-video")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)
    load = lambda **kw: dfjax.load(a.model, attn_impl="xla", **kw)
    prompts = plain_prompts(a.prompts)
    result = {**environment(), "seconds": a.seconds, "memory_seconds": a.memory_seconds, "prompts": prompts,
              "switch_chunk": a.switch_chunk}
    result["drift"] = drift(load, prompts, a.seconds, log)
    result["memory"] = memory(load, a.memory_seconds, a.prompts, log)
    result["switch"] = switch(load, max(a.memory_seconds, 12), a.switch_chunk, log)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_eval.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "long_eval.md").write_text(markdown(result))
    print(markdown(result))
    log(f"wrote {out}/long_eval.json and .md")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
