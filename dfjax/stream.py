"""Stream batch: the denoising steps of consecutive chunks pipelined (StreamDiffusionV2-style).

The sequential loop (dfjax.pipeline) runs a chunk's n denoising steps one after another and then a
refresh forward that writes the chunk's clean K/V into the cache. In stream mode, after a
sequential prefill (chunk 0; with Dummy Forcing chunks 0..ar_start, so that the plan is fixed and the
caches are already per head type), every denoising step s has a KV cache of its own: "slot" s.
At tick k, slot s denoises chunk `first + k - s` with step s. It attends to slot s's cache, which
holds the earlier chunks' K/V as they were when *they* passed step s (noisy inputs at timestep t_s,
not clean ones), writes its chunk's K/V there, and hands the re-noised x0 to slot s+1 for the next
tick. One finished chunk leaves the last slot per tick, and there is no refresh forward: n forwards a
chunk instead of n + 1.

Slot s at chunk c depends only on slot s-1's output for chunk c and on slot s's own cache, so the
slots of one tick are independent: S devices (a group's devices, the mesh's `tensor` axis) each run
n/S of them in one shard_map program. Per tick, the only traffic is one chunk's latents from each
device to the next (a ppermute); each device holds the whole DiT and only its own slots' caches, and
any attention kernel runs (Pallas PAF included: shard_map bodies see local shapes). A video of C
streamed chunks takes C + n - 1 ticks (the pipeline fills and drains); a slot with no chunk in a
tick skips its forward (lax.cond), so on one device the fill costs nothing.

This is a different sampler: context at noise level t_s instead of clean context. What it changes on
the demo model is measured in docs/scaling.md.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dfjax.kernels import attention as kernels
from dfjax.model.transformer import ChunkCall, ChunkStep
from dfjax.sampling import chunk_noise, renoise, x0_from_flow


def slot_forward(model, x, s, chunk, text_kv, cache, noise, *, schedule, rope, call):
    """Denoising step s of one chunk on slot s's cache: (the next step's input, the cache with the chunk's
    K/V written). noise(chunk, step) gives the draws. After the last step the next sigma is 0, so the
    output is x0 itself."""
    timesteps, sigmas, next_sigmas = schedule
    t = jnp.full(x.shape[:2], timesteps[s], jnp.float32)
    # is_refresh: newest-frame heads keep this slot's newest frame, as the slot's context is its own forwards'
    flow, cache, _ = model(x, t, text_kv, cache, rope, ChunkStep(chunk * x.shape[1], jnp.bool_(True)), call)
    return renoise(x0_from_flow(x, flow, sigmas[s]), noise(chunk, s + 1), next_sigmas[s]), cache


def slot_step(graphdef, params, text_kv, cache, x, noise, tick, s, *, first, num_chunks, schedule, rope, call):
    """Slot s's part of a tick: denoising step s of chunk `first + tick - s` if that chunk exists (the pipeline
    fills and drains: no forward otherwise). x: the slot's input (slot 0 draws its chunk's initial noise
    instead). Returns (the slot's output, its cache)."""
    model = nnx.merge(graphdef, params)
    chunk = first + tick - s
    x = jnp.where(s == 0, noise(chunk, 0), x)
    fwd = functools.partial(slot_forward, model, schedule=schedule, rope=rope, call=call)
    return jax.lax.cond((chunk >= first) & (chunk < num_chunks),
                        lambda x, c: fwd(x, s, chunk, text_kv, c, noise), lambda x, c: (x, c), x, cache)


class StreamRunner:
    """Runs the stream ticks of one Generator, on one device or over a group mesh's devices (its `tensor` axis,
    one stage each).

    Per device, slot j of its n/S slots is global slot stage * n/S + j. Every slot array (a slot's cache
    leaves, its input latents) has a leading stage axis [S, ...] split over the stages, so a device holds
    exactly its slots. A tick is n/S calls of one compiled slot step (slot j's arrays, donated: no cache is
    copied or stacked) and a shift: slot j's output is slot j+1's input, and the last local slot's goes to
    the next stage's first (a ppermute; from the last stage it wraps round to stage 0's slot 0, which starts
    from noise, so after a tick stage 0's first input is the chunk that finished).
    """

    def __init__(self, graphdef, mesh, num_steps: int, shape, schedule, rope, impl: str, dtype, num_chunks: int):
        self.graphdef, self.mesh, self.n = graphdef, mesh, num_steps
        self.stages = 1 if mesh is None else mesh.shape["tensor"]
        if num_steps % self.stages:
            ok = [d for d in range(1, num_steps + 1) if num_steps % d == 0]
            raise ValueError(f"stream mode splits the {num_steps} denoising steps over the group's {self.stages} "
                             f"devices; choose a group of {ok} devices.")
        if mesh is not None and shape[0] % mesh.shape["data"]:
            raise ValueError(f"batch {shape[0]} does not split over data={mesh.shape['data']}.")
        self.slots = num_steps // self.stages
        self.shape, self.schedule, self.rope, self.num_chunks = shape, schedule, rope, num_chunks
        # shard_map bodies see local shapes: any kernel runs there, so it is resolved as for one device
        platform = None if mesh is None else mesh.devices.flat[0].platform
        self.call = ChunkCall(kernels.resolve_impl(impl, dtype, platform=platform))
        self._steps = {}  # (cache tree structure, first chunk) -> compiled slot step
        self._shift = None
        self._stacks = {}  # tree structure -> jitted stacking onto every stage
        self._params_in = self._params = None  # the last parameters given, and their copy on every stage

    # -- placement --------------------------------------------------------------------------------
    def _spec(self, stage_axis: bool, ndim: int):
        """An array's PartitionSpec: the stage axis (if any) over `tensor`, then the batch over `data`."""
        return P(*(("tensor",) if stage_axis else ()), "data", *([None] * (ndim - 1 - stage_axis)))

    def _shardings(self, tree, stage_axis: bool):
        return jax.tree.map(lambda a: NamedSharding(self.mesh, self._spec(stage_axis, a.ndim)), tree)

    def _on_every_stage(self, tree):
        """A slot's arrays for every stage: `tree` with a leading stage axis [S, ...], placed. Jitted once per
        tree structure (a cache layout, the latents), not once per video."""
        key = (jax.tree.structure(tree), tuple(a.ndim for a in jax.tree.leaves(tree)))
        if key not in self._stacks:
            stack = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a[None], (self.stages,) + a.shape), t)
            out = None if self.mesh is None else self._shardings(jax.eval_shape(stack, tree), True)
            self._stacks[key] = jax.jit(stack, out_shardings=out)
        return self._stacks[key](tree)

    def _replicated_params(self, params):
        """The whole DiT on every stage; the Generator's own parameters (every baseline video) are copied once."""
        if self.mesh is None:
            return params
        if self._params_in is not params:
            self._params_in, self._params = params, jax.device_put(params, NamedSharding(self.mesh, P()))
        return self._params

    # -- programs ---------------------------------------------------------------------------------
    def _step_fn(self, first: int, cache):
        body = functools.partial(slot_step, self.graphdef, first=first, num_chunks=self.num_chunks,
                                 schedule=self.schedule, rope=self.rope, call=self.call)
        draw = lambda key: lambda chunk, step: chunk_noise(key, chunk, step, self.shape)
        unstage = lambda tree: jax.tree.map(lambda a: a[0], tree)  # local [1, ...] -> [...]
        stage = lambda tree: jax.tree.map(lambda a: a[None], tree)
        if self.mesh is None:
            def step(params, text_kv, cache, x, key, tick, j):
                out, cache = body(params, text_kv, unstage(cache), x[0], draw(key), tick, j)
                return out[None], stage(cache)

            return jax.jit(step, donate_argnums=(2, 3))
        rows = self.shape[0] // self.mesh.shape["data"]

        def local(params, text_kv, cache, x, key, tick, j):
            # the whole batch's draws (as on one device), then this device's rows of them
            start = jax.lax.axis_index("data") * rows
            noise = lambda chunk, step: jax.lax.dynamic_slice_in_dim(draw(key)(chunk, step), start, rows)
            s = jax.lax.axis_index("tensor") * self.slots + j
            out, cache = body(params, text_kv, unstage(cache), x[0], noise, tick, s)
            return out[None], stage(cache)

        spec = lambda tree, stage_axis: jax.tree.map(lambda a: self._spec(stage_axis, a.ndim), tree)
        x_spec = self._spec(True, len(self.shape) + 1)
        step = lambda params, text_kv, cache, x, key, tick, j: jax.shard_map(
            local, mesh=self.mesh,
            in_specs=(jax.tree.map(lambda _: P(), params), spec(text_kv, False), spec(cache, True), x_spec, P(), P(),
                      P()),
            out_specs=(x_spec, spec(cache, True)), check_vma=False,
        )(params, text_kv, cache, x, key, tick, j)
        # explicit: the next call takes these outputs as inputs and needs them in exactly these shardings
        return jax.jit(step, donate_argnums=(2, 3), out_shardings=(
            NamedSharding(self.mesh, x_spec), self._shardings(cache, True)))

    def _compiled_step(self, first, args, on_compile):
        key = (jax.tree.structure(args[2]), first)  # the cache's structure holds its layout
        if key not in self._steps:
            t0 = time.perf_counter()
            self._steps[key] = self._step_fn(first, args[2]).lower(*args).compile()
            on_compile(time.perf_counter() - t0)
        return self._steps[key]

    def _pass_on(self, last):
        """The last local slot's output to the next stage's first slot (stage S-1's to stage 0's)."""
        if self.stages == 1:
            return last
        if self._shift is None:
            spec = self._spec(True, last.ndim)
            perm = [(i, (i + 1) % self.stages) for i in range(self.stages)]
            self._shift = jax.jit(jax.shard_map(lambda a: jax.lax.ppermute(a, "tensor", perm), mesh=self.mesh,
                                                in_specs=spec, out_specs=spec, check_vma=False), donate_argnums=0)
        return self._shift(last)

    # -- the stream -------------------------------------------------------------------------------
    def chunks(self, params, text_kv, cache, key, first: int, on_compile):
        """Yields (chunk index, latents) for chunks first..num_chunks-1 in order. `cache`: the prefill's cache
        after chunk first-1; on_compile(seconds) is told of compile time."""
        params = self._replicated_params(params)
        if self.mesh is not None:
            text_kv = jax.device_put(text_kv, self._shardings(text_kv, False))  # all heads (a prefill split them)
        caches = [self._on_every_stage(cache) for _ in range(self.slots)]  # local slot j on every stage
        xs = [self._on_every_stage(jnp.zeros(self.shape, jnp.float32)) for _ in range(self.slots)]
        for k in range(self.num_chunks - first + self.n - 1):
            outs = []
            for j in range(self.slots):
                args = (params, text_kv, caches[j], xs[j], key, jnp.int32(k), jnp.int32(j))
                out, caches[j] = self._compiled_step(first, args, on_compile)(*args)
                outs.append(out)
            xs = [self._pass_on(outs[-1])] + outs[:-1]
            done = first + k - (self.n - 1)
            if done >= first:
                yield done, xs[0][0]
