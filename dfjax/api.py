"""The Python API: load a model once, then make videos as numpy arrays, stream decoded chunks, or write mp4s.

    import dfjax

    pipe = dfjax.load()                                  # the built-in demo model
    frames = pipe.generate("a red circle moves down", seed=0)    # uint8 [frames, height, width, 3]
    for chunk in pipe.stream("a blue triangle moves down", seed=1):  # decoded chunks as soon as each is made
        print(chunk.index, chunk.frames.shape)
    pipe.make_video("a green circle moves down", seed=2, out="circle.mp4")

    pipe = dfjax.load("models/sf-1.3b", resolution="480p", dummy_forcing=True)
    pipe = dfjax.load("models/sf-1.3b", fp8=True)        # the DiT blocks' linears in fp8 (docs/fp8.md)

Options a call leaves out come from the model folder (the size it was trained at, its family's sampling, cache
and Dummy Forcing settings, see docs/checkpoints.md), then dfjax's defaults. `dfjax generate` is this API.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dfjax.config import LONG_CONTEXT_BASELINES, RESOLUTIONS


class OptionError(ValueError):
    """An option a run cannot take; the message names it and the fix."""


@dataclass(frozen=True)
class Options:
    """What a run is made with. None takes the model folder's default, then dfjax's."""

    resolution: str | None = None  # "480p", "720p", "1080p" (instead of height and width)
    height: int | None = None
    width: int | None = None
    frames: int | None = None  # pixel frames, 4k+1
    seconds: float | None = None  # instead of frames
    fps: float | None = None
    cache: str | None = None  # "global" or "local"
    sink_frames: int | None = None  # local cache
    window_frames: int | None = None
    dummy_forcing: bool = False
    num_dummy: int | None = None  # default: half of all heads
    ar_start: int | None = None
    local_context_length: int | None = None
    paper_dummy: bool = False  # dummy heads see only the current chunk
    query_rows: str | None = None  # "release", "paper", "exact"
    long_context: str | int | None = None  # a baseline of LONG_CONTEXT_BASELINES, or its latent frames per chunk
    stream: bool = False  # the stream-batch sampler (dfjax.stream)
    attn_impl: str = "auto"
    dtype: str | None = None  # compute dtype
    fp8: bool | None = None  # the DiT blocks' linears in fp8 e4m3 (docs/fp8.md); None: the model folder's choice
    seed: int = 0  # seeds Dummy Forcing's query-row sample

    def __post_init__(self):
        for name in ("height", "width", "frames", "window_frames"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OptionError(f"{name} must be a positive number, got {v}.")
        for name in ("sink_frames", "num_dummy", "ar_start", "local_context_length"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise OptionError(f"{name} must be >= 0, got {v}.")
        for name in ("seconds", "fps"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise OptionError(f"{name} must be > 0, got {v}.")
        if self.resolution is not None and self.resolution not in RESOLUTIONS:
            raise OptionError(f"unknown resolution {self.resolution!r}; choose one of {sorted(RESOLUTIONS)}.")
        if self.resolution is not None and (self.height or self.width):
            raise OptionError("give a resolution or a height and width, not both.")
        if self.frames is not None and self.seconds is not None:
            raise OptionError("give frames or seconds, not both.")
        if self.cache not in (None, "global", "local"):
            raise OptionError(f"cache must be 'global' or 'local', got {self.cache!r}.")
        if self.query_rows not in (None, "release", "paper", "exact"):
            raise OptionError(f"query_rows must be 'release', 'paper' or 'exact', got {self.query_rows!r}.")
        if self.dtype not in (None, "bfloat16", "float32"):
            raise OptionError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}.")
        if self.fp8 is not None and not isinstance(self.fp8, bool):
            raise OptionError(f"fp8 must be True, False or None (the model folder's choice), got {self.fp8!r}.")
        if isinstance(self.long_context, str) and self.long_context not in LONG_CONTEXT_BASELINES:
            if not self.long_context.isdigit():
                raise OptionError(f"long_context {self.long_context!r}: give a baseline "
                                  f"({', '.join(LONG_CONTEXT_BASELINES)}) or its latent frames per chunk.")
        dummy_only = [n for n in ("num_dummy", "ar_start", "local_context_length", "query_rows", "long_context")
                      if getattr(self, n) is not None] + (["paper_dummy"] if self.paper_dummy else [])
        if dummy_only and not self.dummy_forcing:
            raise OptionError(f"{', '.join(dummy_only)} set without Dummy Forcing; turn it on (--dummy-forcing).")


def run_config(meta: dict, opts: Options):
    """(RunConfig, fps) from a model folder's config and the options."""
    from dfjax.config import CacheConfig, DummyForcingConfig, SamplingConfig, VideoShape, config_from_dict
    from dfjax.pipeline import RunConfig

    pick = lambda value, default: default if value is None else value
    defaults = meta.get("defaults", {})
    if opts.resolution:
        height, width = RESOLUTIONS[opts.resolution]
    else:
        height, width = pick(opts.height, defaults.get("height", 480)), pick(opts.width, defaults.get("width", 832))
    fps = pick(opts.fps, defaults.get("fps", 16))
    sampling = config_from_dict(SamplingConfig, meta.get("sampling", {}))
    if opts.seconds is not None:  # the nearest whole number of chunks (the VAE makes 4k + 1 frames of k + 1 latent)
        cf = sampling.chunk_frames
        chunks = max(1, round((opts.seconds * fps / 4) / cf))
        frames = VideoShape.frames_for_latents(chunks * cf)
    else:
        frames = pick(opts.frames, defaults.get("frames", 81))
    folder_cache = meta.get("cache", {})
    kind = pick(opts.cache, folder_cache.get("kind", "global"))
    same_kind = kind == folder_cache.get("kind", "global")
    cache = CacheConfig(kind, pick(opts.sink_frames, folder_cache.get("sink_frames", 0) if same_kind else 0),
                        pick(opts.window_frames, folder_cache.get("window_frames", 0) if same_kind else 0))
    dummy = None
    if opts.dummy_forcing:
        family = meta.get("dummy_forcing", {})
        dummy = DummyForcingConfig(
            num_dummy=opts.num_dummy, ar_start=pick(opts.ar_start, family.get("ar_start", 1)),
            local_context_length=pick(opts.local_context_length, family.get("local_context_length", 1)),
            packed_dummy=not opts.paper_dummy, query_rows=pick(opts.query_rows, "release"), seed=opts.seed,
            long_context=long_context_frames(opts.long_context))
    run = RunConfig(video=VideoShape(height, width, frames), sampling=sampling, cache=cache, dummy=dummy,
                    attn_impl=opts.attn_impl, stream=opts.stream)
    return run, fps


def long_context_frames(value) -> int | None:
    """A long-context baseline (a name of LONG_CONTEXT_BASELINES or a number) in latent frames per chunk."""
    if value is None:
        return None
    return LONG_CONTEXT_BASELINES[value] if value in LONG_CONTEXT_BASELINES else int(value)


def load(model: str | Path | None = None, *, profile=None, mesh=None, **options):
    """A VideoPipeline (dfjax.t2v) for a model folder (None or "demo": the built-in demo model), compiled on its
    first video. options: the fields of Options; profile: a calibration profile (a path or a HeadPlan), which
    turns Dummy Forcing on."""
    from dfjax.demo import demo_model_folder
    from dfjax.dummy import HeadPlan
    from dfjax.t2v import VideoModel, VideoPipeline, check_model_folder

    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(Options)})
    if unknown:
        raise OptionError(f"unknown option(s) {unknown}; see dfjax.api.Options.")
    opts = Options(**{**options, "dummy_forcing": options.get("dummy_forcing", False) or profile is not None})
    folder = demo_model_folder() if model in (None, "demo") else Path(model)
    meta = check_model_folder(folder)
    run, fps = run_config(meta, opts)
    plan = HeadPlan.load(profile) if isinstance(profile, (str, Path)) else profile
    if plan is not None:
        t = meta["transformer"]
        plan.validate(t["num_layers"], t["num_heads"])
    return VideoPipeline(VideoModel.load(folder, opts.dtype, opts.fp8), run, plan=plan, mesh=mesh, fps=fps)
