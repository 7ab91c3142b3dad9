"""One fp8 Linear against the bf16 one at the 1.3B's shapes: what XLA compiles it to, and how long it takes.

    python3 benchmarks/fp8_gemm.py                    # on the GPU; prints a table, writes $OUT/fp8_gemm.json
    python3 benchmarks/fp8_gemm.py --tokens 64        # anywhere (a smoke run)

For each block linear's (din, dout) at one 480P chunk of tokens (3 latent frames of 30 x 52: 4680): the custom
calls of the compiled program (a cuBLASLt fp8 GEMM is "__cublas$lt$matmul$f8"), whether the program transposes
or copies the f8 kernel (cuBLASLt's fp8 path wants both operands K-major; the kernel is stored [dout, din] for it), and
the time per call (the median of --reps timed batches of --iters calls, after a warm-up; one jitted call each,
so a call of a few tens of microseconds is partly Python dispatch). The times include the
activation quantisation and the rescale: the whole Linear, as the DiT runs it.

--parts also times the pieces, each as its own program: the f8 GEMM alone on operands quantised beforehand, with
the kernel stored [din, dout] (as before 2026-12-02) and [dout, din] (K-major, cuBLASLt's fp8 layout, as now), with
a bf16 and an fp32 output, and the activation quantisation alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dfjax.bench import environment  # noqa: E402
from dfjax.config import WanConfig  # noqa: E402
from dfjax.model.transformer import Linear  # noqa: E402

SHAPES = {"q/k/v/o": (1536, 1536), "ffn_in": (1536, 8960), "ffn_out": (8960, 1536)}


def compiled(lin, x):
    graphdef, state = nnx.split(lin)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return fn, state, fn.lower(state, x).compile()


def program_facts(text: str) -> dict:
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    f8_moves = [line.strip()[:160] for line in text.splitlines()
                if re.search(r"= f8e4m3fn\[[0-9,]+\]\S* (transpose|copy)\(", line)]
    return {"custom_calls": targets, "f8_transposes_or_copies": f8_moves}


def parts(tokens: int, din: int, dout: int, iters: int, reps: int) -> dict:
    """ms per call of the fp8 Linear's pieces (each jitted alone) at one (din, dout)."""
    from dfjax.model import fp8
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (1, tokens, din), jnp.bfloat16)
    wq_t, _ = fp8.quantize_weight(jax.random.normal(kw, (din, dout), jnp.float32) / din ** 0.5)
    wq = jnp.asarray(wq_t.T)
    xq, xs = fp8.quantize_activation(x)
    nt = (((2,), (1,)), ((), ()))  # x [.., din] . w [dout, din]
    nn = (((2,), (0,)), ((), ()))  # x [.., din] . w [din, dout]

    fns = {
        "gemm_f8_kernel_din_dout": (lambda a, b: jax.lax.dot_general(a, b, nn, preferred_element_type=jnp.bfloat16),
                                    (xq, wq)),
        "gemm_f8_kernel_dout_din": (lambda a, b: jax.lax.dot_general(a, b, nt, preferred_element_type=jnp.bfloat16),
                                    (xq, wq_t)),
        "gemm_f8_kernel_dout_din_f32_out": (
            lambda a, b: jax.lax.dot_general(a, b, nt, preferred_element_type=jnp.float32), (xq, wq_t)),
        "quantize_activation": (fp8.quantize_activation, (x,)),
    }
    out = {}
    for name, (fn, args) in fns.items():
        jf = jax.jit(fn)
        out[name] = {"ms": time_calls(jf, args, iters, reps) * 1e3, **program_facts(jf.lower(*args).compile().as_text())}
    return out


def time_calls(fn, args, iters: int, reps: int) -> float:
    """Seconds per call: the median over reps of a batch of iters calls, after a warm-up call."""
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            y = fn(*args)
        jax.block_until_ready(y)
        runs.append((time.perf_counter() - t0) / iters)
    return float(np.median(runs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4680, help="rows of the activation (default: one 480P chunk)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--parts", action="store_true", help="also time the fp8 Linear's pieces (module docstring)")
    a = p.parse_args(argv)
    cfg = WanConfig(param_dtype="bfloat16", dtype="bfloat16")
    rows = []
    for name, (din, dout) in SHAPES.items():
        x = jax.random.normal(jax.random.key(0), (1, a.tokens, din), jnp.bfloat16)
        row = {"linear": name, "tokens": a.tokens, "din": din, "dout": dout}
        for mode in ("bf16", "fp8"):
            fn, state, exe = compiled(Linear(din, dout, cfg, nnx.Rngs(0), fp8=mode == "fp8"), x)
            s = time_calls(fn, (state, x), a.iters, a.reps)
            row[mode] = {"ms": s * 1e3, "tflops": 2 * a.tokens * din * dout / s / 1e12, **program_facts(exe.as_text())}
        row["speedup"] = row["bf16"]["ms"] / row["fp8"]["ms"]
        if a.parts:
            row["parts"] = parts(a.tokens, din, dout, a.iters, a.reps)
            print("   " + "  ".join(f"{k} {v['ms']:.3f} ms" for k, v in row["parts"].items()), flush=True)
        rows.append(row)
        print(f"{name:8s} {din:5d}x{dout:5d}  bf16 {row['bf16']['ms']:.3f} ms ({row['bf16']['tflops']:.0f} TFLOP/s)  "
              f"fp8 {row['fp8']['ms']:.3f} ms ({row['fp8']['tflops']:.0f} TFLOP/s)  x{row['speedup']:.2f}  "
              f"fp8 calls {row['fp8']['custom_calls']}  f8 moves {len(row['fp8']['f8_transposes_or_copies'])}",
              flush=True)
    res = {**environment(), "rows": rows}
    out = Path(os.environ.get("OUT", "/tmp/dfjax-fp8-gemm"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_gemm.json").write_text(json.dumps(res, indent=2) + "\n")
    for row in rows:
        for line in row["fp8"]["f8_transposes_or_copies"][:3]:
            print(f"  {row['linear']}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
