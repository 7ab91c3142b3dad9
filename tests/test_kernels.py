"""Attention kernels: the jnp reference against float64 numpy, and the Pallas GPU (Triton) and
TPU (Mosaic) kernels, in interpret mode on CPU, against the reference. The Hopper kernel (Mosaic
GPU) is lowered for CUDA on any machine, and run in its interpreter where jax has one (>= 0.11).

Tolerances, as max |out - ref| / max |ref|:
- float32 1e-5: kernel and reference both multiply in exact float32 (IEEE / HIGHEST); they
  differ only in summation order and in the online softmax's rescaling, a few float32 ulps
  (~1e-7) each, growing at most with the number of key blocks.
- bfloat16 1e-2: the kernels round the probabilities to bf16 before the value product (as
  FlashAttention does) and the output to bf16, each a relative error of up to 2^-8.
The TPU interpreter fills VMEM that no DMA wrote with NaN, so a missed mask on a ragged block
shows up as NaN, not as a silently right answer.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfjax.kernels import attention as attn
import re

from dfjax.kernels import paf_gpu, paf_mgpu, paf_tpu

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
DTYPES = [jnp.float32, jnp.bfloat16]

# Small blocks so that the test shapes span several blocks with ragged tails.
GPU_BLOCKS = paf_gpu.BlockSizes(block_q=16, block_k=16)
TPU_BLOCKS = paf_tpu.BlockSizes(block_q=16, block_k=32)
D = 128  # the TPU kernel needs a lane-dense head_dim; the GPU kernel runs the same cases


def _run_gpu(q, groups):
    ks, vs, lens = _split(groups)
    return paf_gpu.paf_attention(q, ks, vs, lens, block_sizes=GPU_BLOCKS, interpret=True)


def _run_tpu(q, groups):
    ks, vs, lens = _split(groups)
    return paf_tpu.paf_attention(q, ks, vs, lens, block_sizes=TPU_BLOCKS, interpret=True)


KERNELS = {"gpu": _run_gpu, "tpu": _run_tpu}


def _split(groups):
    ks = tuple(k for k, _, _ in groups)
    vs = tuple(v for _, v, _ in groups)
    return ks, vs, attn._kv_lens(groups)


def _inputs(seed, dtype, lq, group_shapes, batch=1):
    """q and (k, v) per group from (heads, Lk) pairs; normal data, fixed seed."""
    rng = np.random.default_rng(seed)
    h = sum(hg for hg, _ in group_shapes)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    q = normal(batch, lq, h, D)
    kvs = [(normal(batch, lk, hg, D), normal(batch, lk, hg, D)) for hg, lk in group_shapes]
    return q, kvs


def _assert_close(out, ref, dtype):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    assert np.isfinite(out).all()
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err <= TOL[dtype], err


def _numpy_attention(q, groups):
    """float64 numpy: the softmax written out, one group at a time."""
    q = np.asarray(q, np.float64)
    outs, head = [], 0
    for k, v, kv_len in groups:
        n = k.shape[1] if kv_len is None else int(kv_len)
        k, v = np.asarray(k, np.float64)[:, :n], np.asarray(v, np.float64)[:, :n]
        qg = q[:, :, head:head + k.shape[2]]
        head += k.shape[2]
        s = np.einsum("bqhd,bkhd->bhqk", qg, k) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        outs.append(np.einsum("bhqk,bkhd->bqhd", p, v))
    return np.concatenate(outs, axis=2)


# ---------------------------------------------------------------- the reference


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64_softmax(dtype):
    q, kvs = _inputs(0, dtype, 29, [(2, 41), (3, 64)], batch=2)
    groups = ((*kvs[0], jnp.int32(23)), (*kvs[1], None))
    _assert_close(attn.reference_attention(q, groups), _numpy_attention(q, groups), dtype)


# ---------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_ragged_lengths_and_single_head_groups(kernel, dtype):
    # No length is a block multiple; the first group has one head, the second one key block
    # more than the first, so programs of the two groups loop for different counts.
    q, kvs = _inputs(1, dtype, 37, [(1, 53), (3, 91)], batch=2)
    groups = ((*kvs[0], None), (*kvs[1], None))
    _assert_close(KERNELS[kernel](q, groups), attn.reference_attention(q, groups), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_dynamic_kv_len(kernel, dtype):
    # One compiled function, kv_len traced: one key, a block multiple (32), ragged (37), all.
    q, [(k, v)] = _inputs(2, dtype, 24, [(2, 100)])
    run = jax.jit(lambda n: KERNELS[kernel](q, ((k, v, n),)))
    for n in (1, 32, 37, 100):
        groups = ((k, v, jnp.int32(n)),)
        _assert_close(run(jnp.int32(n)), attn.reference_attention(q, groups), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_scaled_down_model_layout(kernel, dtype):
    # The 480P block structure scaled to 20 tokens a frame: a chunk of 3 frames queries
    # sink+dummy heads over 4 frames and neighbour heads over 6 (PAF), and the baseline's
    # global cache of 21 frames while it is filled to 9 of them.
    frame = 20
    q, kvs = _inputs(3, dtype, 3 * frame, [(4, 4 * frame), (6, 6 * frame), (10, 21 * frame)])
    paf = ((*kvs[0], None), (*kvs[1], None))
    _assert_close(KERNELS[kernel](q[:, :, :10], paf), attn.reference_attention(q[:, :, :10], paf),
                  dtype)
    dense = ((*kvs[2], jnp.int32(9 * frame)),)
    _assert_close(KERNELS[kernel](q[:, :, 10:], dense),
                  attn.reference_attention(q[:, :, 10:], dense), dtype)


# ---------------------------------------------------------------- the dispatcher


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_dispatcher_skips_empty_groups(monkeypatch, platform):
    # The platform seam routes impl="pallas" to that platform's kernel, run by its interpreter.
    monkeypatch.setattr(attn, "_platform", lambda: platform)
    dtype = jnp.float32
    q, kvs = _inputs(4, dtype, 21, [(0, 30), (2, 50), (1, 70)])
    groups = ((*kvs[0], None), (*kvs[1], None), (*kvs[2], jnp.int32(33)))
    out = attn.grouped_attention(q, groups, impl="pallas", interpret=True)
    _assert_close(out, _numpy_attention(q, groups[1:]), dtype)


def test_dense_attention_is_one_group():
    q, [(k, v)] = _inputs(5, jnp.float32, 19, [(3, 45)])
    out = attn.attention(q, k, v, jnp.int32(30), impl="pallas", interpret=True)
    _assert_close(out, _numpy_attention(q, ((k, v, 30),)), jnp.float32)


def test_auto_is_the_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(attn, "_platform", lambda: "cpu")
    q, [(k, v)] = _inputs(6, jnp.float32, 8, [(2, 16)])
    auto = attn.attention(q, k, v, jnp.int32(5))
    assert np.array_equal(np.asarray(auto), np.asarray(attn.attention(q, k, v, jnp.int32(5),
                                                                       impl="xla")))


def test_bad_inputs_are_rejected():
    q, [(k, v)] = _inputs(7, jnp.float32, 8, [(2, 16)])
    with pytest.raises(ValueError, match="heads"):
        attn.grouped_attention(q, ((k[:, :, :1], v[:, :, :1], None),))
    with pytest.raises(ValueError, match="interpret"):
        attn.attention(q, k, v, impl="pallas")
    with pytest.raises(ValueError, match="unknown"):
        attn.attention(q, k, v, impl="flash")


# ---------------------------------------------------------------- compiled, on a GPU


def _has_gpu():
    return any(d.platform == "gpu" for d in jax.devices())


@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_gpu_kernels(dtype):
    # The compiled Triton kernel with its default blocks, and cuDNN where it applies (bf16).
    q, kvs = _inputs(8, dtype, 300, [(5, 400), (7, 650)], batch=2)
    groups = ((*kvs[0], None), (*kvs[1], jnp.int32(517)))
    # The reference runs on the CPU: on the GPU, XLA would autotune its float32 GEMMs for minutes.
    ref = attn.reference_attention(*jax.device_put((q, groups), jax.devices("cpu")[0]))
    impls = ["pallas", "auto"] + (["cudnn"] if dtype == jnp.bfloat16 else [])
    for impl in impls:
        run = jax.jit(functools.partial(attn.grouped_attention, impl=impl))
        _assert_close(run(q, groups), ref, dtype)
    if dtype == jnp.bfloat16 and attn._is_hopper():  # lengths in multiples of 8, ragged against every block
        q, kvs = _inputs(8, dtype, 296, [(5, 408), (7, 656)], batch=2)
        groups = ((*kvs[0], None), (*kvs[1], jnp.int32(517)))
        ref = attn.reference_attention(*jax.device_put((q, groups), jax.devices("cpu")[0]))
        run = jax.jit(functools.partial(_split_call, paf_mgpu.paf_attention))
        _assert_close(run(q, groups), ref, dtype)


def _split_call(kernel, q, groups, **kw):
    ks, vs, lens = _split(groups)
    return kernel(q, ks, vs, lens, **kw)


# ---------------------------------------------------------------- the Hopper kernel (Mosaic GPU)

MGPU_CASES = {  # lq, (heads, Lk) per group, kv_len per group (None: all)
    # ragged last query tile (the second warpgroup's rows partly past Lq) and a key block past Lk_0
    "ragged": (200, [(1, 248), (2, 384)], [None, 300]),
    # one valid key; a group shorter than one key block; more key blocks than buffers
    "short": (104, [(2, 136), (1, 64), (1, 696)], [1, None, 645]),
}


@pytest.mark.skipif(not paf_mgpu.INTERPRETABLE, reason="Mosaic GPU's interpreter runs this kernel from jax 0.11")
@pytest.mark.parametrize("case", list(MGPU_CASES))
def test_mosaic_gpu_kernel_in_its_interpreter(case):
    # Its barriers, TMA copies (zeros past the ends, rows past Lq dropped), masking and warpgroup turns are
    # simulated; the interpreter also fails on a barrier left with a completion no thread waited for.
    lq, shapes, lens = MGPU_CASES[case]
    q, kvs = _inputs(9, jnp.bfloat16, lq, shapes)
    q, kvs = q[..., :64], [(k[..., :64], v[..., :64]) for k, v in kvs]  # head_dim 64 keeps it quick
    groups = tuple((k, v, None if n is None else jnp.int32(n)) for (k, v), n in zip(kvs, lens))
    out = _split_call(paf_mgpu.paf_attention, q, groups, interpret=True)
    _assert_close(out, attn.reference_attention(q, groups), jnp.bfloat16)


def test_mosaic_gpu_kernel_lowers_for_cuda(monkeypatch):
    # On any machine: through the dispatcher as on a Hopper GPU, the kernel traces and lowers to a Mosaic GPU custom
    # call with wgmma in it, at the 480P Dummy Forcing shapes (a GPU run is test_compiled_gpu_kernels). Two layers'
    # calls of one signature lower (and so compile) one kernel, not two: XLA compiles a kernel per call site.
    monkeypatch.setattr(attn, "_platform", lambda: "gpu")
    monkeypatch.setattr(attn, "_is_hopper", lambda: True)
    spec = jax.ShapeDtypeStruct
    q = spec((1, 4680, 12, 128), jnp.bfloat16)
    ks = (spec((1, 6240, 6, 128), jnp.bfloat16), spec((1, 9360, 6, 128), jnp.bfloat16))

    def two_layers(q, ks, vs, lens):
        for _ in range(2):
            q = attn.grouped_attention(q, ((ks[0], vs[0], lens[0]), (ks[1], vs[1], lens[1])), impl="pallas")
        return q
    module = jax.export.export(jax.jit(two_layers), platforms=["cuda"])(q, ks, ks, spec((2,), jnp.int32)).mlir_module()
    assert len(re.findall(r"custom_call @mosaic_gpu", module)) == 1
    assert len(re.findall(r"\bcall @paf_attention", module)) == 2  # both layers call the one kernel's function
    assert "wgmma" in module
    for q, k in [(jnp.zeros((1, 8, 1, 128)), jnp.zeros((1, 8, 1, 128))),  # float32
                 (jnp.zeros((1, 8, 1, 128), jnp.bfloat16), jnp.zeros((1, 12, 1, 128), jnp.bfloat16))]:  # Lk 12
        with pytest.raises(ValueError, match="bf16/f16, head_dim a multiple of 64 and query and key lengths"):
            paf_mgpu.paf_attention(q, (k,), (k,), jnp.array([8]))


def test_pallas_picks_the_mosaic_gpu_kernel_on_hopper_for_16_bit(monkeypatch):
    monkeypatch.setattr(attn, "_platform", lambda: "gpu")
    q16, q32 = jnp.zeros((1, 8, 2, 128), jnp.bfloat16), jnp.zeros((1, 8, 2, 128), jnp.float32)
    ks, ragged = (jnp.zeros((1, 16, 2, 128)),), (jnp.zeros((1, 20, 2, 128)),)
    for hopper, q, k, want in [(True, q16, ks, paf_mgpu), (True, q32, ks, paf_gpu), (False, q16, ks, paf_gpu),
                               (True, q16, ragged, paf_gpu)]:
        monkeypatch.setattr(attn, "_is_hopper", lambda h=hopper: h)
        assert attn._pallas_kernel(q, k, interpret=False) is want
    assert attn._pallas_kernel(q16, ks, interpret=True) is paf_gpu  # on CPU the Triton interpreter (fast)


# ---------------------------------------------------------------- the registry


def test_every_consumer_resolves_its_kernel_through_the_registry(monkeypatch):
    """The CLI offers the registry's names, and the Generator's placement, the stream runner and the dispatcher
    itself resolve a name through resolve_impl (so a new kernel is one KERNELS entry)."""
    from dfjax.cli import build_parser
    from dfjax.config import WanConfig
    from dfjax.sharding import Placement
    from dfjax.stream import StreamRunner

    parser = build_parser()
    for command in ("generate", "calibrate"):
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        (action,) = [a for a in sub._actions if a.dest == "attn_impl"]
        assert tuple(action.choices) == attn.IMPLS == ("auto", *attn.KERNELS)

    seen = []
    real = attn.resolve_impl
    monkeypatch.setattr(attn, "resolve_impl", lambda impl, *a, **k: seen.append(impl) or real(impl, *a, **k))
    assert Placement(None, WanConfig.tiny(), 1).attn_impl("auto", "float32") == "xla"
    StreamRunner(None, None, 4, (1,), None, None, "auto", "float32", 3)
    q, [(k, v)] = _inputs(9, jnp.float32, 8, [(2, 16)])
    attn.attention(q, k, v, impl="xla")
    assert seen == ["auto", "auto", "xla"]


def test_registry_resolution_rules():
    r = attn.resolve_impl
    assert r("auto", jnp.bfloat16, platform="gpu") == attn.AUTO_GPU_IMPL
    assert r("auto", jnp.float32, platform="gpu") == "pallas"  # cuDNN has no float32 flash attention
    assert r("auto", jnp.bfloat16, platform="tpu") == "pallas"
    assert r("auto", jnp.bfloat16, platform="gpu", partitioned=True) == "cudnn"  # GSPMD cannot split Pallas
    assert r("auto", jnp.bfloat16, platform="tpu", partitioned=True) == "xla"
    assert r("pallas", jnp.float32, platform="cpu", interpret=True) == "pallas"
    with pytest.raises(ValueError, match="not partitioned across a mesh"):
        r("pallas", jnp.bfloat16, platform="gpu", partitioned=True)
    with pytest.raises(ValueError, match="bfloat16/float16 only"):
        r("cudnn", jnp.float32, platform="gpu")
    with pytest.raises(ValueError, match="needs one of \\('gpu',\\)"):
        r("cudnn", jnp.bfloat16, platform="cpu")
