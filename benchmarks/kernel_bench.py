"""Attention kernel benchmark: every impl checked against the reference, then timed.

    python3 benchmarks/kernel_bench.py            # on the GPU: every impl at the model's real shapes
                                                  # ("pallas" as dispatched: Mosaic GPU on Hopper; and Triton)
    python3 benchmarks/kernel_bench.py --sweep    # on the GPU: the pallas kernel's tilings (Mosaic GPU's on Hopper)
    python3 benchmarks/kernel_bench.py --smoke    # anywhere: tiny shapes, pallas in interpret mode
    python3 benchmarks/kernel_bench.py --mosaic   # on a Hopper GPU: jax's Mosaic GPU flash attention vs cuDNN

Cases (B=1, D=128, 12 heads, bf16 unless named): "paf" = Dummy Forcing's two head groups,
sink+dummy heads over 4 latent frames and neighbour heads over 6, for a chunk of 3 frames;
"dense" = the Self Forcing baseline over its 21-frame cache filled to kv frames (3 at the first
chunk, 12 on average over a video, 21 at the last). FLOPs per call: 4 * B * Lq * sum_g H_g *
kv_g * D. Correctness: max |out - ref| / max |ref| over the first 128 and the last 200 query
rows (the ragged tail), the reference computed on the CPU once per case (it is exact per row, so
a row subset keeps it cheap at any size). Timing: inputs rotate over 3 sets (K/V of a layer are
about L2-sized), 2 warm-up calls, then the median over 5 repeats of the mean of 10 back-to-back
calls, synchronised with block_until_ready.
Writes kernels-<device>-<date>.json (or kernels-sweep-..., kernels-mosaic-...) to $OUT (if set) and to
benchmarks/results/.

--mosaic is a probe for a one-launch PAF kernel on Hopper: it times the Mosaic GPU (wgmma + TMA, warp-specialised)
flash attention that ships with jax (jax.experimental.pallas.ops.gpu.attention_mgpu, no masking or lengths)
against cuDNN on the same shapes, each head group alone, padded up to that kernel's block multiples (queries to
256, keys to 128; the padded keys take part in both, so the two compute the same function and are checked
against each other, max |a - b| / max |b|). TFLOP/s count the padded shapes. In float16: in jax 0.11.2 that
kernel fails on bfloat16 inputs ("src had type bfloat16 and dst had type float16"); the two types cost the same
on the tensor cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dfjax.bench import environment  # noqa: E402
from dfjax.kernels import attention as attn  # noqa: E402
from dfjax.kernels import paf_gpu, paf_mgpu  # noqa: E402

D, HEADS, CHUNK_FRAMES = 128, 12, 3
TOKENS_PER_FRAME = {"480p": 1560, "720p": 3600, "1080p": 8160}
SWEEP_CONFIGS = tuple(  # Triton tilings: (block_q, block_k, num_warps, num_stages)
    paf_gpu.BlockSizes(*c) for c in [
        (128, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4),
        (128, 32, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4)])
MGPU_SWEEP_CONFIGS = tuple(  # Mosaic GPU tilings, the Hopper sweep: (block_q, block_kv, stages); riskiest last
    paf_mgpu.Config(*c) for c in [(64, 128, 2), (64, 128, 3), (64, 64, 2), (64, 64, 4), (64, 192, 2)])
TOL = {"bfloat16": 2e-2, "float32": 1e-4}  # vs the float32 reference; bf16 rounds p and out


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    lq: int
    groups: tuple[tuple[int, int, int | None], ...]  # (heads, Lk, kv_len or None)
    dtype: str = "bfloat16"

    @property
    def flops(self) -> float:
        return sum(4.0 * self.lq * h * (lk if n is None else n) * D for h, lk, n in self.groups)


def paf_case(res: str, sink_heads: int, dtype: str = "bfloat16", frame: int | None = None) -> Case:
    f = frame or TOKENS_PER_FRAME[res]
    groups = ((sink_heads, 4 * f, None), (HEADS - sink_heads, 6 * f, None))
    suffix = "" if dtype == "bfloat16" else f"-{dtype}"
    return Case(f"paf-{res}-{sink_heads}/{HEADS - sink_heads}{suffix}", CHUNK_FRAMES * f, groups,
                dtype)


def dense_case(res: str, kv_frames: int, frame: int | None = None) -> Case:
    f = frame or TOKENS_PER_FRAME[res]
    return Case(f"dense-{res}-kv{kv_frames}f", CHUNK_FRAMES * f, ((HEADS, 21 * f, kv_frames * f),))


def cases(mode: str) -> list[Case]:
    if mode == "smoke":
        return [paf_case("480p", 6, frame=20), dense_case("480p", 21, frame=20),
                paf_case("480p", 6, "float32", frame=20)]
    if mode == "sweep":
        return [paf_case("480p", 6), paf_case("720p", 6), paf_case("1080p", 6),
                dense_case("480p", 21), dense_case("1080p", 21)]
    return [paf_case("480p", 6), dense_case("480p", 21), dense_case("480p", 12),
            dense_case("480p", 3), paf_case("480p", 9), paf_case("480p", 2),
            paf_case("720p", 6), dense_case("720p", 21), dense_case("720p", 12),
            paf_case("1080p", 6), dense_case("1080p", 21), paf_case("480p", 6, "float32")]


def make_inputs(case: Case, seed: int):
    dtype = jnp.dtype(case.dtype)
    kq, *kk = jax.random.split(jax.random.key(seed), 1 + 2 * len(case.groups))
    q = jax.random.normal(kq, (1, case.lq, sum(h for h, _, _ in case.groups), D), dtype)
    kvs = tuple(jax.random.normal(kk[i], (1, lk, h, D), dtype)
                for g, (h, lk, _) in enumerate(case.groups) for i in (2 * g, 2 * g + 1))
    lens = tuple(jnp.int32(lk if n is None else n) for _, lk, n in case.groups)
    return q, kvs, lens


def groups_of(case: Case, kvs, lens):
    """The (k, v, kv_len) groups of a case; kv_len stays a traced argument, as in the model."""
    return tuple((kvs[2 * g], kvs[2 * g + 1], None if n is None else lens[g])
                 for g, (_, _, n) in enumerate(case.groups))


def build(case: Case, impl: str, config, interpret: bool):
    """A jitted fn(q, kvs, lens): the dispatcher's impl, or one Pallas kernel at a tiling
    (a paf_gpu.BlockSizes: Triton; a paf_mgpu.Config: Mosaic GPU)."""
    if config is None:
        return jax.jit(lambda q, kvs, lens: attn.grouped_attention(
            q, groups_of(case, kvs, lens), impl=impl, interpret=interpret))

    def fn(q, kvs, lens):
        lengths = attn._kv_lens(groups_of(case, kvs, lens))
        if isinstance(config, paf_mgpu.Config):
            return paf_mgpu.paf_attention(q, kvs[0::2], kvs[1::2], lengths, config=config, interpret=interpret)
        return paf_gpu.paf_attention(q, kvs[0::2], kvs[1::2], lengths, block_sizes=config,
                                     interpret=interpret)
    return jax.jit(fn)


def check_rows(lq: int) -> np.ndarray:
    return np.unique(np.concatenate([np.arange(min(128, lq)), np.arange(max(0, lq - 200), lq)]))


def reference_rows(case: Case, inputs) -> np.ndarray:
    """The reference output at check_rows, computed on the CPU in float32."""
    cpu = jax.devices("cpu")[0]
    q, kvs, lens = jax.device_put(inputs, cpu)
    q = q[:, check_rows(case.lq)]
    return np.asarray(attn.reference_attention(q, groups_of(case, kvs, lens)), np.float32)


def max_rel_err(case: Case, out, ref: np.ndarray) -> float:
    if not bool(jnp.isfinite(out).all()):
        return float("inf")
    got = np.asarray(out[:, check_rows(case.lq)].astype(jnp.float32))
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def timeit(fn, input_sets, reps: int = 5, calls: int = 10) -> float:
    """Median over reps of the mean time of `calls` back-to-back calls, in ms."""
    for x in input_sets[:2]:
        jax.block_until_ready(fn(*x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(calls):
            out = fn(*input_sets[i % len(input_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return float(np.median(times))


def run_one(case: Case, impl: str, config, input_sets, ref, interpret: bool, smoke: bool) -> dict:
    label = impl if config is None else _config_name(config)
    rec = {"case": case.name, "impl": label, "dtype": case.dtype, "lq": case.lq,
           "groups": [list(g) for g in case.groups], "gflop": case.flops / 1e9}
    if impl == "pallas" and config is None:  # which Pallas kernel the dispatcher ran
        q, kvs, _ = input_sets[0]
        rec["kernel"] = attn._pallas_kernel(q, kvs[0::2], interpret).__name__.rsplit(".", 1)[-1]
    try:
        t0 = time.perf_counter()
        fn = build(case, impl, config, interpret)
        rec["max_rel_err"] = max_rel_err(case, fn(*input_sets[0]), ref)
        rec["compile_and_check_s"] = round(time.perf_counter() - t0, 2)
        rec["ok"] = rec["max_rel_err"] <= TOL[case.dtype]
        rec["ms"] = timeit(fn, input_sets[:1], 1, 1) if smoke else timeit(fn, input_sets)
        rec["tflops"] = case.flops / (rec["ms"] * 1e-3) / 1e12
    except Exception as e:  # one failing impl must not cost the rest of the run
        rec["ok"], rec["error"] = False, f"{type(e).__name__}: {str(e)[:600]}"
        traceback.print_exc(limit=3)
    print(f"{case.name:22s} {label:22s} "
          + (f"{rec['ms']:9.3f} ms {rec['tflops']:7.1f} TFLOP/s  err {rec['max_rel_err']:.1e}"
             if "ms" in rec else f"FAILED {rec.get('error', '')[:200]}"), flush=True)
    return rec


def _config_name(c) -> str:
    if isinstance(c, paf_mgpu.Config):
        return f"mosaic[{c.block_q}x{c.block_kv},s{c.stages}]"
    return f"triton[{c.block_q}x{c.block_k},w{c.num_warps},s{c.num_stages}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="time the pallas kernel's tilings")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode")
    mode.add_argument("--mosaic", action="store_true", help="jax's Mosaic GPU attention vs cuDNN (docstring)")
    args = parser.parse_args()
    if args.mosaic:
        return mosaic_probe()
    mode = "sweep" if args.sweep else "smoke" if args.smoke else "impls"
    on_gpu = jax.default_backend() == "gpu"
    runs = []
    for case in cases(mode):
        input_sets = [make_inputs(case, seed) for seed in range(3)]
        ref = reference_rows(case, input_sets[0])
        if mode == "sweep":  # on Hopper the Mosaic GPU kernel's tilings, elsewhere the Triton kernel's
            tilings = MGPU_SWEEP_CONFIGS if attn._is_hopper() else SWEEP_CONFIGS
            impls = [("pallas", c) for c in tilings] + [("cudnn", None)]
        else:  # pallas through the dispatcher (Mosaic GPU on Hopper), cuDNN where it applies, XLA where it fits
            impls = [("pallas", None)]
            if on_gpu and case.dtype != "float32":
                impls += [("pallas", paf_gpu.BlockSizes()), ("cudnn", None)]  # the Triton kernel too
            if case.name in ("paf-480p-6/6", "dense-480p-kv21f"):
                impls.append(("xla", None))
        for impl, config in impls:
            runs.append(run_one(case, impl, config, input_sets, ref, not on_gpu, args.smoke))
            write(runs, {}, mode)  # partial results survive a timeout
        del input_sets
    write(runs, summarize(runs), mode)


MOSAIC_CONFIGS = ((64, 128, 2), (64, 64, 2), (64, 128, 3), (64, 64, 4))  # (block_q, block_kv, stages)


def mosaic_probe():
    if jax.default_backend() != "gpu":
        sys.exit(f"--mosaic needs a Hopper GPU (jax's Mosaic GPU kernel uses wgmma); this is {jax.default_backend()}. "
                 "Run it on an H100 or H200.")
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    pad = lambda n, m: -(-n // m) * m
    runs = []
    shapes = sorted({(c.lq, h, lk if n is None else n) for c in cases("impls") if c.dtype == "bfloat16"
                     for h, lk, n in c.groups if (lk if n is None else n) < 100_000})  # not 1080P's dense
    for lq, h, lk in shapes:
        lq_p, lk_p = pad(lq, 256), pad(lk, 128)
        sets = []
        for seed in range(3):
            kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
            sets.append(tuple(jax.random.normal(k, (1, n, h, D), jnp.float16)
                              for k, n in ((kq, lq_p), (kk, lk_p), (kv, lk_p))))
        flops = 4.0 * lq_p * lk_p * h * D
        # scale 1: that kernel does not scale the logits by 1 / sqrt(D)
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="cudnn"))
        want = np.asarray(cudnn(*sets[0]).astype(jnp.float32))
        impls = [("cudnn", cudnn)] + [
            (f"mosaic[{bq}x{bk},s{st}]", jax.jit(functools.partial(
                mgpu.attention, config=mgpu.TuningConfig(block_q=bq, block_kv=bk, max_concurrent_steps=st))))
            for bq, bk, st in MOSAIC_CONFIGS]
        for name, fn in impls:
            rec = {"lq": lq, "heads": h, "lk": lk, "lq_padded": lq_p, "lk_padded": lk_p, "impl": name,
                   "gflop_padded": flops / 1e9}
            try:
                got = np.asarray(fn(*sets[0]).astype(jnp.float32))
                rec["max_rel_err_vs_cudnn"] = float(np.abs(got - want).max() / np.abs(want).max())
                rec["ms"] = timeit(fn, sets)
                rec["tflops"] = flops / (rec["ms"] * 1e-3) / 1e12
            except Exception as e:  # a tiling that does not compile must not cost the rest
                rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            runs.append(rec)
            print(f"lq {lq_p:6d} h {h:2d} lk {lk_p:6d} {name:22s} " + (
                f"{rec['ms']:8.3f} ms {rec['tflops']:6.1f} TFLOP/s err {rec['max_rel_err_vs_cudnn']:.1e}"
                if "ms" in rec else "FAILED " + rec["error"][:160]), flush=True)
            write(runs, {}, "mosaic")
    return 0


def summarize(runs: list[dict]) -> dict:
    """The two targets: PAF pallas vs cuDNN per unit of work, and PAF vs the dense baseline."""
    fastest = {}  # (case, impl family) -> fastest passing run
    for r in runs:
        if r.get("ok") and "ms" in r:
            family = r["impl"].split("[")[0]
            key = (r["case"], family if family in ("cudnn", "xla") else "pallas")  # pallas: its fastest kernel
            if key not in fastest or r["ms"] < fastest[key]["ms"]:
                fastest[key] = r
    out = {}
    for res in TOKENS_PER_FRAME:
        paf, dense = f"paf-{res}-6/6", f"dense-{res}-kv21f"
        pallas, cudnn = fastest.get((paf, "pallas")), fastest.get((paf, "cudnn"))
        if pallas and cudnn:
            out[f"{res}_paf_pallas_over_cudnn_time"] = pallas["ms"] / cudnn["ms"]
        for impl in ("pallas", "cudnn"):
            p, d = fastest.get((paf, impl)), fastest.get((dense, impl))
            if p and d:
                speedup, flop_ratio = d["ms"] / p["ms"], d["gflop"] / p["gflop"]
                out[f"{res}_{impl}_paf_speedup_over_dense"] = speedup
                out[f"{res}_{impl}_speedup_over_0.8x_flop_ratio"] = speedup / (0.8 * flop_ratio)
    for k, v in out.items():
        print(f"{k:45s} {v:.3f}")
    return out


def write(runs: list[dict], summary: dict, mode: str):
    env = environment()  # its commit: DFJAX_COMMIT where the checkout travels without an up-to-date .git
    kind = env["device"].lower()
    slug = next((s for s in ("h100", "h200", "a100", "b200") if s in kind), jax.devices()[0].platform)
    date = env["date"]
    record = {**env, "mode": mode, "default_tiling": dataclasses.asdict(paf_gpu.BlockSizes()), "summary": summary,
              "runs": runs}
    name = f"kernels-{mode + '-' if mode in ('sweep', 'mosaic') else ''}{slug}-{date}.json"
    dirs = [] if mode == "smoke" else [Path(__file__).resolve().parent / "results"]
    if os.environ.get("OUT"):
        dirs.append(Path(os.environ["OUT"]))
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
