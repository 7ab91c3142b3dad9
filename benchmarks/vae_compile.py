"""Compile and run time of the Wan2.1 VAE's chunk decode (3 latent frames, random weights) at one resolution.

    python3 benchmarks/vae_compile.py 1080p                 # as dfjax runs it
    python3 benchmarks/vae_compile.py 1080p --autotune 0    # XLA's autotuning off
    python3 benchmarks/vae_compile.py 1080p --attention     # the mid-block attention alone, blocked and not

One case per process (compile caches are per process; set JAX_COMPILATION_CACHE_DIR to time a read-back). Prints
a line of JSON after each step, so that a step cut off by a timeout still leaves the ones before; --out writes
the last line to a file. Results: benchmarks/results/vae-compile-*.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dfjax.bench import environment  # noqa: E402
from dfjax.model.vae import AttentionBlock, WanVAE, WanVAEConfig, decode_chunk, init_decoder_cache  # noqa: E402

LATENT = {"480p": (60, 104), "720p": (90, 160), "1080p": (136, 240)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("resolution", choices=sorted(LATENT))
    p.add_argument("--autotune", type=int, help="xla_gpu_autotune_level (default: XLA's)")
    p.add_argument("--attention", action="store_true", help="time the mid-block attention alone")
    p.add_argument("--out")
    a = p.parse_args()
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    h, w = LATENT[a.resolution]
    out = {"resolution": a.resolution, **environment(), "autotune_level": a.autotune}

    def report():
        print(json.dumps(out), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(out, indent=2))

    if a.attention:
        blk = AttentionBlock(384, cfg=WanVAEConfig(), rngs=nnx.Rngs(0))
        g, s = nnx.split(blk)
        x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, h, w, 384), jnp.bfloat16)
        for name, limit in (("one_block", 2**62), ("query_blocks", AttentionBlock.max_logits)):
            AttentionBlock.max_logits = limit
            t0 = time.perf_counter()
            c = jax.jit(lambda s, x: nnx.merge(g, s)(x)).lower(s, x).compile()
            out[f"attention_{name}_compile_s"] = time.perf_counter() - t0
            c(s, x).block_until_ready()
            t0 = time.perf_counter()
            c(s, x).block_until_ready()
            out[f"attention_{name}_run_s"] = time.perf_counter() - t0
            report()
        return
    opts = {"xla_gpu_force_conv_nhwc": True} if jax.default_backend() == "gpu" else {}
    if a.autotune is not None:
        opts["xla_gpu_autotune_level"] = a.autotune
    vae = WanVAE(WanVAEConfig(with_encoder=False), rngs=nnx.Rngs(0))
    g, s = nnx.split(vae)
    out["frames_per_pass"] = vae.decoder.frames_per_pass(h, w)
    cache = init_decoder_cache(vae.cfg, 1, h, w)
    z = jax.random.normal(jax.random.PRNGKey(0), (1, 3, h, w, 16), jnp.float32)
    for name in ("first", "later"):  # the first chunk and the later ones are two programs
        t0 = time.perf_counter()
        c = jax.jit(decode_chunk.fn, static_argnames="graphdef", donate_argnames="cache").lower(
            g, s, z, cache).compile(compiler_options=opts or None)
        out[f"compile_{name}_s"] = time.perf_counter() - t0
        report()
        runs = 1 if name == "first" else 3
        t0 = time.perf_counter()
        for _ in range(runs):
            px, cache = c(s, z, cache)
            px.block_until_ready()
        out[f"run_{name}_s"] = (time.perf_counter() - t0) / runs
        report()


if __name__ == "__main__":
    main()
