"""The autoregressive generation loop (Self Forcing inference), with or without Dummy Forcing.

Per chunk of latent frames: the few-step flow-matching schedule, each forward attending to the KV
cache plus the chunk itself, then one cache-refresh forward at the context-noise timestep whose
K/V stay in the cache. One jitted step runs a chunk's denoising forwards in a fori_loop, and the same
program (a traced flag) its refresh: the chunk is yielded between the two, so its decode is queued
ahead of the refresh, and the last chunk's refresh, which nothing would read, is not run. The chunk
index and the schedule are traced arguments and the cache is donated, so a step compiles once per
(config, resolution, layout, probe, schedule length) and is reused for every chunk, with no host
sync inside.

Dummy Forcing (dfjax.dummy.forcing says what, this loop says when): after chunk ar_start's refresh the
plan is fixed (from that forward's scores, or a calibrated profile), the heads are permuted once, the
caches rebuilt per cache group, and the remaining chunks run on the plan's layout.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfjax.cache import AttentionLayout
from dfjax.config import CacheConfig, DummyForcingConfig, SamplingConfig, VideoShape, dtype_of
from dfjax.dummy import HeadPlan, hma
from dfjax.dummy.forcing import DummyForcing
from dfjax.model.rope import rope_tables
from dfjax.model.transformer import ChunkCall, ChunkStep, WanDiT
from dfjax.sampling import chunk_noise, renoise, schedule_arrays, x0_from_flow
from dfjax.sharding import Placement, Rules
from dfjax.stream import StreamRunner


@dataclass(frozen=True)
class RunConfig:
    video: VideoShape = VideoShape()
    sampling: SamplingConfig = SamplingConfig()
    cache: CacheConfig = CacheConfig()
    dummy: DummyForcingConfig | None = None  # None: no Dummy Forcing
    attn_impl: str = "auto"
    # Stream batch (dfjax.stream): after a sequential prefill, the denoising steps of consecutive chunks run
    # as a pipeline, each step with a cache of its own and no refresh forward. A different sampler.
    stream: bool = False

    def __post_init__(self):
        cf = self.sampling.chunk_frames
        if self.video.latent_frames % cf:
            below = self.video.latent_frames // cf * cf
            ok = [VideoShape.frames_for_latents(n) for n in (below, below + cf) if n > 0]
            raise ValueError(
                f"{self.video.frames} frames give {self.video.latent_frames} latent frames, not a multiple of the "
                f"chunk size {cf}; choose {' or '.join(map(str, ok))} frames (or --seconds, which rounds)."
            )
        if self.cache.kind == "local" and (self.cache.window_frames % cf):
            raise ValueError(f"the local window ({self.cache.window_frames} frames) must be a multiple of the "
                             f"chunk size {cf}.")

    @property
    def num_chunks(self) -> int:
        return self.video.latent_frames // self.sampling.chunk_frames


def tokens_per_frame(model_cfg, video: VideoShape) -> int:
    h, w = video.latent_hw
    return (h // model_cfg.patch[1]) * (w // model_cfg.patch[2])


def base_layout(model_cfg, run: RunConfig) -> AttentionLayout:
    """The cache layout without Dummy Forcing: global (all earlier frames) or local window + sink."""
    tpf, cf = tokens_per_frame(model_cfg, run.video), run.sampling.chunk_frames
    if run.cache.kind == "global":
        sink, window = 0, run.video.latent_frames
    else:
        sink, window = run.cache.sink_frames, run.cache.window_frames
    return AttentionLayout.uniform(model_cfg.num_layers, model_cfg.num_heads, sink, window, tpf, cf)


def _chunk_step(graphdef, params, text_kv, cache, key, chunk, schedule, probe_input, clean, refresh, *, shape, rope,
                call: ChunkCall):
    """One chunk's n denoising forwards (refresh False): returns (x0 of the last step, the cache, probe output);
    or (refresh True) its refresh forward alone, on the given clean latents, which writes their K/V into the cache:
    returns (clean, the cache after it, probe output). The same compiled program serves both (refresh is traced):
    two calls per chunk, so that a chunk's latents can be decoded before its refresh runs (they are final after the
    denoising steps), and a re-cache after a prompt switch replays refreshes alone.

    schedule: (timesteps of the n + 1 forwards, sigmas of the n steps, the sigmas after them), traced. With a
    probe in `call`, its outputs summed over the forwards run (it gives zeros where it does not measure); None
    without one.
    """
    model = nnx.merge(graphdef, params)
    timesteps, sigmas, next_sigmas = schedule
    n = sigmas.shape[0]
    sig = jnp.append(sigmas, 0.0)  # at the refresh forward x0 = x - 0*flow keeps x0
    nxt = jnp.append(next_sigmas, 0.0)
    cf = shape[1]
    x = jnp.where(refresh, clean, chunk_noise(key, chunk, 0, shape))
    cfg = model.cfg
    probed = None if call.probe is None else call.probe.zeros(cfg.num_layers, cfg.num_heads)

    def body(i, carry):
        x, x0, cache, probed = carry
        t = jnp.full((shape[0], cf), timesteps[i], jnp.float32)
        step = ChunkStep(chunk * cf, i == n, probe_input)
        flow, cache, p = model(x, t, text_kv, cache, rope, step, call)
        if call.probe is not None:
            probed = probed + p
        x0 = jnp.where(i < n, x0_from_flow(x, flow, sig[i]), x0)
        x = renoise(x0, chunk_noise(key, chunk, i + 1, shape), nxt[i])  # fresh noise at every step (Self Forcing)
        return x, x0, cache, probed

    start, stop = jnp.where(refresh, n, 0), jnp.where(refresh, n + 1, n)
    _, x0, cache, probed = jax.lax.fori_loop(start, stop, body, (x, clean, cache, probed))
    return x0, cache, probed


def free_bytes(devices) -> int | None:
    """Memory free on the first of `devices` (host memory for the CPU), or None where the backend does not say."""
    import os

    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if devices[0].platform == "cpu" and hasattr(os, "sysconf"):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def check_length(cfg, run: RunConfig, layout: AttentionLayout, batch: int, placement) -> None:
    """Refuses, before any work, a video longer than RoPE's positions or whose KV cache cannot fit in memory."""
    frames = run.video.latent_frames
    if frames > cfg.rope_max_pos:
        longest = VideoShape.frames_for_latents(cfg.rope_max_pos)
        raise ValueError(f"{run.video.frames} frames are {frames} latent frames, past the {cfg.rope_max_pos} positions "
                         f"of the model's RoPE tables (at most {longest} frames, {longest / 16 / 60:.1f} min at 16 "
                         "fps); make a shorter video.")
    copies = len(run.sampling.denoising_steps) if run.stream else 1  # stream batch: a cache per denoising step
    shards = placement.tensor * (1 if placement.mesh is None else placement.mesh.shape["data"])
    need = layout.cache_bytes(batch, cfg.head_dim, jnp.dtype(dtype_of(cfg.dtype)).itemsize) * copies // shards
    devices = jax.devices() if placement.mesh is None else list(placement.mesh.devices.flat)
    free = free_bytes(devices)
    if free is not None and need > 0.9 * free:
        fix = ("use --cache local (LongLive's window: --cache local --sink-frames 3 --window-frames 9) or "
               "--dummy-forcing, whose caches do not grow with the video" if run.cache.kind == "global" and
               run.dummy is None else "make the video shorter or smaller")
        raise ValueError(f"the KV cache of this run needs {need / 2**30:.1f} GiB per device and "
                         f"{free / 2**30:.1f} GiB are free; {fix}.")


@dataclass
class _VideoState:
    """What one video's loop carries from chunk to chunk."""

    layout: AttentionLayout
    params: object
    cache: object
    plan: HeadPlan | None = None  # Dummy Forcing's, once it applies


@dataclass
class ChunkResult:
    index: int
    latents: jax.Array  # [B, chunk_frames, h, w, C]


@dataclass
class GeneratorStats:
    """What a Generator's runs produced (what it runs with is its constructor's arguments)."""

    trace_counts: dict = field(default_factory=dict)  # step name -> times traced (tests check reuse)
    compile_s: float = 0.0  # seconds spent compiling (ahead of time, outside the timed runs)
    last_plan: HeadPlan | None = None  # the plan the last Dummy Forcing video used
    scores: np.ndarray | None = None  # the last online frame attention scores [layers, heads, 3]


class CompiledStep:
    """A jitted function, compiled ahead of time at its first call with the compile timed into the stats."""

    def __init__(self, fn, stats: GeneratorStats):
        self.fn, self.stats, self.compiled = fn, stats, None

    def __call__(self, *args):
        if self.compiled is None:
            t0 = time.perf_counter()
            self.compiled = self.fn.lower(*args).compile()
            self.stats.compile_s += time.perf_counter() - t0
        return self.compiled(*args)


class Generator:
    """Compiles and runs the AR loop of one model for one RunConfig (and batch size).

    plan: a calibration profile; None with Dummy Forcing: score online.
    mesh: a (data, tensor) jax Mesh (dfjax.sharding.MeshConfig): params, caches and steps are sharded over it,
      and Dummy Forcing plans rounded to split over `tensor`. None: one device.
    rules: logical -> mesh axis rules (default: dfjax.sharding.DEFAULT_RULES).
    max_plan_steps: online Dummy Forcing compiles a chunk step for each new plan layout; the least recently used
      beyond this many are dropped (with their cache transitions), so a long run over many prompts keeps bounded
      host memory.
    """

    def __init__(self, model: WanDiT, run: RunConfig, batch: int = 1, plan: HeadPlan | None = None,
                 mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None, max_plan_steps: int = 8):
        self.model, self.run, self.batch, self.mesh = model, run, batch, mesh
        self.stats = GeneratorStats()
        cfg = model.cfg
        self.graphdef, self.params = nnx.split(model)
        self.placement = Placement(mesh, cfg, batch, rules)
        self.params = self.placement.put_params(self.params)
        self.attn_impl = self.placement.attn_impl(run.attn_impl, cfg.dtype)
        self.rope = rope_tables(cfg.head_dim, cfg.rope_max_pos, cfg.rope_theta)
        self.schedule = schedule_arrays(run.sampling)
        first = run.sampling.first_chunk_denoising_steps
        self.first_schedule = self.schedule if first is None else schedule_arrays(
            dataclasses.replace(run.sampling, denoising_steps=first))
        h, w = run.video.latent_hw
        self.shape = (batch, run.sampling.chunk_frames, h, w, cfg.in_channels)
        self.cache_dtype = dtype_of(cfg.dtype)
        tpf = tokens_per_frame(cfg, run.video)
        self.dummy = None if run.dummy is None else DummyForcing(
            run.dummy, cfg.num_layers, cfg.num_heads, tpf, run.sampling.chunk_frames, run.num_chunks, plan,
            self.placement.tensor)
        self.first_layout = base_layout(cfg, run) if self.dummy is None else self.dummy.first_layout
        check_length(cfg, run, self.first_layout, batch, self.placement)
        self._text_kv = self.placement.jit(lambda params, ctx: nnx.merge(self.graphdef, params).text_kv(ctx),
                                           out_shardings=self.placement.text_kv_shardings)
        # one compiled program for every plan: the permutation is a traced argument
        self._permute = self.placement.jit(functools.partial(hma.permuted_attention, self.graphdef),
                                           out_shardings=lambda: self.placement.param_shardings(
                                               nnx.filter_state(self.params, hma.ATTENTION)))
        self._step_names = itertools.count()
        self._first_steps = functools.cache(self._make_step)  # the first layout's steps, kept for ever
        self._plan_steps = functools.lru_cache(maxsize=max_plan_steps)(self._make_step)
        self._transitions = functools.lru_cache(maxsize=max_plan_steps)(self._make_transition)
        self._stream = None
        if run.stream:  # a group's devices are the pipeline's stages; its ticks run in shard_map (local
            # shapes on every device), so they keep the requested kernel, Pallas included
            self._stream = StreamRunner(self.graphdef, mesh, len(run.sampling.denoising_steps), self.shape,
                                        self.schedule, self.rope, run.attn_impl, cfg.dtype, run.num_chunks)

    # -- compiled pieces ----------------------------------------------------------------------------
    def _make_step(self, layout: AttentionLayout, probe, num_steps: int) -> CompiledStep:
        name = f"step{next(self._step_names)}"

        def step(*args):
            self.stats.trace_counts[name] = self.stats.trace_counts.get(name, 0) + 1
            return _chunk_step(self.graphdef, *args, shape=self.shape, rope=self.rope,
                               call=ChunkCall(self.attn_impl, probe))

        shardings = lambda: self.placement.step_shardings(self.params, layout, self.shape)
        return CompiledStep(self.placement.jit(
            step, in_shardings=lambda: shardings()[0], out_shardings=lambda: shardings()[1],
            donate_argnums=(2,),  # the cache (by position: `step` takes *args, so a name would not bind)
        ), self.stats)

    def step(self, layout: AttentionLayout, probe=None, num_steps: int | None = None) -> CompiledStep:
        """The compiled chunk step of a layout (with a probe; for schedules of num_steps denoising steps)."""
        steps = self._first_steps if layout == self.first_layout else self._plan_steps
        return steps(layout, probe, num_steps or len(self.run.sampling.denoising_steps))

    def _make_transition(self, layout_b: AttentionLayout):
        return self.placement.jit(hma.transition_cache, static_argnums=(1, 2, 3),
                                  out_shardings=lambda: self.placement.cache_shardings(layout_b))

    def _run_step(self, layout, probe, params, text_kv, cache, key, chunk: int, clean=None):
        """A chunk's denoising forwards (clean=None), or the refresh forward of its clean latents."""
        schedule = self.first_schedule if chunk == 0 else self.schedule
        rows = None
        if probe is not None and self.dummy.query_rows is not None:
            rows = jnp.asarray(self.dummy.query_rows)
        step = self.step(layout, probe, schedule[1].shape[0])
        return step(params, text_kv, cache, key, jnp.int32(chunk), schedule, rows,
                    self._no_latents if clean is None else clean, jnp.bool_(clean is not None))

    @functools.cached_property
    def _no_latents(self):
        """The clean-latents input of an ordinary chunk step (unused there)."""
        zeros = jnp.zeros(self.shape, jnp.float32)
        return zeros if self.mesh is None else jax.device_put(zeros, self.placement.latent_sharding(self.shape))

    def use_plan(self, plan: HeadPlan) -> None:
        """A calibrated Dummy Forcing plan for the following videos (compiled steps are kept)."""
        if self.dummy is None:
            raise ValueError("use_plan needs a Dummy Forcing run (RunConfig.dummy).")
        self.dummy.use(plan)

    def text_kv(self, context):
        """Cross-attention K/V of a text context [B, Lt, text_dim]; compute once per prompt batch."""
        if context.shape[0] != self.batch:
            raise ValueError(f"a text context of {context.shape[0]} prompt(s) for a Generator of batch {self.batch}; "
                             f"make the Generator with batch={context.shape[0]}.")
        return self._text_kv(self.params, self.placement.put_context(context))

    # -- the loop -----------------------------------------------------------------------------------
    @property
    def prefill_chunks(self) -> int:
        """Chunks made by the sequential loop: all of them, or in stream mode those before the stream (chunk 0;
        with Dummy Forcing chunks 0..ar_start, after which the plan and its cache layout are fixed)."""
        if not self.run.stream:
            return self.run.num_chunks
        return min(self.run.num_chunks, 1 if self.dummy is None else self.run.dummy.ar_start + 1)

    def _add_compile(self, seconds: float) -> None:
        self.stats.compile_s += seconds

    def chunks(self, text_kv, seed: int, switch: Callable[[int], object] | None = None,
               recache: bool = True) -> Iterator[ChunkResult]:
        """Yields each chunk's clean latents as soon as it is dispatched (device arrays, not synced).

        switch: asked before every chunk after the first; it returns new cross-attention K/V (Generator.text_kv of
        another prompt) for the chunks from that one on, or None to keep the current ones. recache: at a switch
        the self-attention KV cache is recomputed under the new prompt (LongLive's KV re-cache): the refresh
        forward of every chunk made so far is replayed on its clean latents, in order, with the layouts and the
        plan the video used, so the cache is what the video would have left under the new prompt. It costs one
        forward per chunk made (of the five a chunk took) and compiles nothing new.
        """
        if switch is not None and self.run.stream:
            raise ValueError("the stream-batch sampler cannot change the prompt during a video; use the sequential "
                             "sampler.")
        key = jax.random.PRNGKey(seed)
        state = _VideoState(self.first_layout, self.params, self.placement.init_cache(self.first_layout,
                                                                                   self.cache_dtype))
        df = self.dummy
        probe = None if df is None else df.probe
        made = []  # the clean latents of every chunk, kept only while a switch may need them
        for c in range(self.run.num_chunks):
            if c == self.prefill_chunks:  # stream mode: the remaining chunks come out of the pipeline
                for i, x0 in self._stream.chunks(state.params, text_kv, state.cache, key, c, self._add_compile):
                    yield ChunkResult(i, x0)
                return
            new_kv = None if switch is None or c == 0 else switch(c)
            if new_kv is not None:
                text_kv = new_kv
                if recache:
                    state = self._recache(text_kv, key, made, probe)
            args = (state.layout, probe if state.plan is None else None, state.params, text_kv)
            x0, state.cache, _ = self._run_step(*args, state.cache, key, c)
            if switch is not None:
                made.append(x0)
            yield ChunkResult(c, x0)  # before the refresh: the caller can queue this chunk's decode ahead of it
            if c == self.run.num_chunks - 1:
                return  # the last chunk's refresh would write a cache that nothing reads
            _, state.cache, scores = self._run_step(*args, state.cache, key, c, clean=x0)
            if df is not None and c == df.switch_chunk:
                plan = df.plan
                if plan is None:  # the one host sync of a video: DHP on this chunk's scores
                    self.stats.scores = np.asarray(scores)
                    plan = df.plan_from_scores(self.stats.scores)
                self.stats.last_plan = plan
                self._apply_plan(state, plan, c)

    def _apply_plan(self, state: "_VideoState", plan: HeadPlan, chunk: int) -> None:
        """After chunk `chunk`'s refresh: the plan's layout, its per-group caches, the permuted heads."""
        state.plan, state.layout = plan, self.dummy.layout(plan)
        state.cache = self._transitions(state.layout)(state.cache, state.layout, plan, chunk)
        state.params = nnx.merge_state(self.params, self._permute(self.params, jnp.asarray(plan.permutation,
                                                                                           jnp.int32)))

    def _recache(self, text_kv, key, made: list, probe) -> "_VideoState":
        """The cache (and layout, params) after replaying the refresh forward of every made chunk under text_kv,
        exactly as the loop ran them: the first layout (with its probe, so the compiled step is the same one),
        then, with Dummy Forcing, the video's plan from its switch chunk on."""
        state = _VideoState(self.first_layout, self.params, self.placement.init_cache(self.first_layout,
                                                                                   self.cache_dtype))
        plan = self.stats.last_plan
        for j, clean in enumerate(made):
            _, state.cache, _ = self._run_step(state.layout, probe if state.plan is None else None, state.params,
                                               text_kv, state.cache, key, j, clean=clean)
            if self.dummy is not None and j == self.dummy.switch_chunk:
                self._apply_plan(state, plan, j)
        return state

    def calibration_scores(self, text_kv, seed: int) -> np.ndarray:
        """Frame attention scores of one prompt: the warm-up chunks up to ar_start, with its refresh scored."""
        df = self.dummy
        if df is None or df.probe is None:
            raise ValueError("calibration needs online Dummy Forcing (no --profile) and a video longer than "
                             "ar_start + 1 chunks.")
        layout = self.first_layout
        cache = self.placement.init_cache(layout, self.cache_dtype)
        key = jax.random.PRNGKey(seed)
        for c in range(df.switch_chunk + 1):
            x0, cache, _ = self._run_step(layout, df.probe, self.params, text_kv, cache, key, c)
            _, cache, scores = self._run_step(layout, df.probe, self.params, text_kv, cache, key, c, clean=x0)
        return np.asarray(scores)

    def generate(self, context, seed: int = 0) -> jax.Array:
        """All latents [B, F, h, w, C] of one video batch."""
        kv = self.text_kv(context)
        return jnp.concatenate([r.latents for r in self.chunks(kv, seed)], axis=1)
