"""`dfjax bench`: speed of the real model shapes with random weights, on the current device.

For each (resolution, mode) a fresh subprocess (so the device's peak memory is that run's) builds
the 1.3B DiT, the UMT5-XXL encoder and the Wan2.1 VAE with random weights, compiles, warms up and
times several videos (median and spread): diffusion alone (one sync per video), and end to end
(text encoding + every chunk + its streaming VAE decode, frames pulled to the host and written to
an H.264 mp4 from a thread where PyAV is installed), and the streaming VAE decode alone. The
attention share of diffusion is timed apart by running each layer's attention at every chunk's shapes.
Prints a table and writes JSON under benchmarks/results/.

    dfjax bench                               # 480p and 720p, all modes, 81 frames
    dfjax bench --resolutions 480p --modes baseline dummy --runs 5
    dfjax bench --tiny                        # a CPU-sized smoke run (CI)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# stream: dfjax.stream's sampler; long-context: Dummy Forcing whose neighbour window costs what LongLive's 3 + 9 does
MODES = ("baseline", "dummy", "local", "stream", "dummy-stream", "long-context")


def _run_config(mode, resolution, frames, tiny, attn_impl):
    from dfjax.config import RESOLUTIONS, CacheConfig, DummyForcingConfig, SamplingConfig, VideoShape
    from dfjax.pipeline import RunConfig

    if tiny:
        h, w = 64, 96
    elif resolution in RESOLUTIONS:
        h, w = RESOLUTIONS[resolution]
    else:  # "HxW", e.g. a small size to profile the real model on a CPU
        h, w = (int(x) for x in resolution.lower().split("x"))
    cache = CacheConfig.longlive() if mode == "local" else CacheConfig()
    dummy = DummyForcingConfig() if mode.startswith("dummy") else None
    if mode == "long-context":
        dummy = DummyForcingConfig(long_context=12)
    return RunConfig(video=VideoShape(h, w, frames), sampling=SamplingConfig(), cache=cache, dummy=dummy,
                     attn_impl=attn_impl, stream=mode.endswith("stream"))


def _dit_config(tiny: bool, model: str = "1.3b", fp8: bool = False):
    from dfjax.config import WanConfig

    if tiny:
        return WanConfig.tiny(in_channels=16, out_channels=16, fp8=fp8)
    return (WanConfig.wan_14b if model == "14b" else WanConfig.wan_1_3b)(fp8=fp8)


def _random_models(tiny: bool, model: str = "1.3b", fp8: bool = False):
    """DiT, UMT5 encoder and VAE with random weights.

    Built eagerly, one small jitted initializer per distinct parameter shape: jitting the whole
    initialisation of the 5.7B-parameter UMT5-XXL made XLA compile for over 4 minutes on the H100.
    """
    import jax
    from flax import nnx

    from dfjax.model.text_encoder import UMT5Config, UMT5Encoder
    from dfjax.model.transformer import WanDiT
    from dfjax.model.vae import WanVAE, WanVAEConfig

    cfgs = (_dit_config(tiny, model, fp8),) + ((UMT5Config.tiny(), WanVAEConfig.tiny(with_encoder=False)) if tiny
                                               else (UMT5Config.xxl(), WanVAEConfig(with_encoder=False)))
    models = (WanDiT(cfgs[0], nnx.Rngs(0)), UMT5Encoder(cfgs[1], nnx.Rngs(1)), WanVAE(cfgs[2], rngs=nnx.Rngs(2)))
    jax.block_until_ready(nnx.state(models))
    return models


_T0 = time.perf_counter()


def progress(*msg) -> None:
    """A timestamped line on stderr (the parent passes it through), so a slow or stuck run shows where."""
    print(f"[bench {time.perf_counter() - _T0:7.1f}s]", *msg, file=sys.stderr, flush=True)


def _timed(fn, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _attention_seconds(gen, run, runs):
    """Time of every self-attention call of one video at its real shapes (the DiT's attention share)."""
    import jax
    import jax.numpy as jnp

    from dfjax.cache import AttentionLayout, init_cache
    from dfjax.kernels.attention import grouped_attention

    cfg = gen.model.cfg
    layout = gen.first_layout
    plan_layout = None
    if gen.dummy is not None and gen.stats.last_plan is not None:
        plan_layout = gen.dummy.layout(gen.stats.last_plan)
    tpf, cf = layout.tokens_per_frame, layout.chunk_frames
    lq = tpf * cf
    q = jax.random.normal(jax.random.PRNGKey(0), (1, lq, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    steps = len(run.sampling.denoising_steps)
    fn = jax.jit(lambda q, groups, end: grouped_attention(
        q, tuple((g.k, g.v, g.valid_tokens(end)) for g in groups), impl=gen.attn_impl))
    total = 0.0
    for c in range(run.num_chunks):
        lay = plan_layout if (plan_layout is not None and c > run.dummy.ar_start) else layout
        shapes = {}
        for layer in lay.layers:  # identical layers share one timing
            shapes[layer] = shapes.get(layer, 0) + 1
        for layer, count in shapes.items():
            groups = init_cache(AttentionLayout((layer,), tpf, cf), 1, cfg.head_dim, jnp.bfloat16).layers[0]
            groups = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype),
                                            groups)
            end = jnp.int32((c + 1) * cf)
            jax.block_until_ready(fn(q, groups, end))
            t = statistics.median(_timed(lambda: jax.block_until_ready(fn(q, groups, end)), max(runs, 3)))
            total += t * count * (steps + 1 if c < gen.prefill_chunks else steps)  # stream: no refresh
    return total


def run_long(mode, resolution, frames, tiny, attn_impl, model="1.3b", fp8=False) -> dict:
    """One long video's DiT, chunk by chunk (each synced): per-chunk seconds and the device's peak memory, to see
    that both stay flat once the caches are full. A random text context stands in for the encoder."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dfjax.dummy.forcing import context_summary
    from dfjax.model.transformer import WanDiT
    from dfjax.pipeline import Generator

    run = _run_config(mode, resolution, frames, tiny, attn_impl)
    dit = WanDiT(_dit_config(tiny, model, fp8), nnx.Rngs(0))
    gen = Generator(dit, run)
    ctx = jax.random.normal(jax.random.PRNGKey(3), (1, dit.cfg.text_len, dit.cfg.text_dim), jnp.bfloat16)
    kv = gen.text_kv(ctx)
    for r in gen.chunks(kv, seed=0):  # compiles every step: all are in use by chunk ar_start + 2
        if r.index >= 3:
            break
    progress(f"{mode} {resolution} {frames} frames: compiled ({gen.stats.compile_s:.1f} s)")
    times, in_use, peak, t0 = [], [], [], time.perf_counter()
    for r in gen.chunks(kv, seed=0):
        r.latents.block_until_ready()
        times.append(time.perf_counter() - t0)
        stats = jax.devices()[0].memory_stats() or {}  # after each chunk: memory held, and the peak so far
        in_use.append(stats.get("bytes_in_use", 0) / 2**30)
        peak.append(stats.get("peak_bytes_in_use", 0) / 2**30)
        t0 = time.perf_counter()
    plan = gen.stats.last_plan
    return {"mode": mode, "resolution": resolution if not tiny else "tiny", "frames": frames, "long": True,
            "model": model, "fp8": fp8, "chunk_s": times, "diffusion_s": sum(times), "diffusion_fps": frames / sum(times),
            "mem_gib": in_use, "peak_gib": peak, "peak_mem_gib": peak[-1], "compile_s": gen.stats.compile_s,
            "plan": None if plan is None else context_summary(plan, run.sampling.chunk_frames,
                                                                run.dummy.long_context)}


def run_one(mode, resolution, frames, runs, tiny, attn_impl, attention_share=True, mesh_of_one=False, model="1.3b",
            fp8=False) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dfjax.cache import init_cache
    from dfjax.dummy.hma import cache_nbytes
    from dfjax.model.vae import decode_chunk, init_decoder_cache
    from dfjax.pipeline import Generator
    from dfjax.sharding import MeshConfig
    from dfjax.t2v import decode_chunks
    from dfjax.video import Mp4Writer

    run = _run_config(mode, resolution, frames, tiny, attn_impl)
    progress(mode, resolution, "building random models")
    dit, t5, vae = _random_models(tiny, model, fp8)
    progress("models ready")
    # mesh_of_one: the sharded code path (NamedShardings, jit with in/out shardings) on a 1x1 mesh
    mesh = MeshConfig(data=1, tensor=1).mesh(jax.devices()[:1]) if mesh_of_one else None
    gen = Generator(dit, run, mesh=mesh)
    t5_graph, t5_state = nnx.split(t5)
    encode = jax.jit(lambda s, ids, mask: nnx.merge(t5_graph, s)(ids, mask))
    ids = jax.random.randint(jax.random.PRNGKey(3), (1, t5.cfg.text_len), 2, t5.cfg.vocab_size, jnp.int32)
    mask = jnp.ones_like(ids).at[:, 40:].set(0)  # a prompt of 40 tokens
    vae_graph, vae_state = nnx.split(vae)
    h, w = run.video.latent_hw

    def text():
        return gen.text_kv(encode(t5_state, ids, mask))

    def diffusion(text_kv):
        last = None
        for r in gen.chunks(text_kv, seed=0):
            last = r.latents
        return jax.block_until_ready(last)

    first = {}
    try:  # end to end includes the H.264 mp4 (streamed from a thread) where PyAV is installed
        import av  # noqa: F401
        mp4_dir = tempfile.mkdtemp(prefix="dfjax-bench-")
    except ImportError:
        mp4_dir = None

    def e2e():  # as dfjax generate does it: chunk k decoded and copied while chunk k + 1 is denoised
        t0 = time.perf_counter()
        kv = text()
        writer = None if mp4_dir is None else Mp4Writer(Path(mp4_dir) / "e2e.mp4", fps=16)
        made = ((r.latents, r.index) for r in gen.chunks(kv, seed=0))
        decode = lambda z, cache: decode_chunk(vae_graph, vae_state, z, cache)
        for index, frames_u8 in decode_chunks(made, decode, init_decoder_cache(vae.cfg, 1, h, w)):
            if writer is not None:
                writer.write(frames_u8)
            if index == 0:
                first["s"] = time.perf_counter() - t0
        if writer is not None:
            writer.close()
            first["frames_written"] = writer.frames_written
        return frames_u8

    t0 = time.perf_counter()
    kv = jax.block_until_ready(text())
    compile_text = time.perf_counter() - t0
    progress(f"text encoder compiled and run: {compile_text:.1f} s")
    diffusion(kv)  # compiles every step (timed by the generator)
    compile_s = gen.stats.compile_s
    progress(f"first video (compile {compile_s:.1f} s)")
    t0 = time.perf_counter()
    e2e()  # compiles the VAE variants
    compile_vae = time.perf_counter() - t0
    progress(f"first end-to-end video with VAE compile: {compile_vae:.1f} s")
    text_times = _timed(lambda: jax.block_until_ready(text()), runs)
    diff_times = _timed(lambda: diffusion(kv), runs)
    progress(f"diffusion {diff_times}")
    latents = [r.latents for r in gen.chunks(kv, seed=0)]

    def vae_only():
        cache = init_decoder_cache(vae.cfg, 1, h, w)
        for z in latents:
            pixels, cache = decode_chunk(vae_graph, vae_state, z, cache)
        return jax.block_until_ready(pixels)

    vae_times = _timed(vae_only, runs)
    progress(f"VAE decode alone {vae_times}")
    e2e_times, first_times = [], []
    for _ in range(runs):
        e2e_times += _timed(e2e, 1)
        first_times.append(first["s"])
    progress(f"end to end {e2e_times}")
    stats = jax.devices()[0].memory_stats() or {}
    if mp4_dir is not None:
        shutil.rmtree(mp4_dir)
    cache_bytes = cache_nbytes(jax.eval_shape(lambda: init_cache(gen.first_layout, 1, dit.cfg.head_dim,
                                                                 jnp.bfloat16)))
    if gen.stats.last_plan is not None:  # after the plan: the per-head-type caches
        lay = gen.dummy.layout(gen.stats.last_plan)
        cache_bytes = cache_nbytes(jax.eval_shape(lambda: init_cache(lay, 1, dit.cfg.head_dim, jnp.bfloat16)))
    if run.stream:  # a cache per denoising step
        cache_bytes *= len(run.sampling.denoising_steps)
    med = statistics.median
    n = run.video.frames
    result = {
        "mode": mode, "resolution": resolution if not tiny else "tiny", "frames": n, "attn_impl": attn_impl,
        "model": model, "fp8": fp8,
        "mesh": "1x1" if mesh_of_one else None,
        "runs_timed": runs,
        "diffusion_s": med(diff_times), "diffusion_s_all": diff_times, "diffusion_fps": n / med(diff_times),
        "e2e_s": med(e2e_times), "e2e_s_all": e2e_times, "e2e_fps": n / med(e2e_times),
        "text_s": med(text_times), "vae_s": med(vae_times),
        "e2e_includes_mp4": mp4_dir is not None, "mp4_frames": first.get("frames_written"), "first_chunk_s": med(first_times),
        "vae_and_other_s": med(e2e_times) - med(diff_times) - med(text_times),
        "compile_s": compile_s, "compile_text_s": compile_text, "compile_vae_s": compile_vae,
        "peak_mem_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "kv_cache_bytes": cache_bytes,
        "num_dummy": None if gen.stats.last_plan is None else gen.stats.last_plan.num_dummy,
        "attention_s": None,
    }
    if attention_share:
        report(result)  # kept by the parent if the attention timing below runs past the timeout
        result["attention_s"] = _attention_seconds(gen, run, runs)
        progress(f"attention share {result['attention_s']:.3f} s")
    return result


def report(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def environment() -> dict:
    import jax

    commit = os.environ.get("DFJAX_COMMIT")  # set where the checkout travels without its .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except Exception:
            commit = "unknown"
    import flax

    return {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "jax_version": jax.__version__,
            "flax_version": flax.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "git_commit": commit}


def print_table(runs: list[dict]) -> None:
    if runs and runs[0].get("long"):
        print(f"{'mode':12s} {'res':6s} {'frames':>6s} {'diff s':>8s} {'FPS':>6s} {'chunk s: first 10':>17s} "
              f"{'last 10':>8s} {'max':>6s} {'GiB held: chunk 10':>18s} {'last':>6s} {'peak GiB':>8s}")
        for r in runs:
            c, m = r["chunk_s"], r.get("mem_gib") or [float("nan")] * 11
            med = lambda xs: statistics.median(xs)
            print(f"{r['mode']:12s} {r['resolution']:6s} {r['frames']:6d} {r['diffusion_s']:8.2f} "
                  f"{r['diffusion_fps']:6.2f} {med(c[1:11]):17.3f} {med(c[-10:]):8.3f} {max(c[1:]):6.3f} "
                  f"{m[min(10, len(m) - 1)]:18.2f} {m[-1]:6.2f} {r['peak_mem_gib']:8.2f}")
        return
    label = lambda r: r["mode"] + (" 14b" if r.get("model") == "14b" else "") + (" fp8" if r.get("fp8") else "")
    head = f"{'mode':16s} {'res':6s} {'diff s':>7s} {'diff FPS':>8s} {'e2e s':>7s} {'e2e FPS':>7s} " \
           f"{'1st chunk':>9s} {'attn s':>7s} {'compile':>7s} {'peak GiB':>8s}"
    print(head)
    for r in runs:
        print(f"{label(r):16s} {r['resolution']:6s} {r['diffusion_s']:7.3f} {r['diffusion_fps']:8.2f} {r['e2e_s']:7.3f} "
              f"{r['e2e_fps']:7.2f} {r['first_chunk_s']:9.3f} {r['attention_s'] or float('nan'):7.3f} {r['compile_s']:7.1f} "
              f"{r['peak_mem_gib']:8.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dfjax bench")
    p.add_argument("--resolutions", nargs="+", default=["480p", "720p"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny models at 64x96 (CPU smoke run)")
    p.add_argument("--no-attention-share", action="store_true", help="skip timing the attention calls apart")
    p.add_argument("--mesh-of-one", action="store_true",
                   help="run the sharded code path on a data=1 x tensor=1 mesh (compare with the unsharded default)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per (mode, resolution) run")
    p.add_argument("--out", help="JSON path (default benchmarks/results/<device>-<date>.json)")
    p.add_argument("--long", action="store_true",
                   help="long videos: one video of --frames (e.g. 3841, 4 min at 16 fps), its DiT per chunk and peak "
                        "memory (modes dummy, local, long-context)")
    p.add_argument("--model", choices=("1.3b", "14b"), default="1.3b", help="the DiT's size (random weights)")
    p.add_argument("--fp8", action="store_true", help="the DiT's block linears in fp8 (e4m3; docs/fp8.md)")
    p.add_argument("--one", nargs=2, metavar=("MODE", "RES"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        import jax

        jax.config.update("jax_default_prng_impl", "unsafe_rbg")  # fast random weights; this process only
        if a.long:
            report(run_long(a.one[0], a.one[1], a.frames, a.tiny, a.attn_impl, a.model, a.fp8))
        else:
            report(run_one(a.one[0], a.one[1], a.frames, a.runs, a.tiny, a.attn_impl, not a.no_attention_share,
                           a.mesh_of_one, a.model, a.fp8))
        return 0
    # children share compiled programs (UMT5, VAE, identical steps) through JAX's persistent cache
    from dfjax.cli import use_compile_cache

    use_compile_cache()
    env = environment()
    out = Path(a.out) if a.out else Path("benchmarks/results") / (
        f"{env['device'].replace(' ', '_')}-{env['date']}" + ("-tiny" if a.tiny else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for res in (["tiny"] if a.tiny else a.resolutions):
        for mode in a.modes:
            cmd = [sys.executable, "-m", "dfjax.bench", "--one", mode, res, "--frames", str(a.frames), "--runs",
                   str(a.runs), "--attn-impl", a.attn_impl] + (["--tiny"] if a.tiny else []) + (
                       ["--no-attention-share"] if a.no_attention_share else []) + (
                       ["--mesh-of-one"] if a.mesh_of_one else []) + (["--long"] if a.long else []) + (
                       ["--model", a.model] + (["--fp8"] if a.fp8 else []))
            # stderr (progress, errors) streams through; a run past --timeout is killed with its children
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=a.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                stdout, _ = proc.communicate()
                proc.returncode = "timeout"
            line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            if line and proc.returncode:  # cut off while timing the attention share: keep the rest
                print(f"{mode} {res}: attention share not timed (exit {proc.returncode})", file=sys.stderr)
            elif proc.returncode or not line:
                print(f"{mode} {res}: failed (exit {proc.returncode})", file=sys.stderr)
                results.append({"mode": mode, "resolution": res, "frames": a.frames,
                                "error": f"exit {proc.returncode}"})
                out.write_text(json.dumps({**env, "runs": results}, indent=2))
                continue
            results.append(json.loads(line[-1][len("RESULT "):]))
            print_table([results[-1]])
            out.write_text(json.dumps({**env, "runs": results}, indent=2))  # kept if a later run is cut off
    print()
    print(f"{env['device']} x{env['num_devices']}, jax {env['jax_version']}, {env['date']}, commit {env['git_commit']}")
    print_table([r for r in results if "error" not in r])
    print(f"wrote {out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
