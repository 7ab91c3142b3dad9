"""What fp8 linears (docs/fp8.md) change in the demo model's videos: PSNR and SSIM against the same video without fp8.

    python3 benchmarks/fp8_quality.py                       # benchmarks/results/fp8/demo-quality.json
    python3 benchmarks/fp8_quality.py --prompts 2 --seeds 1 --out /tmp/fp8q    # a quick check

The bundled demo model (dfjax/assets/demo, fp32 weights and compute) makes each prompt x seed four times: as its
folder says (fp32, the reference), with --fp8 (fp32 compute around the fp8 matmuls), in bf16 compute, and in bf16
with fp8, the setting a GPU run uses. The same seed gives the same noise, so every difference is the precision's.
Per video: PSNR over all frames (uint8, peak 255), the worst frame's PSNR, and SSIM (Wang et al. 2004: an 11x11
Gaussian window of sigma 1.5, K1 0.01, K2 0.03, per RGB channel on the valid region, averaged over channels and
frames; skimage's structural_similarity(gaussian_weights=True) where skimage is installed); and the adherence
detector's verdicts (dfjax.adherence.judge) on each video, to say whether a change in pixels changes what the video
shows. For scale, the same scores between two seeds of one prompt ("fp32, another seed": a different video). And
the relative RMS error of one DiT forward's flow, the error each step adds before the AR loop compounds it.
Runs on the CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"fp32": {}, "fp8": {"fp8": True}, "bf16": {"dtype": "bfloat16"},
            "bf16+fp8": {"dtype": "bfloat16", "fp8": True}}
# (video, against): what each comparison measures
PAIRS = (("fp8", "fp32"), ("bf16+fp8", "bf16"), ("bf16", "fp32"), ("bf16+fp8", "fp32"))


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """dB for uint8 (peak 255); None for identical inputs (infinite; JSON has no infinity)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return None if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim_frame(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 frames [H, W, 3]: Gaussian window (sigma 1.5, truncated at 3.5 sigma: 11x11), the valid
    region (5 px from each border dropped), the mean over the channels."""
    from scipy.ndimage import gaussian_filter

    c1, c2, pad = (0.01 * 255) ** 2, (0.03 * 255) ** 2, 5
    out = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        blur = lambda z: gaussian_filter(z, 1.5, truncate=3.5)
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(out))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return float(np.mean([ssim_frame(x, y) for x, y in zip(a, b)]))
    return float(np.mean([structural_similarity(x, y, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                                use_sample_covariance=False, data_range=255) for x, y in zip(a, b)]))


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    frames = [v for v in (psnr(x, y) for x, y in zip(a, b)) if v is not None]
    return {"psnr": psnr(a, b), "worst_frame_psnr": min(frames, default=None), "ssim": ssim(a, b),
            "max_abs_diff": int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())}


# The demo's first two prompts, then other colours, shapes and directions of its language
PROMPTS = ("a red circle moves down", "a blue triangle moves down", "a green square moves left",
           "a yellow triangle moves up", "a white square moves right", "a red square moves left")


def forward_errors(prompt: str, timesteps=(1000.0, 500.0, 125.0)) -> dict:
    """Relative RMS error of one DiT forward's flow (the first chunk, from unit noise, the prompt's text) with fp8
    against without, per timestep: the error each denoising step starts from, before the AR loop compounds it."""
    import jax.numpy as jnp
    from flax import nnx

    from dfjax.cache import AttentionLayout, init_cache
    from dfjax.demo import demo_model_folder
    from dfjax.model.rope import rope_tables
    from dfjax.model.transformer import ChunkCall, ChunkStep
    from dfjax.t2v import load_transformer
    from dfjax.text import TextEncoder

    folder = demo_model_folder()
    context = TextEncoder.from_model_folder(folder)([prompt])

    @nnx.jit
    def flow(model, x, t):
        cfg = model.cfg
        layout = AttentionLayout.uniform(cfg.num_layers, cfg.num_heads, 0, x.shape[1], 16, x.shape[1])
        cache = init_cache(layout, 1, cfg.head_dim, jnp.float32)
        return model(x, t, model.text_kv(context), cache, rope_tables(cfg.head_dim), ChunkStep.at(0),
                     ChunkCall("xla"))[0]

    out = {}
    for video, against in PAIRS[:2]:
        a, b = (load_transformer(folder, VARIANTS[v].get("dtype"), VARIANTS[v].get("fp8")) for v in (video, against))
        x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 8, 8, a.cfg.in_channels)), jnp.float32)
        errs = {}
        for t in timesteps:
            ya, yb = (np.asarray(flow(m, x, jnp.full((1, 3), t)), np.float64) for m in (a, b))
            errs[f"t={t:g}"] = float(np.sqrt(np.mean((ya - yb) ** 2) / np.mean(yb ** 2)))
        out[f"{video} vs {against}"] = errs
    return out


def summary(rows: list[dict]) -> dict:
    out = {}
    for video, against in PAIRS:
        rs = [r["vs"][f"{video} vs {against}"] for r in rows]
        psnrs = [r["psnr"] for r in rs if r["psnr"] is not None]  # None: an identical video
        out[f"{video} vs {against}"] = {
            "psnr_mean": float(np.mean(psnrs)) if psnrs else None, "psnr_min": min(psnrs, default=None),
            "worst_frame_psnr": min((r["worst_frame_psnr"] for r in rs if r["worst_frame_psnr"] is not None),
                                    default=None),
            "ssim_mean": float(np.mean([r["ssim"] for r in rs])), "ssim_min": min(r["ssim"] for r in rs),
            "identical_videos": sum(r["max_abs_diff"] == 0 for r in rs)}
    floor = [r["other_seed"] for r in rows if "other_seed" in r]
    if floor:  # what "a different video" scores: the same prompt's next seed (fp32)
        out["fp32, another seed"] = {"psnr_mean": float(np.mean([r["psnr"] for r in floor])),
                                     "ssim_mean": float(np.mean([r["ssim"] for r in floor]))}
    for name in VARIANTS:
        verdicts = [v for r in rows for v in r["adherence"][name].values()]
        out[f"adherence {name}"] = {"hits": int(sum(verdicts)), "claims": len(verdicts)}
    for video, against in PAIRS[:2]:
        same = [r["adherence"][video][k] == r["adherence"][against][k] for r in rows for k in r["adherence"][video]]
        out[f"adherence {video} vs {against}"] = {"same_verdicts": int(sum(same)), "claims": len(same)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"the first N of {len(PROMPTS)} prompts")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per prompt (default 3)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fp8"),
                   help="the folder of demo-quality.json")
    a = p.parse_args(argv)

    import dfjax
    from dfjax.adherence import judge
    from dfjax.bench import environment

    items = [(prompt, seed) for prompt in PROMPTS[:a.prompts] for seed in range(a.seeds)]
    videos, seconds = {}, {}
    for name, opts in VARIANTS.items():
        t0 = time.perf_counter()
        pipe = dfjax.load("demo", **opts)
        videos[name] = [pipe.generate(prompt, seed) for prompt, seed in items]
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {len(items)} videos in {seconds[name]} s (compile included)", flush=True)
    rows = []
    for i, (prompt, seed) in enumerate(items):
        vs = {f"{v} vs {w}": compare(videos[v][i], videos[w][i]) for v, w in PAIRS}
        rows.append({"prompt": prompt, "seed": seed, "vs": vs,
                     "adherence": {name: judge(videos[name][i], prompt) for name in VARIANTS}})
        if a.seeds > 1:
            j = i - seed + (seed + 1) % a.seeds  # the same prompt, the next seed
            rows[-1]["other_seed"] = compare(videos["fp32"][i], videos["fp32"][j])
    res = {"what": "PSNR/SSIM of the demo model's videos with fp8 linears (and bf16 compute) against the same seed's "
                   "video without; adherence verdicts of each (benchmarks/fp8_quality.py, docs/fp8.md)",
           "model": "demo (dfjax/assets/demo)", "frames": int(videos["fp32"][0].shape[0]),
           "size": list(videos["fp32"][0].shape[1:3]), "variants": VARIANTS, "seconds": seconds,
           "environment": environment(), "summary": summary(rows),
           "one_forward_flow_rel_rms": forward_errors(PROMPTS[0]), "videos": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo-quality.json").write_text(json.dumps(res, indent=2) + "\n")
    for key, s in res["summary"].items():
        print(f"  {key:22s} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    for key, errs in res["one_forward_flow_rel_rms"].items():
        print(f"  one forward, {key}: relative RMS flow error " + ", ".join(f"{t} {e:.3f}" for t, e in errs.items()))
    print(f"wrote {out / 'demo-quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
