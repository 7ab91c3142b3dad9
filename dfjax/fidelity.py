"""The Dummy Forcing fidelity testbed: `dfjax fidelity`.

For a fixed prompt set and seeds, every video is generated with the baseline (Self Forcing's global
cache) and with Dummy Forcing at several dummy-head shares, each once with the heads DHP picks from
the video's own frame attention scores (online, as the release) and once with the same number of
dummy heads picked at random (the rest typed sink / neighbour by the same scores, so only the dummy
choice differs). Against the baseline video of the same prompt and seed (same noise), it reports:

  - PSNR and SSIM of the decoded videos, overall and over the frames the plan governs (chunks after
    ar_start), and the relative L2 error of the latents;
  - the Jaccard overlap of DHP's dummy sets across prompts (and seeds);
  - the share of heads that put > 80% of their mass on the current chunk (from the scored forward);
  - the attention mass each head type keeps (sink F0+F2, neighbour F1+F2, dummy F2) and in total;
  - a prompt-adherence check: the colours a prompt names are found in the frames (dfjax.synthetic).

With the method "stream" it also makes each video with the stream-batch sampler (dfjax.stream: a KV cache
per denoising step, noisy context), without and with Dummy Forcing (DHP), against the same baseline.

Outputs: <out>/fidelity.json, fidelity.md and fidelity.png (quality vs dummy share; needs matplotlib,
the [plot] extra). The default model is the built-in demo model.

    dfjax fidelity                                  # the full table into benchmarks/results/
    dfjax fidelity --prompts 1 --seeds 0 --shares 0.5 --frames 45 --out /tmp/fid   # a quick check
    dfjax fidelity --methods stream --out benchmarks/results/stream    # what the stream sampler costs
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

DEFAULT_SHARES = (0.0, 0.25, 0.5, 0.75)
METHODS = ("dhp", "random", "stream")  # random needs dhp's scores
METHOD_NAMES = {"baseline": "baseline", "dhp": "Dummy Forcing (DHP)", "random": "random dummy heads",
                "stream": "stream batch", "dhp-stream": "stream batch + Dummy Forcing (DHP)"}
CURRENT_THRESHOLD = 0.8


# ---------------------------------------------------------------- metrics

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 images/videos (peak 255); inf when equal."""
    mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of uint8 frames [..., H, W, 3]: Gaussian window (sigma 1.5), per channel, averaged."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x = a.reshape(-1, *a.shape[-3:]).astype(np.float64)
    y = b.reshape(-1, *b.shape[-3:]).astype(np.float64)
    blur = lambda z: gaussian_filter(z, sigma=(0, 1.5, 1.5, 0), truncate=3.5)
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def kept_mass(scores: np.ndarray, plan) -> dict:
    """Attention mass each head keeps under its type (a history type its score column + the current chunk's, a dummy
    head the current chunk's), per type and in total."""
    s = np.asarray(scores, np.float64)
    types = plan.head_type_array()
    kept = s[..., 2].copy()
    for t in plan.table.history:
        kept = np.where(types == t.code, kept + s[..., t.score], kept)
    out = {"total": float(kept.mean())}
    for t in plan.table.types:
        sel = types == t.code
        out[t.name] = float(kept[sel].mean()) if sel.any() else None
        out[f"{t.name}_heads"] = int(sel.sum())
    return out


def random_plan(scores: np.ndarray, num_dummy: int, rng: np.random.Generator, normalize: str = "release",
                table=None):
    """A HeadPlan with `num_dummy` dummy heads drawn at random over all layers; every other head takes the history
    type DHP would give it from `scores` (so only the dummy choice differs from DHP's plan)."""
    from dfjax.dummy import HeadPlan, standard_table
    from dfjax.dummy.dhp import history_masses

    table = table or standard_table()
    s = np.asarray(scores, np.float64)
    codes = np.array([t.code for t in table.history], np.int8)
    types = codes[np.argmax(history_masses(s, normalize, table), axis=-1)].reshape(-1)
    types[rng.choice(types.size, size=num_dummy, replace=False)] = table.dummy.code
    return HeadPlan(types.reshape(s.shape[:2]), table, scores=s, normalize=normalize)


def default_prompts(num: int, seed: int = 0) -> list[str]:
    """Held-out prompts of the synthetic data (clip indices the demo model never trained on)."""
    from dfjax.synthetic import SyntheticConfig, clip_spec

    return [clip_spec(30_000_000 + i, seed, SyntheticConfig()).prompt for i in range(num)]


# ---------------------------------------------------------------- the run

def run_fidelity(model_folder=None, prompts=None, seeds=(0, 1), shares=DEFAULT_SHARES, frames: int = 57,
                 ar_start: int = 1, local_context_length: int = 1, query_rows: str = "exact", random_draws: int = 1,
                 methods=("dhp", "random"), log=print) -> dict:
    import jax
    from flax import nnx

    from dfjax.bench import environment
    from dfjax.config import DummyForcingConfig, SamplingConfig, VideoShape, config_from_dict
    from dfjax.demo import demo_model_folder
    from dfjax.dummy import HeadPlan, dummy_overlap, standard_table
    from dfjax.model.vae import decode
    from dfjax.model_io import read_config
    from dfjax.pipeline import Generator, RunConfig
    from dfjax.synthetic import colour_fractions, prompt_colours
    from dfjax.t2v import VideoModel

    unknown = sorted(set(methods) - set(METHODS))
    if unknown or ("random" in methods and "dhp" not in methods):
        raise ValueError(f"methods {list(methods)}: choose from {list(METHODS)} (random needs dhp).")
    folder = Path(model_folder) if model_folder else demo_model_folder()
    meta = read_config(folder)
    model = VideoModel.load(folder)
    cfg = model.dit.cfg
    total_heads = cfg.num_layers * cfg.num_heads
    defaults = meta.get("defaults", {})
    video = VideoShape(defaults.get("height", 64), defaults.get("width", 64), frames)
    sampling = config_from_dict(SamplingConfig, meta.get("sampling", {}))
    prompts = list(prompts or default_prompts(8))
    base_run = RunConfig(video=video, sampling=sampling, attn_impl="xla")
    if ar_start >= base_run.num_chunks - 1:
        raise ValueError(f"{frames} frames make {base_run.num_chunks} chunks: Dummy Forcing with ar_start {ar_start} "
                         f"would change nothing; use more frames (e.g. {VideoShape.frames_for_latents(3 * (ar_start + 3))}).")
    first_planned = (ar_start + 1) * sampling.chunk_frames  # first latent frame under the plan
    first_planned_px = (first_planned - 1) * 4 + 1
    vg, vs = nnx.split(model.vae)

    def pixels(lat):
        from dfjax.synthetic import to_uint8

        return to_uint8(np.asarray(decode(vg, vs, lat))[0])

    def dummy_cfg(n):
        return DummyForcingConfig(num_dummy=n, ar_start=ar_start, local_context_length=local_context_length,
                                  query_rows=query_rows)

    baseline = Generator(model.dit, base_run)
    counts = {share: int(round(share * total_heads)) for share in shares}
    online_run = lambda n, stream=False: RunConfig(video=video, sampling=sampling, attn_impl="xla", dummy=dummy_cfg(n),
                                                   stream=stream)
    online = {s: Generator(model.dit, online_run(n)) for s, n in counts.items()} if "dhp" in methods else {}
    streams = {}
    if "stream" in methods:
        streams = {("stream", 0.0): Generator(model.dit, RunConfig(video=video, sampling=sampling, attn_impl="xla",
                                                                   stream=True))}
        streams.update({("dhp-stream", s): Generator(model.dit, online_run(n, True)) for s, n in counts.items()})
    fixed = {s: Generator(model.dit, RunConfig(video=video, sampling=sampling, attn_impl="xla", dummy=dummy_cfg(n)),
                          plan=HeadPlan.uniform(cfg.num_layers, cfg.num_heads, table=standard_table(local_context_length)))
             for s, n in counts.items() if n > 0}
    rows, plans, score_sets = [], {s: [] for s in shares}, []
    t0 = time.perf_counter()
    for (pi, prompt), seed in itertools.product(enumerate(prompts), seeds):
        ctx = model.text([prompt])
        lat_b = baseline.generate(ctx, seed)
        px_b = pixels(lat_b)
        colours = prompt_colours(prompt)

        def record(method, share, plan, lat, scores):
            px = pixels(lat)
            fr = colour_fractions(px[first_planned_px:])
            row = dict(prompt=prompt, prompt_index=pi, seed=seed, method=method, share=share,
                       num_dummy=plan.num_dummy if plan is not None else 0,
                       psnr=psnr(px, px_b), ssim=ssim(px, px_b),
                       psnr_planned=psnr(px[first_planned_px:], px_b[first_planned_px:]),
                       ssim_planned=ssim(px[first_planned_px:], px_b[first_planned_px:]),
                       latent_rel_l2=rel_l2(lat, lat_b),
                       latent_rel_l2_planned=rel_l2(np.asarray(lat)[:, first_planned:],
                                                    np.asarray(lat_b)[:, first_planned:]),
                       colour_hits=float(np.mean([fr[c] >= 0.003 for c in colours])) if colours else None)
            if plan is not None and scores is not None:
                row["kept"] = kept_mass(scores, plan)
            rows.append(row)
            return row

        fr_b = colour_fractions(px_b[first_planned_px:])
        rows.append(dict(prompt=prompt, prompt_index=pi, seed=seed, method="baseline", share=0.0, num_dummy=0,
                         colour_hits=float(np.mean([fr_b[c] >= 0.003 for c in colours])) if colours else None))
        scores = None
        for (method, share), gen in streams.items():
            lat = gen.generate(ctx, seed)
            scores = gen.stats.scores if method == "dhp-stream" else scores
            r = record(method, share, gen.stats.last_plan, lat, scores if method == "dhp-stream" else None)
            log(f"[{time.perf_counter() - t0:6.0f} s] prompt {pi} seed {seed} {method} share {share:.2f}: psnr "
                f"{r['psnr_planned']:.2f} ssim {r['ssim_planned']:.3f}")
        for share in shares if online else ():
            gen = online[share]
            lat = gen.generate(ctx, seed)
            scores = gen.stats.scores
            plans[share].append(gen.stats.last_plan)
            r = record("dhp", share, gen.stats.last_plan, lat, scores)
            line = f"[{time.perf_counter() - t0:6.0f} s] prompt {pi} seed {seed} share {share:.2f}: DHP psnr " \
                   f"{r['psnr_planned']:.2f} ssim {r['ssim_planned']:.3f}"
            if counts[share] > 0:
                for d in range(random_draws):
                    rng = np.random.default_rng([seed, pi, int(share * 1000), d])
                    plan = random_plan(scores, counts[share], rng, table=standard_table(local_context_length))
                    fixed[share].use_plan(plan)
                    r2 = record("random", share, plan, fixed[share].generate(ctx, seed), scores)
                line += f" | random psnr {r2['psnr_planned']:.2f} ssim {r2['ssim_planned']:.3f}"
            log(line)
        score_sets.append(dict(prompt_index=pi, seed=seed, scores=np.asarray(scores).tolist()))

    # ---- aggregates
    all_scores = np.stack([np.asarray(s["scores"]) for s in score_sets])  # [videos, L, H, 3]
    current_share = (all_scores[..., 2] > CURRENT_THRESHOLD).mean(axis=(1, 2))
    summary = []
    ran = [("baseline", 0.0)] + [(m, s) for s in shares for m in ("dhp", "random")
                                 if m in methods and not (m == "random" and counts[s] == 0)] + list(streams)
    for method, share in ran:
        sel = [r for r in rows if r["method"] == method and r["share"] == share]
        agg = dict(method=method, share=share, num_dummy=counts.get(share, 0) if method != "baseline" else 0,
                   videos=len(sel))
        for k in ("psnr", "ssim", "psnr_planned", "ssim_planned", "latent_rel_l2", "latent_rel_l2_planned",
                  "colour_hits"):
            vals = [r[k] for r in sel if r.get(k) is not None and np.isfinite(r[k])]
            agg[k] = float(np.mean(vals)) if vals else None
        if any("kept" in r for r in sel):
            for k in ("total", "sink", "neighbour", "dummy"):
                vals = [r["kept"][k] for r in sel if r["kept"][k] is not None]
                agg[f"kept_{k}"] = float(np.mean(vals)) if vals else None
        summary.append(agg)
    overlap = {}
    for share in shares:
        ps = plans[share]
        if counts[share] == 0 or len(ps) < 2:
            continue
        pairs = [dummy_overlap(a, b) for a, b in itertools.combinations(ps, 2)]
        core = set.intersection(*(set(p.dummy_heads()) for p in ps))
        overlap[str(share)] = dict(mean=float(np.mean(pairs)), min=float(np.min(pairs)),
                                   core=len(core), core_share=len(core) / counts[share])
    mean_scores = all_scores.mean(0)
    result = dict(
        model=str(folder), model_training=meta.get("training", {}).get("device"),
        video=dict(height=video.height, width=video.width, frames=frames, latent_frames=video.latent_frames,
                   chunks=base_run.num_chunks),
        sampling=dict(denoising_steps=list(sampling.denoising_steps), shift=sampling.shift, warp=sampling.warp),
        dummy_forcing=dict(ar_start=ar_start, local_context_length=local_context_length, query_rows=query_rows,
                           packed_dummy=True, normalize="release", first_planned_latent_frame=first_planned,
                           first_planned_pixel_frame=first_planned_px),
        heads=dict(layers=cfg.num_layers, heads_per_layer=cfg.num_heads, total=total_heads),
        prompts=prompts, seeds=list(seeds), shares=list(shares), random_draws=random_draws, methods=list(methods),
        current_chunk_heads=dict(threshold=CURRENT_THRESHOLD, share_mean=float(current_share.mean()),
                                 share_min=float(current_share.min()), share_max=float(current_share.max()),
                                 per_layer=(mean_scores[..., 2] > CURRENT_THRESHOLD).sum(1).tolist()),
        mean_scores=mean_scores.round(4).tolist(),
        overlap=overlap, summary=summary, runs=rows, seconds=round(time.perf_counter() - t0, 1),
        backend=jax.default_backend(), **environment(),
    )
    return result


# ---------------------------------------------------------------- reports

def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    v, d, h = res["video"], res["dummy_forcing"], res["heads"]
    lines = [
        "# Dummy Forcing fidelity on the demo model",
        "",
        f"Model `{Path(res['model']).name}` ({h['layers']} layers x {h['heads_per_layer']} heads = {h['total']}), "
        f"{v['width']}x{v['height']}, {v['frames']} frames = {v['latent_frames']} latent frames = {v['chunks']} chunks; "
        f"sampler {res['sampling']['denoising_steps']} (shift {res['sampling']['shift']}). "
        f"{len(res['prompts'])} prompts x {len(res['seeds'])} seeds; every number is against the baseline "
        f"(global cache) video of the same prompt and seed. Dummy Forcing: ar_start {d['ar_start']}, "
        f"local_context_length {d['local_context_length']}, packed dummy heads, {d['query_rows']} query rows; "
        f"the plan governs latent frames >= {d['first_planned_latent_frame']} (pixel frames >= "
        f"{d['first_planned_pixel_frame']}), the *planned* columns. Random: the same number of dummy heads drawn "
        f"at random ({res['random_draws']} draw(s) per video), other heads typed as DHP types them.",
        "",
        "| method | dummy share | dummy heads | PSNR (dB) | SSIM | PSNR planned | SSIM planned | latent rel. L2 "
        "| kept mass | kept: sink / neighbour / dummy | colour hits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in res["summary"]:
        name = METHOD_NAMES[a["method"]]
        kept = _fmt(a.get("kept_total"), ".3f")
        per = "-" if "kept_total" not in a else " / ".join(_fmt(a.get(f"kept_{k}"), ".3f")
                                                            for k in ("sink", "neighbour", "dummy"))
        psnr_s = "inf" if a["method"] == "baseline" else _fmt(a["psnr"])
        lines.append(f"| {name} | {a['share']:.0%} | {a['num_dummy']} | {psnr_s} | "
                     f"{'1' if a['method'] == 'baseline' else _fmt(a['ssim'], '.4f')} | "
                     f"{'inf' if a['method'] == 'baseline' else _fmt(a['psnr_planned'])} | "
                     f"{'1' if a['method'] == 'baseline' else _fmt(a['ssim_planned'], '.4f')} | "
                     f"{'0' if a['method'] == 'baseline' else _fmt(a['latent_rel_l2'], '.4f')} | {kept} | {per} | "
                     f"{_fmt(a['colour_hits'], '.2f')} |")
    c = res["current_chunk_heads"]
    lines += [
        "",
        f"Heads with > {c['threshold']:.0%} of their attention on the current chunk (scored refresh forward of chunk "
        f"{d['ar_start']}): {c['share_mean']:.1%} of all heads on average (min {c['share_min']:.1%}, max "
        f"{c['share_max']:.1%} over videos); per layer (mean scores): {c['per_layer']}.",
        "",
        "Overlap of DHP's dummy sets across prompts and seeds (Jaccard, all pairs; core = heads dummy in every video):",
        "",
        "| dummy share | mean | min | core heads | core / dummy heads |",
        "|---|---|---|---|---|",
    ]
    for share, o in res["overlap"].items():
        lines.append(f"| {float(share):.0%} | {o['mean']:.3f} | {o['min']:.3f} | {o['core']} | {o['core_share']:.2f} |")
    lines += ["", f"Generated on {res['backend']} in {res['seconds']:.0f} s by `dfjax fidelity`; raw numbers per video "
              "in fidelity.json.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("psnr_planned", "ssim_planned", "latent_rel_l2_planned"),
                              ("PSNR vs baseline (dB), planned frames", "SSIM vs baseline, planned frames",
                               "latent relative L2, planned frames")):
        for method, style in (("dhp", "o-"), ("random", "s--")):
            pts = [(a["share"], a[key]) for a in res["summary"] if a["method"] == method and a[key] is not None]
            if method == "random":
                pts = [(s, v) for s, v in pts if s > 0]
            if pts:
                ax.plot(*zip(*pts), style, label={"dhp": "Dummy Forcing (DHP)", "random": "random dummy heads"}[method])
        ax.set_xlabel("dummy head share")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(res: dict, out: Path, make_plot: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "fidelity.json", out / "fidelity.md"]
    paths[0].write_text(json.dumps(res, indent=1))
    paths[1].write_text(markdown(res))
    if make_plot and plot(res, out / "fidelity.png"):
        paths.append(out / "fidelity.png")
    return paths


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfjax fidelity", description="Dummy Forcing vs baseline: fidelity testbed.")
    p.add_argument("--model", help="a model folder (default: the built-in demo model)")
    p.add_argument("--prompts", default="8", help="a number N (the first N held-out synthetic prompts) or a text file")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--shares", default=",".join(str(s) for s in DEFAULT_SHARES), help="dummy-head shares")
    p.add_argument("--frames", type=int, default=57, help="pixel frames (57 = 5 chunks of 3 latent frames)")
    p.add_argument("--ar-start", type=int, default=1)
    p.add_argument("--local-context-length", type=int, default=1)
    p.add_argument("--query-rows", default="exact", choices=["release", "paper", "exact"])
    p.add_argument("--random-draws", type=int, default=1, help="random plans per video and share")
    p.add_argument("--methods", default="dhp,random", help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--out", default="benchmarks/results", help="folder for fidelity.json / .md / .png")
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.prompts.isdigit():
        prompts = default_prompts(int(a.prompts))
    else:
        prompts = [line.strip() for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    res = run_fidelity(a.model, prompts, seeds=[int(s) for s in a.seeds.split(",")],
                       shares=[float(s) for s in a.shares.split(",")], frames=a.frames, ar_start=a.ar_start,
                       local_context_length=a.local_context_length, query_rows=a.query_rows,
                       random_draws=a.random_draws, methods=a.methods.split(","), log=lambda s: print(s, flush=True))
    for path in write_reports(res, Path(a.out), make_plot=not a.no_plot):
        print(f"wrote {path}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
