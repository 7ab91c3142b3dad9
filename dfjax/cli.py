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
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
                items.append((str(obj["prompt"]), int(obj.get("seed", default_seed))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise UsageError(f"{path}:{n}: expected a JSON object with a 'prompt' (and optional 'seed'): {e}.")
        else:
            items.append((line, default_seed))
    if not items:
        raise UsageError(f"prompt file {path} has no prompts; put one prompt per line.")
    return items


def check_request(a) -> Job | None:
    """Checks the prompt and output arguments before any heavy work; the Job of a single --prompt."""
    if a.prompt is None and a.prompts is None and a.model is None:  # `dfjax generate` alone: the demo
        from dfjax.demo import DEMO_PROMPTS

        a.prompt = DEMO_PROMPTS[0]
    if (a.prompt is None) == (a.prompts is None):
        raise UsageError("give exactly one of --prompt TEXT or --prompts FILE.")
    if a.prompt is not None:
        if not a.prompt.strip():
            raise UsageError("--prompt is empty; describe the video to make.")
        out = Path(a.out or "out.mp4")
        if out.suffix.lower() != ".mp4":
            raise UsageError(f"--out {out} must be an .mp4 file for a single prompt.")
        return Job(a.prompt, a.seed, out)
    read_prompts(a.prompts, a.seed)
    folder = Path(a.out or "out")
    if folder.suffix.lower() == ".mp4":
        raise UsageError("--out must be a folder when --prompts gives several prompts.")
    return None


def run_config(a, meta: dict):
    from dfjax.config import CacheConfig, DummyForcingConfig, SamplingConfig, VideoShape, config_from_dict
    from dfjax.pipeline import RunConfig

    defaults = meta.get("defaults", {})
    if a.resolution:
        height, width = RESOLUTIONS[a.resolution]
    else:
        height, width = a.height or defaults.get("height", 480), a.width or defaults.get("width", 832)
    fps = a.fps or defaults.get("fps", 16)
    if a.seconds is not None:
        frames = int(round(a.seconds * fps))
        frames = frames - (frames - 1) % 4  # the VAE makes 4k+1 frames
    else:
        frames = a.frames or defaults.get("frames", 81)
    sampling = config_from_dict(SamplingConfig, meta.get("sampling", {}))
    cache = CacheConfig(a.cache, a.sink_frames, a.window_frames)
    dummy = None
    if a.dummy_forcing or a.profile:
        dummy = DummyForcingConfig(num_dummy=a.num_dummy, ar_start=a.ar_start,
                                   local_context_length=a.local_context_length, packed_dummy=not a.paper_dummy,
                                   query_rows=a.query_rows, seed=a.seed)
    elif a.num_dummy is not None:
        raise UsageError("--num-dummy needs --dummy-forcing.")
    return RunConfig(video=VideoShape(height, width, frames), sampling=sampling, cache=cache, dummy=dummy,
                     attn_impl=a.attn_impl, stream=a.stream), fps


def load_plan(a, meta):
    if not a.profile:
        return None
    from dfjax.dummy import HeadPlan

    plan = HeadPlan.load(a.profile)
    t = meta["transformer"]
    plan.validate(t["num_layers"], t["num_heads"])
    return plan


def model_folder(a) -> Path:
    if a.model:
        return Path(a.model)
    from dfjax.demo import demo_model_folder, is_trained

    folder = demo_model_folder()
    if not is_trained(folder) and not getattr(a, "quiet", False):
        print("note: using a random-weight stand-in for the demo model (the trained demo is not installed).",
              file=sys.stderr)
    return folder


def cmd_generate(a) -> None:
    from dfjax import distributed as dist
    from dfjax.t2v import VideoModel, VideoPipeline, check_model_folder
    from dfjax.video import check_writable

    info = dist.initialize(a.distributed, a.coordinator, a.num_processes, a.process_id)  # before any jax work
    if a.negative_prompt is not None:
        raise UsageError("--negative-prompt: these few-step Self Forcing models sample without classifier-free "
                         "guidance, so a negative prompt would have no effect; remove it.")
    job = check_request(a)
    folder = model_folder(a)
    meta = check_model_folder(folder)
    run, fps = run_config(a, meta)
    plan = load_plan(a, meta)
    if job is None:
        return generate_many(a, info, folder, run, fps, plan)
    check_writable(job.out)
    if job.out.exists() and not a.overwrite:
        raise UsageError(f"{job.out} exists; pass --overwrite or choose another --out.")
    pipeline = VideoPipeline(VideoModel.load(folder, a.dtype), run, plan=plan)
    t = pipeline.make_video(job.prompt, job.seed, job.out, fps, progress=not a.quiet)
    if not a.quiet:
        print_timing(job.out, t)
    if a.save_profile and pipeline.generator.stats.last_plan is not None:
        pipeline.generator.stats.last_plan.save(a.save_profile)
    if a.timing_json:
        record = {"prompt": job.prompt, "seed": job.seed, "file": str(job.out), **t.as_dict()}
        Path(a.timing_json).write_text(json.dumps([record], indent=2))


def generate_many(a, info, folder, run, fps, plan) -> None:
    """A prompt file over this process's data groups (dfjax.distributed): each group makes its share of
    the videos on its own devices, writes a manifest line per video, and skips finished ones."""
    from dfjax import distributed as dist
    from dfjax.sharding import MeshConfig
    from dfjax.t2v import VideoModel, VideoPipeline
    from dfjax.video import check_writable

    mesh_cfg = MeshConfig.load(a.mesh) if a.mesh else MeshConfig(data=1, tensor=1)
    items = read_prompts(a.prompts, a.seed)
    dist.check_agreement({"run": run, "mesh": mesh_cfg.to_dict(), "model": dist.model_fingerprint(folder),
                          "prompts": items, "plan": plan and plan.to_json(), "versions": dist.versions()}, info)
    work, manifest, out_dir = dist.local_work(items, a.out or "out", mesh_cfg, info, a.per_host_output)
    check_writable(out_dir / "probe.mp4")
    model = VideoModel.load(folder, a.dtype)
    pipes = {w.group: VideoPipeline(model, run, plan=plan, mesh=w.mesh if w.mesh.size > 1 else None) for w in work}
    records = dist.run_local_work(
        work, lambda w, job: pipes[w.group].make_video(job.prompt, job.seed, job.out, fps,
                                                       progress=info.is_main and not a.quiet).as_dict(),
        manifest, info, overwrite=a.overwrite,
        on_skip=lambda job: a.quiet or dist.log(f"skip {job.out} (exists; --overwrite to redo)", info=info,
                                                all_processes=True))
    if a.save_profile:
        saved = [p.generator.stats.last_plan for p in pipes.values() if p.generator.stats.last_plan is not None]
        if saved and info.is_main:
            saved[0].save(a.save_profile)
    if a.timing_json:
        Path(a.timing_json).write_text(json.dumps(records, indent=2))


def print_timing(out, t) -> None:
    rows = [("text", t.text_s), ("diffusion", t.diffusion_s), ("vae decode", t.vae_s), ("mp4 write", t.write_s),
            ("end to end", t.e2e_s), ("first chunk", t.first_chunk_s), ("compile (apart)", t.compile_s)]
    print(f"{out}: {t.frames} frames")
    for name, s in rows:
        fps = f"{t.frames / s:8.2f} FPS" if name in ("diffusion", "end to end") and s else ""
        print(f"  {name:16s} {s:8.3f} s {fps}")


def cmd_calibrate(a) -> None:
    import numpy as np

    from dfjax.dummy import aggregate_profiles
    from dfjax.t2v import VideoModel, check_model_folder
    from dfjax.pipeline import Generator

    a.dummy_forcing, a.profile = True, None
    folder = model_folder(a)
    meta = check_model_folder(folder)
    run, _ = run_config(a, meta)
    items = read_prompts(a.prompts, a.seed)
    model = VideoModel.load(folder, a.dtype)
    gen = Generator(model.dit, run)
    scores = []
    for prompt, seed in items:
        scores.append(gen.calibration_scores(gen.text_kv(model.text([prompt])), seed))
    cfg = model.dit.cfg
    mean = aggregate_profiles(scores)
    plan = gen.dummy.plan_from_scores(mean)
    plan.save(a.out)
    print(f"wrote {a.out}: {plan.num_dummy} dummy heads of {cfg.num_layers * cfg.num_heads}, from "
          f"{len(items)} prompt(s); mean current-chunk mass {float(np.mean(mean[..., 2])):.3f}")


# ---------------------------------------------------------------- parser

def add_video_options(p) -> None:
    from dfjax.kernels import attention as kernels

    p.add_argument("--model", help="a converted model folder (default: the built-in demo model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", choices=sorted(RESOLUTIONS))
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, help="pixel frames, 4k+1 (81 = 21 latent frames)")
    p.add_argument("--seconds", type=float, help="video length instead of --frames")
    p.add_argument("--fps", type=float)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="compute dtype (default: the model's)")
    p.add_argument("--attn-impl", default="auto", choices=kernels.IMPLS,
                   help="attention kernel (default: the fastest for the device, dtype and mesh)")
    p.add_argument("--cache", default="global", choices=["global", "local"])
    p.add_argument("--sink-frames", type=int, default=0)
    p.add_argument("--window-frames", type=int, default=0)
    p.add_argument("--stream", action="store_true",
                   help="stream batch: pipeline the denoising steps of consecutive chunks, a KV cache per step (noisy "
                        "context, no refresh forward: a different sampler); with --mesh a group's devices are its "
                        "stages (docs/scaling.md)")
    df = p.add_argument_group("Dummy Forcing")
    df.add_argument("--dummy-forcing", action="store_true")
    df.add_argument("--num-dummy", type=int, help="dummy heads over all layers (default: half)")
    df.add_argument("--profile", help="a calibration profile (JSON) from `dfjax calibrate`; skips online scoring")
    df.add_argument("--ar-start", type=int, default=1)
    df.add_argument("--local-context-length", type=int, default=1)
    df.add_argument("--paper-dummy", action="store_true", help="dummy heads see only the current chunk")
    df.add_argument("--query-rows", default="release", choices=["release", "paper", "exact"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfjax", description="Dummy Forcing video generation in JAX.")
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

    g = sub.add_parser("generate", help="text -> mp4")
    g.add_argument("--prompt")
    g.add_argument("--prompts", help="a text file (one prompt per line) or JSONL with per-prompt seeds")
    g.add_argument("--negative-prompt")
    g.add_argument("--out", help="an .mp4 (one prompt) or a folder (--prompts); default out.mp4 / out/")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--timing-json", help="write the timing table as JSON here")
    g.add_argument("--save-profile", help="save the Dummy Forcing plan this run used (JSON)")
    g.add_argument("--quiet", action="store_true")
    s = g.add_argument_group("scale out (docs/scaling.md)")
    s.add_argument("--mesh", help="mesh config: a JSON/YAML file or a preset in configs/ (data x tensor)")
    s.add_argument("--distributed", default="auto", choices=["auto", "on", "off"],
                   help="jax.distributed start-up: auto-detect SLURM/MPI/TPU/`python -m dfjax.distributed launch`")
    s.add_argument("--coordinator", help="HOST:PORT of process 0 (with --num-processes and --process-id)")
    s.add_argument("--num-processes", type=int)
    s.add_argument("--process-id", type=int)
    s.add_argument("--per-host-output", action="store_true", help="write under OUT/process-NNNNN/")
    add_video_options(g)
    g.set_defaults(fn=cmd_generate)

    k = sub.add_parser("calibrate", help="a Dummy Forcing profile from a prompt set")
    k.add_argument("--prompts", required=True)
    k.add_argument("--out", required=True, help="profile JSON to write")
    add_video_options(k)
    k.set_defaults(fn=cmd_calibrate)

    for name, (_, text) in TOOLS.items():  # listed in the help; main() hands their arguments over
        sub.add_parser(name, help=text)
    return p


# Commands with their own argument parser: `dfjax NAME ARGS...` is `python -m MODULE ARGS...`.
TOOLS = {"bench": ("dfjax.bench", "the speed benchmark (see README)"),
         "train-demo": ("dfjax.train_demo", "train the built-in demo model from scratch"),
         "fidelity": ("dfjax.fidelity", "what Dummy Forcing changes in the videos (demo model)")}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return __import__(TOOLS[argv[0]][0], fromlist=["main"]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        t0 = time.perf_counter()
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # our errors carry the problem and the fix
        print(f"dfjax: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "quiet", False):
        print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
