"""The `dfjax` command: convert, generate, calibrate, bench."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dfjax.config import RESOLUTIONS


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


# ---------------------------------------------------------------- convert

def cmd_convert(a) -> None:
    from dfjax.convert.build import convert_model_folder

    out = convert_model_folder(
        a.src, a.out, config=a.config, num_heads=a.num_heads, family=a.family, entry=a.entry, steps=a.steps,
        ema=False if a.no_ema else None,
        lora=a.lora, lora_alpha=a.lora_alpha, text_encoder=a.text_encoder, vae=a.vae, tokenizer=a.tokenizer,
        dtype=a.dtype, compute_dtype=a.compute_dtype, overwrite=a.overwrite, log=print,
    )
    print(f"wrote {out}")


# ---------------------------------------------------------------- generate / calibrate

@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int
    out: Path


def read_prompts(path: str | Path, default_seed: int) -> list[tuple[str, int]]:
    """One prompt per line, or JSONL objects {"prompt": ..., "seed": ...}; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompt file {path} does not exist.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"prompt file {path} is not UTF-8 text ({e}).") from None
    items = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
                prompt, seed = obj["prompt"], int(obj.get("seed", default_seed))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise UsageError(f"{path}:{n}: expected a JSON object with a 'prompt' (and optional 'seed'): {e}.")
            if not isinstance(prompt, str) or not prompt.strip():
                raise UsageError(f"{path}:{n}: the prompt is empty; describe the video to make.")
            items.append((prompt, seed))
        else:
            items.append((line, default_seed))
    if not items:
        raise UsageError(f"prompt file {path} has no prompts; put one prompt per line.")
    return items


def read_timeline(path: str | Path) -> list[tuple[int, float, str]]:
    """JSONL lines {"start": SECONDS, "prompt": "..."}: [(line number, start, prompt)], the first at 0, in order."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"timeline file {path} does not exist.")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            start, prompt = float(obj["start"]), obj["prompt"]
            if set(obj) - {"start", "prompt"}:
                raise ValueError(f"unknown key(s) {sorted(set(obj) - {'start', 'prompt'})}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{path}:{n}: expected a JSON object {{\"start\": SECONDS, \"prompt\": TEXT}}: {e}.")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{path}:{n}: the prompt is empty; describe what the video shows from {start} s on.")
        if not out and start != 0:
            raise UsageError(f"{path}:{n}: the first prompt must start at 0 (it starts the video), not {start}.")
        if out and start <= out[-1][1]:
            raise UsageError(f"{path}:{n}: starts at {start} s, not after line {out[-1][0]}'s {out[-1][1]} s; sort "
                             "the lines and give each its own time.")
        out.append((n, start, prompt))
    if not out:
        raise UsageError(f"timeline file {path} has no lines; give one JSON object per line.")
    return out


def check_writable_file(path: str | Path, what: str) -> Path:
    """A file we will write later: refused now if its folder is missing or read-only or it names a folder."""
    import os

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name.")
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: the folder {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{what} {path} cannot be written (permission denied); choose another path.")
    return path


def check_request(a) -> Job | None:
    """Checks the prompt and output arguments before any heavy work; the Job of a single --prompt."""
    import os

    from dfjax.video import check_writable

    if a.timeline:
        if a.prompt is not None or a.prompts is not None:
            raise UsageError("--timeline gives the prompts (its first line starts the video); drop --prompt/--prompts.")
        a.prompt = read_timeline(a.timeline)[0][2]
    if a.prompt is None and a.prompts is None and a.model in (None, "demo"):  # `dfjax generate` alone: the demo
        from dfjax.demo import DEMO_PROMPTS

        a.prompt = DEMO_PROMPTS[0]
    if (a.prompt is None) == (a.prompts is None):
        raise UsageError("give exactly one of --prompt TEXT, --prompts FILE or --timeline FILE.")
    for path, what in ((a.timing_json, "--timing-json"), (a.save_profile, "--save-profile")):
        if path:
            check_writable_file(path, what)
    if a.prompt is not None:
        if not a.prompt.strip():
            raise UsageError("--prompt is empty; describe the video to make.")
        out = Path(a.out or "out.mp4")
        if out.is_dir():
            raise UsageError(f"--out {out} is a folder; give an .mp4 file name (a folder is for --prompts).")
        if out.suffix.lower() != ".mp4":
            raise UsageError(f"--out {out} must be an .mp4 file for a single prompt.")
        check_writable(out)
        if out.exists() and not a.overwrite:
            raise UsageError(f"{out} exists; pass --overwrite or choose another --out.")
        return Job(a.prompt, a.seed, out)
    read_prompts(a.prompts, a.seed)
    folder = Path(a.out or "out")
    if folder.suffix.lower() == ".mp4":
        raise UsageError("--out must be a folder when --prompts gives several prompts.")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file; --prompts writes a folder of videos, so name a folder.")
    parent = folder if folder.is_dir() else (folder.parent if str(folder.parent) else Path("."))
    if not parent.is_dir():
        raise UsageError(f"--out {folder}: the folder {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {folder} cannot be written (permission denied); choose another folder.")
    return None


def options(a):
    """dfjax.api.Options from the command line (checked now, before any heavy work)."""
    from dfjax.api import Options

    dummy = a.dummy_forcing or bool(a.profile)
    cache, sink, window = (getattr(a, n, None) for n in ("cache", "sink_frames", "window_frames"))  # not calibrate's
    if dummy and (cache is not None or sink is not None or window is not None):
        raise UsageError("--cache, --sink-frames and --window-frames set the cache without Dummy Forcing; Dummy "
                         "Forcing gives each head type its own cache (--local-context-length sets the neighbour "
                         "heads' window). Drop one of them.")
    return Options(resolution=a.resolution, height=a.height, width=a.width, frames=a.frames,
                   seconds=a.seconds, fps=getattr(a, "fps", None), cache=cache, sink_frames=sink,
                   window_frames=window, dummy_forcing=dummy, num_dummy=a.num_dummy, ar_start=a.ar_start,
                   local_context_length=a.local_context_length, paper_dummy=a.paper_dummy, query_rows=a.query_rows,
                   long_context=a.long_context,
                   stream=getattr(a, "stream", False), attn_impl=a.attn_impl, dtype=a.dtype, fp8=a.fp8, seed=a.seed)


def linears(opts, meta) -> str:
    """How the DiT's block linears run, for the run's printout: the option, else the model folder's choice."""
    t = meta["transformer"]
    if (t.get("fp8", False) if opts.fp8 is None else opts.fp8):
        return "fp8 e4m3 (per-channel weight, per-token activation scales; docs/fp8.md)"
    return opts.dtype or t.get("dtype", "bfloat16")


def load_plan(a, meta):
    if not a.profile:
        return None
    from dfjax.dummy import HeadPlan

    plan = HeadPlan.load(a.profile)
    t = meta["transformer"]
    plan.validate(t["num_layers"], t["num_heads"])
    return plan


def model_folder(a) -> Path:
    if a.model and a.model != "demo":
        return Path(a.model)
    from dfjax.demo import demo_model_folder, is_trained

    folder = demo_model_folder()
    if not is_trained(folder) and not getattr(a, "quiet", False):
        note("using a random-weight stand-in for the demo model (the trained demo is not installed).")
    return folder


def note(text: str) -> None:
    print(f"dfjax: note: {text}", file=sys.stderr)


def warn_outside_the_demo(folder: Path, run, prompts) -> None:
    """The demo model knows a small language at one size: say so (one line each) when asked for more."""
    from dfjax.demo import DEMO_DEFAULTS, is_demo_folder
    from dfjax.synthetic import unknown_words

    if not is_demo_folder(folder):
        return
    size = (run.video.height, run.video.width)
    if size != (DEMO_DEFAULTS["height"], DEMO_DEFAULTS["width"]):
        note(f"the demo model was trained at {DEMO_DEFAULTS['width']}x{DEMO_DEFAULTS['height']}; at "
             f"{size[1]}x{size[0]} expect blank or broken frames.")
    words = sorted({w for p in prompts for w in unknown_words(p)})
    if words:
        note(f"the demo model does not know the word(s) {', '.join(words)} (its language: dfjax.synthetic."
             "VOCABULARY); expect them to be ignored.")


def cmd_generate(a) -> None:
    from dfjax import distributed as dist
    from dfjax.api import run_config
    from dfjax.t2v import VideoModel, VideoPipeline, check_model_folder

    info = dist.initialize(a.distributed, a.coordinator, a.num_processes, a.process_id)  # before any jax work
    opts = options(a)
    job = check_request(a)
    folder = model_folder(a)
    meta = check_model_folder(folder)
    run, fps = run_config(meta, opts)
    plan = load_plan(a, meta)
    items = [(job.prompt, job.seed)] if job else read_prompts(a.prompts, a.seed)
    if not a.quiet:
        warn_outside_the_demo(folder, run, [p for p, _ in items])
    if job is None:
        return generate_many(a, info, folder, run, fps, plan, items, linears(opts, meta))
    timeline = []
    if a.timeline:
        from dfjax.t2v import switch_chunks

        lines = read_timeline(a.timeline)[1:]
        timeline = [(start, prompt) for _, start, prompt in lines]
        switch_chunks(timeline, run, fps, [f"{a.timeline}:{n}" for n, _, _ in lines])  # past the end: fail now
        if run.stream:
            raise UsageError("--timeline: the stream-batch sampler cannot change the prompt during a video; drop "
                             "--stream.")
    pipeline = VideoPipeline(VideoModel.load(folder, opts.dtype, opts.fp8), run, plan=plan, fps=fps)
    t = pipeline.make_video(job.prompt, job.seed, job.out, progress=not a.quiet, timeline=timeline,
                            recache=not a.no_recache)
    if not a.quiet:
        print_timing(job.out, t)
        print(f"  DiT linears: {linears(opts, meta)}")
        plan = pipeline.generator.stats.last_plan
        if plan is not None:
            from dfjax.dummy.forcing import context_summary

            print("  plan: " + context_summary(plan, run.sampling.chunk_frames, run.dummy.long_context))
    if a.save_profile and pipeline.generator.stats.last_plan is not None:
        pipeline.generator.stats.last_plan.save(a.save_profile)
    if a.timing_json:
        record = {"prompt": job.prompt, "seed": job.seed, "file": str(job.out), **t.as_dict()}
        Path(a.timing_json).write_text(json.dumps([record], indent=2))


def generate_many(a, info, folder, run, fps, plan, items, dit_linears: str) -> None:
    """A prompt file over this process's data groups (dfjax.distributed): each group makes its share of
    the videos on its own devices, writes a manifest line per video, and skips finished ones (a video's name
    carries a key of its prompt, seed and settings)."""
    import threading

    from dfjax import distributed as dist
    from dfjax import jobs as J
    from dfjax.sharding import MeshConfig
    from dfjax.t2v import VideoModel, VideoPipeline
    from dfjax.video import check_writable

    mesh_cfg = MeshConfig.load(a.mesh) if a.mesh else MeshConfig(data=1, tensor=1)
    settings = {"run": run, "mesh": mesh_cfg.to_dict(), "model": dist.model_fingerprint(folder),
                "plan": plan and plan.to_json(), "fps": fps}
    # an override of the folder's choice makes other videos (runs without one keep their keys)
    settings.update({k: getattr(a, k) for k in ("fp8", "dtype") if getattr(a, k) is not None})
    dist.check_agreement({**settings, "prompts": items, "versions": dist.versions()}, info)
    work, manifest, out_dir = dist.local_work(items, a.out or "out", mesh_cfg, info, a.per_host_output,
                                              settings=dist.fingerprint(settings))
    check_writable(out_dir / "probe.mp4")
    mine = [j for w in work for j in w.jobs]
    legacy = J.legacy_outputs(mine)
    if legacy and info.is_main:
        note(f"{len(legacy)} video(s) here have names of an older dfjax ({legacy[0].name}, ...), which recorded "
             "neither the prompt nor the settings in the name; they are left as they are and made again under "
             "names keyed by prompt, seed and settings.")
    todo = J.pending(mine, a.overwrite)
    if not todo:  # all made already: nothing to load or compile
        if not a.quiet:
            print_summary([], len(mine))
        return
    model = VideoModel.load(folder, a.dtype, a.fp8)
    pipes = {w.group: VideoPipeline(model, run, plan=plan, mesh=w.mesh if w.mesh.size > 1 else None, fps=fps)
             for w in work}
    done, lock = [0], threading.Lock()

    def make(w, job):
        t = pipes[w.group].make_video(job.prompt, job.seed, job.out).as_dict()
        with lock:
            done[0] += 1
            if not a.quiet:
                text = job.prompt if len(job.prompt) <= 40 else job.prompt[:39] + "..."
                dist.log(f"[{done[0]}/{len(todo)}] {job.out.name}  {text!r}  {t['e2e_s']:.1f} s", info=info,
                         all_processes=True)
        return t

    records = dist.run_local_work(
        work, make, manifest, info, overwrite=a.overwrite,
        on_skip=lambda job: a.quiet or dist.log(f"skip {job.out.name} (made earlier with this prompt, seed and "
                                                "settings; --overwrite to redo)", info=info, all_processes=True))
    if not a.quiet:
        print_summary(records, len(mine) - len(todo), dit_linears)
    if a.save_profile:
        saved = [p.generator.stats.last_plan for p in pipes.values() if p.generator.stats.last_plan is not None]
        if saved and info.is_main:
            saved[0].save(a.save_profile)
    if a.timing_json:
        Path(a.timing_json).write_text(json.dumps(records, indent=2))


def print_summary(records: list[dict], skipped: int, dit_linears: str | None = None) -> None:
    if not records:
        print(f"{skipped} video(s) already made, none to do.")
        return
    t = [r["timing"] for r in records]
    frames = sum(x["frames"] for x in t)
    rows = [("videos made", f"{len(records)}"), ("skipped (done)", f"{skipped}"),
            ("end to end", f"{sum(x['e2e_s'] for x in t):.1f} s ({frames / sum(x['e2e_s'] for x in t):.1f} FPS)"),
            ("compile (apart)", f"{sum(x['compile_s'] for x in t):.1f} s")]
    if dit_linears:
        rows.append(("DiT linears", dit_linears))
    for name, value in rows:
        print(f"  {name:16s} {value}")


def print_timing(out, t) -> None:
    rows = [("text", t.text_s), ("first chunk", t.first_chunk_s), ("end to end", t.e2e_s), ("mp4 write", t.write_s),
            ("compile (apart)", t.compile_s)]
    print(f"{out}: {t.frames} frames (diffusion, VAE decode and mp4 overlap)")
    for name, s in rows:
        fps = f"{t.frames / s:8.2f} FPS" if name == "end to end" and s else ""
        print(f"  {name:16s} {s:8.3f} s {fps}")


def cmd_calibrate(a) -> None:
    import numpy as np

    from dfjax.api import run_config
    from dfjax.dummy import aggregate_profiles
    from dfjax.pipeline import Generator
    from dfjax.t2v import VideoModel, check_model_folder

    a.dummy_forcing, a.profile, a.stream = True, None, False
    check_writable_file(a.out, "--out")
    opts = options(a)
    items = read_prompts(a.prompts, a.seed)
    folder = model_folder(a)
    meta = check_model_folder(folder)
    run, _ = run_config(meta, opts)
    warn_outside_the_demo(folder, run, [p for p, _ in items])
    model = VideoModel.load(folder, opts.dtype, opts.fp8)
    gen = Generator(model.dit, run)
    scores = []
    for prompt, seed in items:
        scores.append(gen.calibration_scores(gen.text_kv(model.text([prompt])), seed))
    cfg = model.dit.cfg
    mean = aggregate_profiles(scores)
    plan = gen.dummy.plan_from_scores(mean)
    plan.save(a.out)
    print(f"wrote {a.out}: {plan.num_dummy} dummy heads of {cfg.num_layers * cfg.num_heads}, from "
          f"{len(items)} prompt(s); mean current-chunk mass {float(np.mean(mean[..., 2])):.3f}; DiT linears: "
          f"{linears(opts, meta)}")


# ---------------------------------------------------------------- serve

SERVE_NEEDS = {"starlette": "starlette", "uvicorn": "uvicorn", "websockets": "websockets",
               "prometheus_client": "prometheus-client", "PIL": "pillow"}


def cmd_serve(a) -> None:
    """The live server (dfjax.serve, docs/serve.md): loads and compiles at start-up, then serves the page, the
    WebSocket sessions and the HTTP batch API until Ctrl-C."""
    import dataclasses
    import importlib.util

    from dfjax.api import load, run_config
    from dfjax.t2v import check_model_folder

    missing = [pkg for mod, pkg in SERVE_NEEDS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise UsageError(f"dfjax serve needs {', '.join(missing)}: pip install 'dfjax[serve]'.")
    from dfjax.demo import DEMO_PROMPTS, is_demo_folder
    from dfjax.serve import ServeConfig, serve

    opts = options(a)
    folder = model_folder(a)
    meta = check_model_folder(folder)
    run, fps = run_config(meta, opts)
    plan = load_plan(a, meta)
    demo = is_demo_folder(folder)
    if a.warmup_prompt is not None and not a.warmup_prompt.strip():
        raise UsageError("--warmup-prompt is empty.")
    cfg = ServeConfig(host=a.host, port=a.port, queue_size=a.queue_size, max_prompt_chars=a.max_prompt_chars,
                      allow_origins=tuple(a.allow_origin or ()), default_seed=a.seed,
                      warmup_prompt=a.warmup_prompt or (DEMO_PROMPTS[0] if demo else ServeConfig.warmup_prompt),
                      examples=tuple(DEMO_PROMPTS) if demo else (), model_name="demo" if demo else folder.name)
    mesh = None
    if a.mesh:
        from dfjax.sharding import MeshConfig

        mesh_cfg = MeshConfig.load(a.mesh)
        if mesh_cfg.device_grid().shape[0] != 1:
            raise UsageError(f"--mesh {a.mesh}: dfjax serve runs one session at a time on one group of devices; "
                             "give a mesh with data 1 (tensor-parallel heads, or --stream stages).")
        mesh = mesh_cfg.mesh()
    warn_outside_the_demo(folder, run, [cfg.warmup_prompt])

    def notes(prompt: str) -> list[str]:
        if not demo:
            return []
        from dfjax.synthetic import unknown_words

        words = unknown_words(prompt)
        return [f"the demo model does not know the word(s) {', '.join(sorted(set(words)))}; expect them to be "
                "ignored."] if words else []

    serve(lambda: load(folder, profile=plan, mesh=mesh, **dataclasses.asdict(opts)), cfg, notes, run=run, fps=fps)


# ---------------------------------------------------------------- parser

def add_video_options(p, calibrate: bool = False) -> None:
    """The options of a run (dfjax.api.Options); calibrate takes those its scores depend on."""
    from dfjax.kernels import attention as kernels

    p.add_argument("--model", help="a converted model folder, or 'demo' (default: the built-in demo model)")
    p.add_argument("--seed", type=int, default=0, help="the noise seed (and Dummy Forcing's query-row sample)")
    v = p.add_argument_group("video (default: the model folder's, else 480x832, 81 frames, 16 fps)")
    v.add_argument("--resolution", choices=sorted(RESOLUTIONS), help="a standard size instead of --height/--width")
    v.add_argument("--height", type=int, help="pixels, a multiple of 16")
    v.add_argument("--width", type=int, help="pixels, a multiple of 16")
    v.add_argument("--frames", type=int, help="pixel frames, 4k+1 (81 = 21 latent frames)")
    v.add_argument("--seconds", type=float, help="video length instead of --frames")
    if not calibrate:
        v.add_argument("--fps", type=float, help="frames per second of the mp4")
    c = p.add_argument_group("compute")
    c.add_argument("--dtype", choices=["bfloat16", "float32"], help="compute dtype (default: the model folder's)")
    c.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                   help="the DiT blocks' linears (attention q/k/v/o, FFN) in fp8 e4m3: per-channel weight and "
                        "per-token activation scales, quantised as the model loads (docs/fp8.md); --no-fp8: off "
                        "(default: the model folder's choice, else off)")
    c.add_argument("--attn-impl", default="auto", choices=kernels.IMPLS,
                   help="attention kernel (default auto: cuDNN on NVIDIA GPUs (Pallas for float32), Pallas on TPU, "
                        "XLA on CPU; 'pallas' on Hopper is the one-launch Mosaic GPU kernel: faster at 480P, "
                        "~30 s more compile)")
    if not calibrate:
        k = p.add_argument_group("KV cache without Dummy Forcing (default: the model folder's, else global)")
        k.add_argument("--cache", choices=["global", "local"],
                       help="global: every earlier frame (Self Forcing); local: --sink-frames + --window-frames")
        k.add_argument("--sink-frames", type=int, help="local cache: first frames kept for ever (LongLive: 3)")
        k.add_argument("--window-frames", type=int,
                       help="local cache: latest frames kept, the current chunk included (LongLive: 9)")
        p.add_argument("--stream", action="store_true",
                       help="stream batch: pipeline the denoising steps of consecutive chunks, a KV cache per step "
                            "(noisy context, no refresh forward: a different sampler); with --mesh a group's "
                            "devices are its stages (docs/scaling.md)")
    df = p.add_argument_group("Dummy Forcing (docs/dummy-forcing.md)")
    if not calibrate:
        df.add_argument("--dummy-forcing", action="store_true", help="turn Dummy Forcing on")
        df.add_argument("--profile", help="a calibration profile (JSON) from `dfjax calibrate`; skips online scoring")
    df.add_argument("--num-dummy", type=int, help="dummy heads over all layers (default: half)")
    df.add_argument("--ar-start", type=int,
                    help="the chunk whose refresh is scored; the plan applies from the next (default: the model "
                         "folder's family, else 1)")
    df.add_argument("--local-context-length", type=int,
                    help="chunks of history the neighbour heads keep (default: the family's, else 1)")
    df.add_argument("--paper-dummy", action="store_true",
                    help="dummy heads see only the current chunk (the paper) instead of the newest frame too")
    df.add_argument("--query-rows", choices=["release", "paper", "exact"],
                    help="query rows the scores average over (default: release)")
    df.add_argument("--long-context", metavar="BASELINE",
                    help="long-context mode: the neighbour heads' window as long as the attention a baseline spends "
                         "per chunk allows: longlive (3 sink + 9 frames), self-forcing (21 frames), or the "
                         "baseline's latent frames per chunk")


EXAMPLES = """examples:
  dfjax generate                                       the demo model's first prompt -> out.mp4
  dfjax generate --prompt "a blue circle moves up" --out circle.mp4
  dfjax convert self_forcing_dmd.pt models/sf --text-encoder T5.pth --vae VAE.pth --tokenizer umt5-xxl/
  dfjax generate --model models/sf --prompt "a cat surfing" --resolution 480p --dummy-forcing
  dfjax generate --model models/sf --prompts prompts.jsonl --out videos/ --profile profile.json
  dfjax calibrate --model models/sf --prompts calib.txt --out profile.json
  dfjax bench --resolutions 480p --modes baseline dummy
"""


def build_parser() -> argparse.ArgumentParser:
    from dfjax import __version__

    p = argparse.ArgumentParser(prog="dfjax", description="Dummy Forcing video generation in JAX.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"dfjax {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (also DFJAX_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="PyTorch checkpoints -> a dfjax model folder",
                       description="Converts a causal Wan2.1 checkpoint (and optionally its text encoder, VAE and "
                                   "tokenizer) into a dfjax model folder, recording the sampling settings its family "
                                   "runs with; prints what it did. docs/checkpoints.md has a command per release.")
    c.add_argument("src", help="the DiT: a Self Forcing / LongLive / Causal Forcing .pt, a Wan2.1 .safetensors/.pth, "
                               "or a diffusers folder")
    c.add_argument("out", help="the model folder to write (atomically)")
    c.add_argument("--family", choices=["self-forcing", "longlive", "causal-forcing", "causal-forcing-framewise", "wan"],
                   help="the release the checkpoint comes from: sets the entry its authors load and the sampling, "
                        "cache and Dummy Forcing settings recorded (default: detected from the file, and printed)")
    c.add_argument("--steps", type=int, choices=[1, 2, 4],
                   help="causal-forcing-framewise: the release's step count (1 and 2: Causal Forcing++, with a 4-step "
                        "first chunk; default: from the file name, else 4)")
    c.add_argument("--entry", choices=["generator", "generator_ema", "model"],
                   help="the entry of a training save to convert (default: the one the family's inference loads)")
    c.add_argument("--no-ema", action="store_true", help="the same as --entry generator")
    c.add_argument("--config", help="model preset (wan-1.3b, wan-14b, tiny) or a JSON file; checked against the weights")
    c.add_argument("--num-heads", type=int,
                   help="attention heads (default: from a config.json that comes with the source, else Wan2.1's "
                        "1536 -> 12 and 5120 -> 40; other widths need it)")
    c.add_argument("--lora", help="LongLive LoRA file (lora.pt, a peft dict or folder) to merge into the DiT")
    c.add_argument("--lora-alpha", type=float,
                   help="the LoRA's alpha; scale = alpha / rank (default: the adapter_config.json saved with it, else "
                        "LongLive's release value, 256 for its rank-256 LoRA; other ranks need it)")
    c.add_argument("--text-encoder", help="Wan T5 .pth, or a transformers UMT5EncoderModel folder/.safetensors")
    c.add_argument("--vae", help="Wan2.1 VAE .pth, or a diffusers AutoencoderKLWan folder")
    c.add_argument("--tokenizer", help="folder with the google/umt5-xxl tokenizer files")
    c.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="how the weights are stored (norms and modulation are always float32; default bfloat16)")
    c.add_argument("--compute-dtype", choices=["bfloat16", "float32"],
                   help="what the model computes in (default: the --dtype; generate --dtype overrides it per run)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a dfjax model folder (or empty); anything else is never touched")
    c.set_defaults(fn=cmd_convert)

    g = sub.add_parser("generate", help="text -> mp4", description="Text to video: one prompt to an mp4, or a "
                       "prompt file to a folder of mp4s (a rerun skips what is done).")
    g.add_argument("--prompt", help="the video to make")
    g.add_argument("--prompts", help="a text file (one prompt per line) or JSONL with per-prompt seeds")
    g.add_argument("--timeline", help='prompts that change during the video: JSONL lines {"start": SECONDS, '
                                      '"prompt": TEXT}, the first at 0 (docs/long-video.md)')
    g.add_argument("--no-recache", action="store_true",
                   help="at a prompt switch keep the KV cache made under the old prompt (default: recompute it)")
    g.add_argument("--out", help="an .mp4 (one prompt) or a folder (--prompts); default out.mp4 / out/")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out video / redo finished ones")
    g.add_argument("--timing-json", help="write the timing table as JSON here")
    g.add_argument("--save-profile", help="save the Dummy Forcing plan this run used (JSON)")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    s = g.add_argument_group("scale out (docs/scaling.md)")
    s.add_argument("--mesh", help="mesh config: a JSON/YAML file or a preset in configs/ (data x tensor)")
    s.add_argument("--distributed", default="auto", choices=["auto", "on", "off"],
                   help="jax.distributed start-up: auto-detect SLURM/MPI/TPU/`python -m dfjax.distributed launch`")
    s.add_argument("--coordinator", help="HOST:PORT of process 0 (with --num-processes and --process-id)")
    s.add_argument("--num-processes", type=int, help="processes in the run (with --coordinator)")
    s.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
    s.add_argument("--per-host-output", action="store_true", help="write under OUT/process-NNNNN/")
    add_video_options(g)
    g.set_defaults(fn=cmd_generate)

    k = sub.add_parser("calibrate", help="a Dummy Forcing profile from a prompt set",
                       description="Scores the heads on each prompt's chunk ar_start and saves one plan (DHP on the "
                                   "mean scores) for `dfjax generate --profile`.")
    k.add_argument("--prompts", required=True, help="a text file (one prompt per line) or JSONL")
    k.add_argument("--out", required=True, help="profile JSON to write")
    add_video_options(k, calibrate=True)
    k.set_defaults(fn=cmd_calibrate)

    sv = sub.add_parser("serve", help="a live browser front end and HTTP API",
                        description="Loads and compiles the model, then serves a web page that plays the video as it "
                                    "is made and changes its prompt while it plays (a WebSocket session), an HTTP "
                                    "batch API (a prompt -> an mp4), /health and /metrics (Prometheus). One session "
                                    "at a time; others wait in a bounded queue. docs/serve.md has the protocol.")
    sv.add_argument("--host", default="127.0.0.1",
                    help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 lets every machine "
                         "that reaches this one use the model, with no authentication)")
    sv.add_argument("--port", type=int, default=8000, help="the port (default 8000; 0: any free one, printed)")
    sv.add_argument("--queue-size", type=int, default=4,
                    help="sessions and batch jobs that may wait for the device; more get a busy answer (default 4)")
    sv.add_argument("--max-prompt-chars", type=int, default=2000, help="the longest prompt taken (default 2000)")
    sv.add_argument("--warmup-prompt",
                    help="the prompt of the start-up video that compiles everything (and, with online Dummy Forcing, "
                         "whose head plan every session keeps)")
    sv.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                    help="a web origin (https://host:port) whose pages may open sessions, besides the server's own "
                         "page; repeat for more")
    sv.add_argument("--mesh", help="mesh config with data 1 (tensor-parallel heads, or the stages of --stream)")
    add_video_options(sv)
    sv.set_defaults(fn=cmd_serve)

    for command in (c, g, k, sv):  # also after the command: `dfjax generate ... --debug`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the Python traceback of an error (also DFJAX_DEBUG=1)")
    for name, (_, text) in TOOLS.items():  # listed in the help; main() hands their arguments over
        sub.add_parser(name, help=text)
    return p


# Commands with their own argument parser: `dfjax NAME ARGS...` is `python -m MODULE ARGS...`.
TOOLS = {"bench": ("dfjax.bench", "the speed benchmark (see README)"),
         "train-demo": ("dfjax.train_demo", "train the built-in demo model from scratch"),
         "adherence": ("dfjax.adherence", "how often the demo model's videos show what their prompts say"),
         "fidelity": ("dfjax.fidelity", "what Dummy Forcing changes in the videos (demo model)"),
         "long-eval": ("dfjax.long_eval", "long videos, long context and prompt switches on the demo model")}


def use_compile_cache() -> None:
    """Compiled programs (and XLA's autotuning results with them) persist across runs in JAX's persistent cache,
    so that only a machine's first run at a size pays the compile (at 1080P on an H200: the DiT's steps 11-32 s,
    the VAE's two decodes 29 s; read back in under a second). JAX_COMPILATION_CACHE_DIR picks the folder (default ~/.cache/dfjax/jax); DFJAX_COMPILE_CACHE=0 turns
    it off. Read by JAX when it is imported, so it is set before."""
    import os

    if os.environ.get("DFJAX_COMPILE_CACHE", "1") != "0":
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "dfjax" / "jax"))


def main(argv=None) -> int:
    import os
    import signal
    import warnings

    argv = sys.argv[1:] if argv is None else list(argv)
    use_compile_cache()
    if argv and argv[0] in TOOLS:
        return __import__(TOOLS[argv[0]][0], fromlist=["main"]).main(argv[1:])
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("DFJAX_DEBUG") not in (None, "", "0")

    def terminated(signum, frame):  # SIGTERM: unwind like Ctrl-C, so partial files are removed
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminated) if _main_thread() else None
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *rest: f"dfjax: note: {message}\n"  # one line, no source line
    try:
        t0 = time.perf_counter()
        args.fn(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("dfjax: interrupted; nothing half-written was left under a final name.", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # our errors carry the problem and the fix; OSError: a file the OS refused
        if debug:
            raise
        print(f"dfjax: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not getattr(args, "quiet", False):
        print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
