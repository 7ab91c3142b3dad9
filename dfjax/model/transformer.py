"""The causal, KV-cached Wan2.1 text-to-video DiT in Flax NNX (docs/model.md).

Latents are channels-last [B, F, H, W, C]. One call denoises one chunk of latent frames: it writes
the chunk's self-attention K/V into the cache (dfjax.cache) and attends to everything the cache's
layout keeps. With an empty global cache and frame_start=0, a call is the ordinary bidirectional
forward of the whole clip. Each latent frame carries its own timestep.

A call is described by a ChunkCall (static: the attention kernel, and an optional probe, a hook that
sees every self-attention layer's queries and caches: Dummy Forcing's frame attention scores) and a
ChunkStep (traced: where the chunk starts, whether this is the cache-refresh forward, the probe's
inputs). The model knows no algorithm beyond the cache layout it is given.

Parameter dtypes: linear weights in `param_dtype`; norm weights, modulation tables and the time
embedding in `norm_dtype` (fp32). The residual stream stays fp32; matmuls run in `dtype`. With `cfg.fp8` the
blocks' linears (attention q/k/v/o, FFN) keep float8_e4m3fn kernels with per-channel scales and multiply in
fp8 (dfjax.model.fp8, docs/fp8.md); the embeddings and the head do not.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dfjax.cache import KVCache
from dfjax.config import WanConfig, dtype_of
from dfjax.kernels.attention import attention, grouped_attention
from dfjax.model.fp8 import fp8_matmul, quantize_weight
from dfjax.model.rope import RopeTables, apply_rope, rope_cos_sin


@dataclasses.dataclass(frozen=True)
class ChunkCall:
    """What a DiT call does besides its math, fixed when it is traced (hashable: a static argument).

    impl: the attention kernel (a name of dfjax.kernels.attention.KERNELS, or "auto").
    probe: None, or a hook called in every self-attention layer after the chunk's K/V are written:
      probe(layer, q [B, L, H, D], groups (the layer's GroupKV), step) -> an array; the call returns the layers'
      outputs stacked, and probe.zeros(num_layers, num_heads) is that stack when nothing was probed.
    """

    impl: str = "auto"
    probe: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkStep:
    """The traced values of one DiT call."""

    frame_start: jax.Array  # the chunk's first absolute latent frame (RoPE position, cache slots)
    is_refresh: jax.Array  # the cache-refresh forward (t = context noise): newest-frame slots are replaced after it
    probe: Any = None  # the probe's inputs

    @classmethod
    def at(cls, frame_start, is_refresh=False, probe=None) -> "ChunkStep":
        return cls(jnp.asarray(frame_start, jnp.int32), jnp.asarray(is_refresh), probe)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def layer_norm(x, eps, weight=None, bias=None):
    """LayerNorm computed in fp32 (affine optional)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight + bias
    return y


def rms_norm(x, weight, eps, out_dtype):
    """RMSNorm over the last axis in fp32, then scaled by the weight."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + eps)
    return (y * weight).astype(out_dtype)


def timestep_sinusoid(t, dim: int):
    """Wan's sinusoidal embedding: [cos, sin] of t * 10000^(-i/half), computed in fp32."""
    half = dim // 2
    freqs = jnp.power(10000.0, -jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Linear(nnx.Module):
    """y = x @ kernel + bias with the kernel in param_dtype and the matmul in dtype.

    fp8: the kernel is kept transposed, `kernel_t` [dout, din] in float8_e4m3fn, with a float32 per-output-channel
    `scale`, and the matmul runs on fp8 operands (the activation quantised per token at call time;
    dfjax.model.fp8)."""

    def __init__(self, din, dout, cfg: WanConfig, rngs: nnx.Rngs, param_dtype=None, fp8: bool = False):
        pd = dtype_of(param_dtype or cfg.param_dtype)
        kernel = jax.random.normal(rngs.params(), (din, dout), pd) * (1.0 / math.sqrt(din))
        if fp8:
            kernel_t, scale = quantize_weight(kernel)
            self.kernel_t, self.scale = nnx.Param(kernel_t), nnx.Param(scale)
        else:
            self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.zeros((dout,), pd))
        self.dtype = dtype_of(cfg.dtype)
        self.fp8 = fp8

    def __call__(self, x):
        if self.fp8:
            y = fp8_matmul(x, self.kernel_t[...], self.scale[...], self.dtype)
        else:
            # The matmul accumulates in fp32 on every backend but writes `dtype`: an fp32 output would be
            # written to memory and read back by the bias/activation fusion (twice the bytes), and the
            # bias (and GELU) can then fold into the GEMM's epilogue.
            y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), preferred_element_type=self.dtype)
        return y + self.bias[...].astype(self.dtype)

    def permute_outputs(self, cols) -> None:
        """Reorders the output channels in place (output j becomes output cols[j]), in whichever layout the kernel
        is kept; the bias and fp8's per-output-channel scale go with their channels."""
        if self.fp8:
            self.kernel_t.set_value(self.kernel_t[...][cols, :])
            self.scale.set_value(self.scale[...][cols])
        else:
            self.kernel.set_value(self.kernel[...][:, cols])
        self.bias.set_value(self.bias[...][cols])

    def permute_inputs(self, cols) -> None:
        """Reorders the input channels in place (the outputs, their bias and scales, stay)."""
        if self.fp8:
            self.kernel_t.set_value(self.kernel_t[...][:, cols])
        else:
            self.kernel.set_value(self.kernel[...][cols, :])


def norm_param(dim, cfg: WanConfig, value=1.0, shape=None):
    return nnx.Param(jnp.full(shape or (dim,), value, dtype_of(cfg.norm_dtype)))


class Attention(nnx.Module):
    """q/k/v/o projections with q/k RMSNorm over the full width (shared by self- and cross-attention)."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.q = Linear(cfg.dim, cfg.dim, cfg, rngs, fp8=cfg.fp8)
        self.k = Linear(cfg.dim, cfg.dim, cfg, rngs, fp8=cfg.fp8)
        self.v = Linear(cfg.dim, cfg.dim, cfg, rngs, fp8=cfg.fp8)
        self.o = Linear(cfg.dim, cfg.dim, cfg, rngs, fp8=cfg.fp8)
        self.norm_q = norm_param(cfg.dim, cfg)
        self.norm_k = norm_param(cfg.dim, cfg)


class SelfAttention(Attention):

    def qkv(self, x, cos, sin):
        """q, k (RMSNorm over the full width, then RoPE) and v, each [B, L, H, D]."""
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        b, l, _ = x.shape
        heads = lambda y: y.reshape(b, l, cfg.num_heads, cfg.head_dim)
        q = heads(rms_norm(self.q(x), self.norm_q[...], cfg.eps, dt))
        k = heads(rms_norm(self.k(x), self.norm_k[...], cfg.eps, dt))
        v = heads(self.v(x))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x, rope, groups, call: ChunkCall, step: ChunkStep, layer: int):
        """x [B, L, dim]; rope (cos, sin); groups: this layer's GroupKV. -> (out, groups, probe output or None)."""
        b, l, _ = x.shape
        q, k, v = self.qkv(x, *rope)
        starts = itertools.accumulate((g.num_heads for g in groups), initial=0)
        heads = [slice(h0, h0 + g.num_heads) for h0, g in zip(starts, groups)]
        groups = tuple(g.write(k[:, :, s], v[:, :, s], step.frame_start) for g, s in zip(groups, heads))
        end = step.frame_start + l // groups[0].tokens_per_frame
        out = grouped_attention(q, tuple((g.k, g.v, g.valid_tokens(end)) for g in groups), impl=call.impl)
        probed = None if call.probe is None else call.probe(layer, q, groups, step)
        groups = tuple(g.keep_newest(k[:, :, s], v[:, :, s], step.is_refresh) for g, s in zip(groups, heads))
        return self.o(out.reshape(b, l, -1)), groups, probed


class CrossAttention(Attention):

    def text_kv(self, context):
        """K/V of the text context [B, Lt, dim]; computed once per prompt."""
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        b, lt, _ = context.shape
        k = rms_norm(self.k(context), self.norm_k[...], cfg.eps, dt).reshape(b, lt, cfg.num_heads, cfg.head_dim)
        v = self.v(context).reshape(b, lt, cfg.num_heads, cfg.head_dim)
        return k, v

    def __call__(self, x, kv, impl):
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        b, l, _ = x.shape
        q = rms_norm(self.q(x), self.norm_q[...], cfg.eps, dt).reshape(b, l, cfg.num_heads, cfg.head_dim)
        return self.o(attention(q, kv[0], kv[1], impl=impl).reshape(b, l, -1))


class Block(nnx.Module):
    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.modulation = norm_param(cfg.dim, cfg, 0.0, (6, cfg.dim))
        self.self_attn = SelfAttention(cfg, rngs)
        self.cross_attn = CrossAttention(cfg, rngs)
        self.norm3_weight = norm_param(cfg.dim, cfg)
        self.norm3_bias = norm_param(cfg.dim, cfg, 0.0)
        self.ffn_in = Linear(cfg.dim, cfg.ffn_dim, cfg, rngs, fp8=cfg.fp8)
        self.ffn_out = Linear(cfg.ffn_dim, cfg.dim, cfg, rngs, fp8=cfg.fp8)

    def __call__(self, x, e0, text_kv, rope, groups, call: ChunkCall, step: ChunkStep, layer: int):
        """x [B, L, dim] fp32 residual stream; e0 [B, F, 6, dim] per-frame modulation."""
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        b, l, d = x.shape
        f = e0.shape[1]
        e = self.modulation[...].astype(jnp.float32)[None, None] + e0  # [B, F, 6, dim]
        per_frame = lambda y: y.reshape(b, f, l // f, d)
        modulate = lambda y, shift, scale: (per_frame(y) * (1 + e[:, :, scale, None]) + e[:, :, shift, None])

        h = modulate(layer_norm(x, cfg.eps), 0, 1).reshape(b, l, d).astype(dt)
        y, groups, probed = self.self_attn(h, rope, groups, call, step, layer)
        x = x + (per_frame(y.astype(jnp.float32)) * e[:, :, 2, None]).reshape(b, l, d)

        h = layer_norm(x, cfg.eps, self.norm3_weight[...], self.norm3_bias[...]).astype(dt)
        x = x + self.cross_attn(h, text_kv, call.impl).astype(jnp.float32)

        h = modulate(layer_norm(x, cfg.eps), 3, 4).reshape(b, l, d).astype(dt)
        y = self.ffn_out(gelu_tanh(self.ffn_in(h)))
        x = x + (per_frame(y.astype(jnp.float32)) * e[:, :, 5, None]).reshape(b, l, d)
        return x, groups, probed


class WanDiT(nnx.Module):
    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        if cfg.patch[0] != 1:
            raise ValueError("the causal model modulates per latent frame and needs a temporal patch of 1.")
        self.cfg = cfg
        patch_dim = math.prod(cfg.patch)
        self.patch_embedding = Linear(patch_dim * cfg.in_channels, cfg.dim, cfg, rngs)
        self.text_embedding_1 = Linear(cfg.text_dim, cfg.dim, cfg, rngs)
        self.text_embedding_2 = Linear(cfg.dim, cfg.dim, cfg, rngs)
        fp32 = cfg.norm_dtype
        self.time_embedding_1 = Linear(cfg.freq_dim, cfg.dim, cfg, rngs, param_dtype=fp32)
        self.time_embedding_2 = Linear(cfg.dim, cfg.dim, cfg, rngs, param_dtype=fp32)
        self.time_projection = Linear(cfg.dim, 6 * cfg.dim, cfg, rngs, param_dtype=fp32)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.head_modulation = norm_param(cfg.dim, cfg, 0.0, (2, cfg.dim))
        self.head = Linear(cfg.dim, patch_dim * cfg.out_channels, cfg, rngs)

    # -- text ---------------------------------------------------------------------------------------
    def text_kv(self, context):
        """Per-layer cross-attention K/V of a text context [B, Lt, text_dim] (zero-padded to text_len)."""
        ctx = self.text_embedding_2(gelu_tanh(self.text_embedding_1(context)))
        return tuple(blk.cross_attn.text_kv(ctx) for blk in self.blocks)

    # -- time ---------------------------------------------------------------------------------------
    def time_embed(self, t):
        """t [B, F] -> e [B, F, dim] and the per-block modulation e0 [B, F, 6, dim], fp32."""
        sin = timestep_sinusoid(t, self.cfg.freq_dim)
        # fp32 matmuls: the time embedding must resolve timesteps ~1 apart at t ~ 1000.
        lin = lambda layer, x: x @ layer.kernel[...].astype(jnp.float32) + layer.bias[...].astype(jnp.float32)
        e = lin(self.time_embedding_2, jax.nn.silu(lin(self.time_embedding_1, sin)))
        e0 = lin(self.time_projection, jax.nn.silu(e))
        return e, e0.reshape(*t.shape, 6, self.cfg.dim)

    # -- patches ------------------------------------------------------------------------------------
    def patchify(self, x):
        b, f, h, w, c = x.shape
        _, ph, pw = self.cfg.patch
        x = x.reshape(b, f, h // ph, ph, w // pw, pw, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, f * (h // ph) * (w // pw), ph * pw * c)

    def unpatchify(self, y, f, h, w):
        b = y.shape[0]
        _, ph, pw = self.cfg.patch
        c = self.cfg.out_channels
        y = y.reshape(b, f, h // ph, w // pw, ph, pw, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return y.reshape(b, f, h, w, c)

    # -- forward ------------------------------------------------------------------------------------
    def __call__(self, x, t, text_kv, cache: KVCache, rope: RopeTables, step: ChunkStep,
                 call: ChunkCall = ChunkCall()):
        """x [B, F, H, W, C], t [B, F] -> (flow [B, F, H, W, C] fp32, updated cache, probe outputs or None)."""
        cfg = self.cfg
        b, f, h, w, _ = x.shape
        _, ph, pw = cfg.patch
        if h % ph or w % pw:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch {ph}x{pw}.")
        tpf = (h // ph) * (w // pw)
        if tpf != cache.layout.tokens_per_frame:
            raise ValueError(f"latent {h}x{w} gives {tpf} tokens per frame; the cache layout was made for "
                             f"{cache.layout.tokens_per_frame}.")
        rope_cs = rope_cos_sin(rope, step.frame_start, f, h // ph, w // pw)
        e, e0 = self.time_embed(t)
        xs = self.patch_embedding(self.patchify(x)).astype(jnp.float32)
        new_layers, probed = [], []
        for i, (blk, kv, groups) in enumerate(zip(self.blocks, text_kv, cache.layers)):
            with jax.named_scope("block"):
                xs, groups, p = blk(xs, e0, kv, rope_cs, groups, call, step, i)
            new_layers.append(groups)
            probed.append(p)
        mod = self.head_modulation[...].astype(jnp.float32)[None, None] + e[:, :, None]  # [B, F, 2, dim]
        hs = layer_norm(xs, cfg.eps).reshape(b, f, tpf, cfg.dim) * (1 + mod[:, :, 1, None]) + mod[:, :, 0, None]
        out = self.head(hs.reshape(b, f * tpf, cfg.dim).astype(dtype_of(cfg.dtype)))
        probed = None if call.probe is None else jnp.stack(probed)
        cache = dataclasses.replace(cache, layers=tuple(new_layers))
        return self.unpatchify(out.astype(jnp.float32), f, h, w), cache, probed
