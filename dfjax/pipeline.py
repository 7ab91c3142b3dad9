"""The autoregressive generation loop (Self Forcing inference), with or without Dummy Forcing.

Per chunk of latent frames: the few-step flow-matching schedule, each forward attending to the KV
cache plus the chunk itself, then one cache-refresh forward at the context-noise timestep whose
K/V stay in the cache. One jitted step does all of a chunk's forwards in a fori_loop; the chunk
index is a traced argument and the cache is donated, so a step compiles once per (config,
resolution, frame count, layout) and is reused for every chunk, with no host sync inside.

Dummy Forcing: chunks 0..ar_start run on the warm-up layout (every head sees frame 0, the last L
chunks and the chunk); after ar_start's refresh the frame attention scores of that forward fix
the plan on the host (or a loaded profile gives it), heads are permuted once, the caches are
rebuilt per head type (dfjax.hma) and the remaining chunks run on the plan's layout.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfjax import hma
from dfjax.cache import AttentionLayout
from dfjax.config import CacheConfig, DummyForcingConfig, SamplingConfig, VideoShape, dtype_of
from dfjax.dummy import HeadPlan, QueryRowSampling
from dfjax.model.rope import rope_tables
from dfjax.model.transformer import WanDiT
from dfjax.sampling import chunk_noise, schedule_arrays
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
            ok = [VideoShape.frames_for_latents(n * cf) for n in range(1, 8)]
            raise ValueError(
                f"{self.video.frames} frames give {self.video.latent_frames} latent frames, not a multiple of the "
                f"chunk size {cf}; choose a frame count such as {ok}."
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


def _chunk_step(graphdef, params, text_kv, cache, key, chunk, score_rows=None, *, layout, shape, schedule, rope,
                impl, score=None):
    """All forwards of one chunk: returns (x0 of the last denoising step, cache after the refresh, scores).

    score: None, or Dummy Forcing's (key order, scored chunk): the cache-refresh forward of that chunk
    also returns the frame attention scores [layers, heads, 3] of the query rows score_rows (zeros
    at every other chunk). scores is None without it.
    """
    model = nnx.merge(graphdef, params)
    timesteps, sigmas, next_sigmas = schedule
    n = sigmas.shape[0]
    sig = jnp.append(sigmas, 0.0)  # at the refresh forward x0 = x - 0*flow keeps x0
    nxt = jnp.append(next_sigmas, 0.0)
    cf = shape[1]
    frame_start = chunk * cf
    x = chunk_noise(key, chunk, 0, shape)
    cfg = model.cfg
    scores = None if score is None else jnp.zeros((cfg.num_layers, cfg.num_heads, 3), jnp.float32)

    def body(i, carry):
        x, x0, cache, scores = carry
        t = jnp.full((shape[0], cf), timesteps[i], jnp.float32)
        score_kw = {}
        if score is not None:
            score_kw = dict(score_order=np.asarray(score[0]), score_rows=score_rows,
                            score_now=(i == n) & (chunk == score[1]))
        flow, cache, s = model(x, t, text_kv, cache, layout, rope, frame_start, is_refresh=i == n, impl=impl,
                               **score_kw)
        if score is not None:
            scores = jnp.where(score_kw["score_now"], s, scores)
        x0 = jnp.where(i < n, x - sig[i] * flow, x0)
        noise = chunk_noise(key, chunk, i + 1, shape)
        x = (1 - nxt[i]) * x0 + nxt[i] * noise  # fresh noise at every step (Self Forcing)
        return x, x0, cache, scores

    _, x0, cache, scores = jax.lax.fori_loop(0, n + 1, body, (x, x, cache, scores))
    return x0, cache, scores


@dataclass
class ChunkResult:
    index: int
    latents: jax.Array  # [B, chunk_frames, h, w, C]


@dataclass
class Generator:
    """Compiles and runs the AR loop of one model for one RunConfig (and batch size)."""

    model: WanDiT
    run: RunConfig
    batch: int = 1
    plan: HeadPlan | None = None  # a calibration profile; None with Dummy Forcing: score online
    trace_counts: dict = field(default_factory=dict)  # step name -> times traced (tests check reuse)
    last_plan: HeadPlan | None = None  # the plan the last Dummy Forcing video used
    scores: np.ndarray | None = None  # the last online frame attention scores [layers, heads, 3]
    # A (data, tensor) jax Mesh (dfjax.sharding.MeshConfig): params, caches and steps are sharded over
    # it, and Dummy Forcing plans rounded to split over `tensor` (sharding.shardable_plan). None: one device.
    mesh: jax.sharding.Mesh | None = None
    rules: Rules | None = None  # logical -> mesh axis rules (default: dfjax.sharding.DEFAULT_RULES)
    # Online Dummy Forcing compiles a chunk step for each new plan layout; the least recently used beyond this
    # many are dropped (with their transitions), so a long run over many prompts keeps bounded host memory.
    max_plan_steps: int = 8

    def __post_init__(self):
        cfg = self.model.cfg
        self.graphdef, self.params = nnx.split(self.model)
        self.placement = Placement(self.mesh, cfg, self.batch, self.rules)
        self.params = self.placement.put_params(self.params)
        self.attn_impl = self.placement.attn_impl(self.run.attn_impl, cfg.dtype)
        self.rope = rope_tables(cfg.head_dim, cfg.rope_max_pos, cfg.rope_theta)
        self.schedule = schedule_arrays(self.run.sampling)
        h, w = self.run.video.latent_hw
        self.shape = (self.batch, self.run.sampling.chunk_frames, h, w, cfg.in_channels)
        self.cache_dtype = dtype_of(cfg.dtype)
        if self.run.dummy is not None:
            d = self.run.dummy
            d.dummy_count(cfg.num_layers, cfg.num_heads)  # range check before any work
            if self.plan is None and d.ar_start < 1:
                raise ValueError("Dummy Forcing scores the heads on chunk ar_start's attention to earlier chunks; "
                                 "ar_start=0 has none. Use ar_start >= 1, or pass a calibrated plan (--profile).")
            if self.plan is not None:
                self.plan.validate(cfg.num_layers, cfg.num_heads)
                self.plan = self.placement.adjust_plan(self.plan)
        self._text_kv = self.placement.jit(lambda params, ctx: nnx.merge(self.graphdef, params).text_kv(ctx),
                                           out_shardings=self.placement.text_kv_shardings)
        # one compiled program for every plan: the permutation is a traced argument
        self._permute = self.placement.jit(functools.partial(hma.permuted_params, self.graphdef),
                                           out_shardings=lambda: self.placement.param_shardings(self.params))
        self._steps = {}
        self._compiled = {}  # (layout, scored) -> compiled step, in order of last use
        self._transitions = {}
        self._step_names = itertools.count()
        self.compile_s = 0.0  # seconds spent compiling steps (ahead of time, outside the timed runs)
        self._stream = None
        if self.run.stream:  # a group's devices are the pipeline's stages; its ticks run in shard_map (local
            # shapes on every device), so they keep the requested kernel, Pallas included
            self._stream = StreamRunner(self.graphdef, self.mesh, len(self.run.sampling.denoising_steps), self.shape,
                                        self.schedule, self.rope, self.run.attn_impl, self.run.num_chunks)

    # -- compiled pieces ----------------------------------------------------------------------------
    def _step(self, layout: AttentionLayout, scored: bool = False):
        if (layout, scored) not in self._steps:
            name = f"step{next(self._step_names)}"

            def step(*args, **kw):
                self.trace_counts[name] = self.trace_counts.get(name, 0) + 1
                return _chunk_step(self.graphdef, *args, **kw)

            shardings = lambda: self.placement.step_shardings(self.params, layout, self.shape)
            # Dummy Forcing's scored refresh: the key order of chunk ar_start, fixed by the layout
            score = (tuple(hma.score_key_order(layout, self.run.dummy.ar_start).tolist()),
                     self.run.dummy.ar_start) if scored else None
            self._steps[layout, scored] = self.placement.jit(
                functools.partial(step, layout=layout, shape=self.shape, schedule=self.schedule, rope=self.rope,
                                  impl=self.attn_impl, score=score),
                in_shardings=lambda: shardings()[0], out_shardings=lambda: shardings()[1],
                donate_argnums=(2,),  # the cache (by position: `step` takes *args, so a name would not bind)
            )
        return self._steps[layout, scored]

    def _run_step(self, layout: AttentionLayout, *args, scored: bool = False):
        """Runs a chunk step; the first use of a layout compiles it ahead of time (timed into compile_s)."""
        key = (layout, scored)
        if key in self._compiled:
            self._compiled[key] = self._compiled.pop(key)  # most recently used last
        else:
            t0 = time.perf_counter()
            self._compiled[key] = self._step(layout, scored).lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
            plan_keys = [k for k in self._compiled if k[0] != self.first_layout()]
            for old in plan_keys[:max(0, len(plan_keys) - self.max_plan_steps)]:
                del self._compiled[old]
                self._steps.pop(old, None)
                self._transitions.pop(old[0], None)
        return self._compiled[key](*args)

    @functools.cached_property
    def _score_rows(self):
        """The sampled query rows per layer [layers, R] of the scored refresh (seeded: the same for every
        video, so drawn once), or None for every row."""
        cfg, d = self.model.cfg, self.run.dummy
        layout = self.first_layout()
        sampling = QueryRowSampling(d.query_rows, d.query_fraction)
        lq = layout.tokens_per_frame * layout.chunk_frames
        per_layer = [sampling.rows(lq, layout.tokens_per_frame, (d.seed, i)) for i in range(cfg.num_layers)]
        return None if per_layer[0] is None else jnp.asarray(np.stack(per_layer))

    def text_kv(self, context):
        """Cross-attention K/V of a text context [B, Lt, text_dim]; compute once per prompt batch."""
        if context.shape[0] != self.batch:
            raise ValueError(f"a text context of {context.shape[0]} prompt(s) for a Generator of batch {self.batch}; "
                             f"make the Generator with batch={context.shape[0]}.")
        return self._text_kv(self.params, self.placement.put_context(context))

    def first_layout(self) -> AttentionLayout:
        """The layout of chunk 0: the base layout, or Dummy Forcing's warm-up layout."""
        cfg, tpf, cf = self.model.cfg, tokens_per_frame(self.model.cfg, self.run.video), self.run.sampling.chunk_frames
        if self.run.dummy is None:
            return base_layout(cfg, self.run)
        return hma.warmup_layout(cfg.num_layers, cfg.num_heads, self.run.dummy.local_context_length, tpf, cf)

    # -- the loop -----------------------------------------------------------------------------------
    @property
    def prefill_chunks(self) -> int:
        """Chunks made by the sequential loop: all of them, or in stream mode those before the stream (chunk 0;
        with Dummy Forcing chunks 0..ar_start, after which the plan and its cache layout are fixed)."""
        if not self.run.stream:
            return self.run.num_chunks
        return min(self.run.num_chunks, 1 if self.run.dummy is None else self.run.dummy.ar_start + 1)

    def _add_compile(self, seconds: float) -> None:
        self.compile_s += seconds

    def chunks(self, text_kv, seed: int) -> Iterator[ChunkResult]:
        """Yields each chunk's clean latents as soon as it is dispatched (device arrays, not synced)."""
        key = jax.random.PRNGKey(seed)
        layout = self.first_layout()
        params = self.params
        cache = self.placement.init_cache(layout, self.cache_dtype)
        d = self.run.dummy
        plan = self.plan
        scoring = d is not None and plan is None and d.ar_start + 1 < self.run.num_chunks
        rows = self._score_rows if scoring else None
        for c in range(self.run.num_chunks):
            if c == self.prefill_chunks:  # stream mode: the remaining chunks come out of the pipeline
                for i, x0 in self._stream.chunks(params, text_kv, cache, key, layout, c, self._add_compile):
                    yield ChunkResult(i, x0)
                return
            x0, cache, scores = self._run_step(layout, params, text_kv, cache, key, jnp.int32(c), rows,
                                               scored=scoring)
            yield ChunkResult(c, x0)
            if d is not None and c == d.ar_start and c + 1 < self.run.num_chunks:
                if plan is None:  # the one host sync of a video: DHP on this chunk's scores
                    plan = self.plan_from_scores(np.asarray(scores))
                self.last_plan = plan
                layout_b = hma.plan_layout(plan, layout.tokens_per_frame, layout.chunk_frames)
                if layout_b not in self._transitions:  # jitted once per plan layout, not per video
                    self._transitions[layout_b] = self.placement.jit(
                        hma.transition_cache, static_argnums=(1, 2, 3, 4),
                        out_shardings=lambda: self.placement.cache_shardings(layout_b))
                cache = self._transitions[layout_b](cache, layout, layout_b, plan, c)
                params = self._permute(self.params, jnp.asarray(plan.permutation, jnp.int32))
                layout, scoring, rows = layout_b, False, None

    def plan_from_scores(self, scores: np.ndarray) -> HeadPlan:
        """DHP on the host from one video's frame attention scores [layers, heads, 3]."""
        cfg, d = self.model.cfg, self.run.dummy
        self.scores = scores
        plan = HeadPlan.from_scores(scores, d.dummy_count(cfg.num_layers, cfg.num_heads), normalize=d.normalize,
                                    local_context_length=d.local_context_length, packed_dummy=d.packed_dummy)
        return self.placement.adjust_plan(plan)

    def calibration_scores(self, text_kv, seed: int) -> np.ndarray:
        """Frame attention scores of one prompt: the warm-up chunks up to ar_start, with its refresh scored."""
        d = self.run.dummy
        if d is None or d.ar_start >= self.run.num_chunks - 1:
            raise ValueError("calibration needs Dummy Forcing and a video longer than ar_start + 1 chunks.")
        layout = self.first_layout()
        cache = self.placement.init_cache(layout, self.cache_dtype)
        key = jax.random.PRNGKey(seed)
        for c in range(d.ar_start + 1):
            _, cache, scores = self._run_step(layout, self.params, text_kv, cache, key, jnp.int32(c), self._score_rows,
                                              scored=True)
        return np.asarray(scores)

    def generate(self, context, seed: int = 0) -> jax.Array:
        """All latents [B, F, h, w, C] of one video batch."""
        kv = self.text_kv(context)
        return jnp.concatenate([r.latents for r in self.chunks(kv, seed)], axis=1)
