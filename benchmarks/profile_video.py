"""Where one video's diffusion time goes: per-chunk times and a per-kernel profile of the 1.3B DiT.

    python3 benchmarks/profile_video.py --resolution 480p --modes baseline dummy vae   # on the GPU
    python3 benchmarks/profile_video.py --resolution 64x96 --tiny                  # anywhere (smoke run)

For each generator mode (and "vae", the streaming decode of one video's latents): random weights, compile, one warm-up video, then (1) each chunk timed with a sync
after it (chunk ar_start+1 of Dummy Forcing includes the plan: scoring, DHP, head permutation and
cache transition), (2) one video under jax.profiler, whose device kernels are summed by name and
by kind (matmul, attention, fusion, copy). Prints tables; writes profile-<mode>.json (and the
perfetto traces) to $OUT if set, else to /tmp/dfjax-profile.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dfjax.bench import _run_config, environment  # noqa: E402
from dfjax.config import WanConfig  # noqa: E402
from dfjax.model.transformer import WanDiT  # noqa: E402
from dfjax.pipeline import Generator  # noqa: E402

KINDS = (("conv", ("fprop_implicit_gemm", "conv", "nchwtonhwc", "nhwctonchw")),
         ("attention", ("cudnn", "flash", "fmha", "paf", "attention")),
         ("matmul", ("gemm", "cutlass", "sm90", "xmma", "matmul", "dot")),
         ("copy", ("memcpy", "memset", "copy", "dynamic_update_slice", "dynamic-update-slice")),
         ("fusion", ("fusion", "loop_", "input_", "reduce", "triton")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def device_kernels(trace_dir: Path) -> list[tuple[str, float]]:
    """(name, microseconds) of every event on a device stream of the newest perfetto trace."""
    path = max(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in procs.items() if "/device:" in name and "CPU" not in name}
    if not device:  # a CPU run: its XLA ops run on host threads
        device = set(procs)
    return [(e["name"], float(e.get("dur", 0))) for e in events
            if e.get("ph") == "X" and e.get("pid") in device]


def summarise(kernels, top: int) -> dict:
    by_name, by_kind = collections.Counter(), collections.Counter()
    counts = collections.Counter()
    for name, us in kernels:
        by_name[name] += us
        counts[name] += 1
        by_kind[kind_of(name)] += us
    return {"total_s": sum(by_kind.values()) / 1e6,
            "by_kind_s": {k: v / 1e6 for k, v in by_kind.most_common()},
            "top": [{"name": n, "s": us / 1e6, "calls": counts[n]} for n, us in by_name.most_common(top)]}


def profile_mode(mode, resolution, frames, tiny, attn_impl, out: Path, top: int) -> dict:
    run = _run_config(mode, resolution, frames, tiny, attn_impl)
    cfg = WanConfig.tiny(in_channels=16, out_channels=16) if tiny else WanConfig.wan_1_3b()
    gen = Generator(WanDiT(cfg, nnx.Rngs(0)), run)
    context = jax.random.normal(jax.random.PRNGKey(1), (1, 512, cfg.text_dim), jnp.float32).astype(cfg.dtype)
    kv = gen.text_kv(context)
    r = measure(lambda: (c.latents for c in gen.chunks(kv, seed=0)), out / f"trace-{mode}", top)
    return {"mode": mode, "resolution": resolution, "frames": frames, "compile_s": gen.stats.compile_s, **r}


def profile_vae(resolution, frames, tiny, out: Path, top: int) -> dict:
    """The streaming VAE decode of one video's latents, chunk by chunk as the generator yields them."""
    from dfjax.model.vae import WanVAE, WanVAEConfig, decode_chunk, init_decoder_cache

    run = _run_config("baseline", resolution, frames, tiny, "auto")
    cfg = WanVAEConfig.tiny(with_encoder=False) if tiny else WanVAEConfig(with_encoder=False)
    graphdef, state = nnx.split(WanVAE(cfg, rngs=nnx.Rngs(2)))
    h, w = run.video.latent_hw
    cf = run.sampling.chunk_frames
    z = jax.random.normal(jax.random.PRNGKey(0), (1, run.video.latent_frames, h, w, cfg.z_dim), jnp.float32)

    def video():
        cache = init_decoder_cache(cfg, 1, h, w)
        for c in range(run.num_chunks):
            pixels, cache = decode_chunk(graphdef, state, z[:, c * cf:(c + 1) * cf], cache)
            yield pixels

    r = measure(video, out / "trace-vae", top)
    return {"mode": "vae", "resolution": resolution, "frames": frames, "compile_s": r["first_video_s"] - r["video_s"],
            **r}


def measure(video, trace_dir: Path, top: int) -> dict:
    """video() yields one device array per chunk. Times a first (compiling) and a warm video, then each
    chunk with a sync after it, then profiles one more video."""

    def run(sync_each=False):
        times, t0 = [], time.perf_counter()
        for last in video():
            if sync_each:
                jax.block_until_ready(last)
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
        jax.block_until_ready(last)
        return times

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run()
    warm = time.perf_counter() - t0
    chunk_s = run(sync_each=True)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        run()
    return {"first_video_s": first, "video_s": warm, "chunk_s": chunk_s,
            "profile": summarise(device_kernels(trace_dir), top)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", default="480p")
    p.add_argument("--modes", nargs="+", default=["baseline", "dummy", "vae"],
                   help="generator modes (baseline, dummy, local) and/or vae (the streaming decode)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    out = Path(os.environ.get("OUT", "/tmp/dfjax-profile"))
    out.mkdir(parents=True, exist_ok=True)
    for mode in a.modes:
        r = (profile_vae(a.resolution, a.frames, a.tiny, out, a.top) if mode == "vae" else
             profile_mode(mode, a.resolution, a.frames, a.tiny, a.attn_impl, out, a.top))
        (out / f"profile-{mode}.json").write_text(json.dumps({**environment(), "runs": [r]}, indent=2))
        prof = r["profile"]
        print(f"\n== {mode} {a.resolution}: video {r['video_s']:.3f} s (first {r['first_video_s']:.1f} s, "
              f"compile {r['compile_s']:.1f} s); device kernels {prof['total_s']:.3f} s")
        print("chunks (synced):", " ".join(f"{t:.3f}" for t in r["chunk_s"]))
        print("by kind:", ", ".join(f"{k} {v:.3f}" for k, v in prof["by_kind_s"].items()))
        for t in prof["top"]:
            print(f"  {t['s']:8.4f} s {t['calls']:6d}x  {t['name'][:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
