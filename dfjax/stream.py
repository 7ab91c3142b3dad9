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

from dfjax.cache import AttentionLayout


def chunk_noise(key, chunk, step, shape):
    """The Gaussian noise of denoising step `step` of chunk `chunk` (step 0: the initial noise); the same
    draws as the sequential loop's (dfjax.pipeline._chunk_step)."""
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, chunk), step), shape, jnp.float32)


def slot_forward(model, x, s, chunk, text_kv, cache, noise, *, layout, schedule, rope, impl):
    """Denoising step s of one chunk on slot s's cache: (the next step's input, the cache with the chunk's
    K/V written). noise(chunk, step) gives the draws. After the last step the next sigma is 0, so the
    output is x0 itself."""
    timesteps, sigmas, next_sigmas = schedule
    t = jnp.full(x.shape[:2], timesteps[s], jnp.float32)
    # is_refresh: packed dummy heads keep this slot's newest frame, as the slot's context is its own forwards'
    flow, cache, _ = model(x, t, text_kv, cache, layout, rope, chunk * x.shape[1], is_refresh=True, impl=impl)
    x0 = x - sigmas[s] * flow
    return (1 - next_sigmas[s]) * x0 + next_sigmas[s] * noise(chunk, s + 1), cache


def stage_tick(graphdef, params, text_kv, caches, xs, noise, tick, stage, *, slots, first, num_chunks, layout,
               schedule, rope, impl):
    """One tick of one device's `slots` consecutive slots (global slots stage*slots ...).

    caches: every leaf with a leading local-slot axis; xs [slots, B, ...]: each slot's input; noise(chunk,
    step): this device's draws. Returns the slots' outputs [slots, B, ...] and the caches.
    """
    model = nnx.merge(graphdef, params)
    fwd = functools.partial(slot_forward, model, layout=layout, schedule=schedule, rope=rope, impl=impl)
    outs = []
    for j in range(slots):
        s = stage * slots + j
        chunk = first + tick - s
        x_in = jnp.where(s == 0, noise(chunk, 0), xs[j])  # slot 0 starts a new chunk
        cache = jax.tree.map(lambda a: a[j], caches)
        x_out, cache = jax.lax.cond((chunk >= first) & (chunk < num_chunks),
                                    lambda x, c: fwd(x, s, chunk, text_kv, c, noise),
                                    lambda x, c: (x, c), x_in, cache)
        caches = jax.tree.map(lambda a, c: a.at[j].set(c), caches, cache)
        outs.append(x_out)
    return jnp.stack(outs), caches


def shift_slots(outs, stages: int, axis_name=None):
    """Slot s's output becomes slot s+1's input; the last slot's (the finished chunk) wraps round to slot 0
    (which ignores it: it starts from noise), so after a tick xs[0] is the chunk that finished."""
    last = outs[-1:]
    if stages > 1:
        last = jax.lax.ppermute(last, axis_name, [(i, (i + 1) % stages) for i in range(stages)])
    return jnp.concatenate([last, outs[:-1]])


class StreamRunner:
    """Compiles and runs the stream ticks of one Generator (one per layout), on one device or a group mesh."""

    def __init__(self, graphdef, mesh, num_steps: int, shape, schedule, rope, impl, num_chunks: int):
        self.graphdef, self.mesh, self.n = graphdef, mesh, num_steps
        self.stages = 1 if mesh is None else mesh.shape["tensor"]
        if num_steps % self.stages:
            ok = [d for d in range(1, num_steps + 1) if num_steps % d == 0]
            raise ValueError(f"stream mode splits the {num_steps} denoising steps over the group's {self.stages} "
                             f"devices; choose a group of {ok} devices.")
        if mesh is not None and shape[0] % mesh.shape["data"]:
            raise ValueError(f"batch {shape[0]} does not split over data={mesh.shape['data']}.")
        self.shape, self.schedule, self.rope, self.impl, self.num_chunks = shape, schedule, rope, impl, num_chunks
        self._ticks = {}  # (layout, first chunk) -> compiled tick

    # -- placement --------------------------------------------------------------------------------
    def _spec(self, slot_axis: bool, ndim: int):
        """Slot axis over the stages (`tensor`), batch over `data`."""
        return P(*(("tensor",) if slot_axis else ()), "data", *([None] * (ndim - 1)))

    def _put(self, tree, slot_axis: bool):
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(self.mesh, self._spec(slot_axis,
                                                                                             a.ndim - slot_axis))),
                            tree)

    def replicate_params(self, params):
        if self.mesh is None:
            return params
        return jax.device_put(params, NamedSharding(self.mesh, P()))

    def slot_caches(self, cache):
        """n copies of the prefill's cache, one per slot, each on its slot's device."""
        stack = lambda a: jnp.broadcast_to(a[None], (self.n,) + a.shape)
        if self.mesh is None:
            return jax.tree.map(stack, cache)
        out = jax.tree.map(lambda a: NamedSharding(self.mesh, self._spec(True, a.ndim)), cache)
        return jax.jit(lambda c: jax.tree.map(stack, c), out_shardings=out)(cache)

    # -- the tick ---------------------------------------------------------------------------------
    def _tick_fn(self, layout: AttentionLayout, first: int, caches):
        body = functools.partial(stage_tick, self.graphdef, slots=self.n // self.stages, first=first,
                                 num_chunks=self.num_chunks, layout=layout, schedule=self.schedule, rope=self.rope,
                                 impl=self.impl)
        draw = lambda key: lambda chunk, step: chunk_noise(key, chunk, step, self.shape)
        if self.mesh is None:
            def tick(params, text_kv, caches, xs, key, k):
                outs, caches = body(params, text_kv, caches, xs, draw(key), k, 0)
                return shift_slots(outs, 1), caches
        else:
            local_batch = self.shape[0] // self.mesh.shape["data"]

            def local(params, text_kv, caches, xs, key, k):
                # the whole batch's draws (as on one device), then this device's rows of it
                start = jax.lax.axis_index("data") * local_batch
                noise = lambda chunk, step: jax.lax.dynamic_slice_in_dim(draw(key)(chunk, step), start, local_batch)
                outs, caches = body(params, text_kv, caches, xs, noise, k, jax.lax.axis_index("tensor"))
                return shift_slots(outs, self.stages, "tensor"), caches

            slot = lambda tree: jax.tree.map(lambda a: self._spec(True, a.ndim - 1), tree)
            batch = lambda tree: jax.tree.map(lambda a: self._spec(False, a.ndim), tree)
            tick = lambda params, text_kv, caches, xs, key, k: jax.shard_map(
                local, mesh=self.mesh,
                in_specs=(jax.tree.map(lambda _: P(), params), batch(text_kv), slot(caches), self._spec(True, 5),
                          P(), P()),
                out_specs=(self._spec(True, 5), slot(caches)), check_vma=False,
            )(params, text_kv, caches, xs, key, k)
            # explicit: XLA would call an empty head group's output replicated, and the next tick refuse it
            sharded = lambda spec: NamedSharding(self.mesh, spec)
            return jax.jit(tick, donate_argnums=(2, 3), out_shardings=(
                sharded(self._spec(True, 5)), jax.tree.map(lambda a: sharded(self._spec(True, a.ndim - 1)), caches)))
        return jax.jit(tick, donate_argnums=(2, 3))

    def compiled_tick(self, layout, first, args):
        """(compiled tick, seconds spent compiling it now: 0 when it was compiled before)."""
        if (layout, first) in self._ticks:
            return self._ticks[layout, first], 0.0
        t0 = time.perf_counter()
        self._ticks[layout, first] = self._tick_fn(layout, first, args[2]).lower(*args).compile()
        return self._ticks[layout, first], time.perf_counter() - t0

    def chunks(self, params, text_kv, cache, key, layout: AttentionLayout, first: int, on_compile):
        """Yields (chunk index, latents) for chunks first..num_chunks-1 in order. `cache`: the prefill's
        cache after chunk first-1 (consumed); on_compile(seconds) is told of compile time."""
        params = self.replicate_params(params)
        text_kv = self._put(text_kv, False)  # whole heads on every stage (a tensor-parallel prefill split them)
        caches = self.slot_caches(cache)
        xs = self._put(jnp.zeros((self.n,) + self.shape, jnp.float32), True)
        for k in range(self.num_chunks - first + self.n - 1):
            args = (params, text_kv, caches, xs, key, jnp.int32(k))
            tick, compile_s = self.compiled_tick(layout, first, args)
            on_compile(compile_s)
            xs, caches = tick(*args)
            done = first + k - (self.n - 1)
            if done >= first:
                yield done, xs[0]
