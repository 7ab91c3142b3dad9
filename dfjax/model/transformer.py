"""The causal, KV-cached Wan2.1 text-to-video DiT in Flax NNX (reference.md §1).

Latents are channels-last [B, F, H, W, C]. One call denoises one chunk of latent frames: it writes
the chunk's self-attention K/V into the cache (dfjax.cache) and attends to everything the cache's
layout keeps. With an empty global cache and frame_start=0, a call is the ordinary bidirectional
forward of the whole clip. Each latent frame carries its own timestep.

Parameter dtypes: linear weights in `param_dtype`; norm weights, modulation tables and the time
embedding in `norm_dtype` (fp32). The residual stream stays fp32; matmuls run in `dtype`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dfjax.cache import AttentionLayout, refresh_packed, write_chunk
from dfjax.config import WanConfig, dtype_of
from dfjax.dummy.scores import frame_attention_scores
from dfjax.model.rope import RopeTables, apply_rope, rope_cos_sin
from dfjax.kernels.attention import attention, grouped_attention


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
    """y = x @ kernel + bias with the kernel in param_dtype and the matmul in dtype."""

    def __init__(self, din, dout, cfg: WanConfig, rngs: nnx.Rngs, param_dtype=None):
        pd = dtype_of(param_dtype or cfg.param_dtype)
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (din, dout), pd) * (1.0 / math.sqrt(din)))
        self.bias = nnx.Param(jnp.zeros((dout,), pd))
        self.dtype = dtype_of(cfg.dtype)

    def __call__(self, x):
        # The matmul accumulates in fp32 on every backend but writes `dtype`: an fp32 output would be
        # written to memory and read back by the bias/activation fusion (twice the bytes), and the
        # bias (and GELU) can then fold into the GEMM's epilogue.
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), preferred_element_type=self.dtype)
        return y + self.bias[...].astype(self.dtype)


def norm_param(dim, cfg: WanConfig, value=1.0, shape=None):
    return nnx.Param(jnp.full(shape or (dim,), value, dtype_of(cfg.norm_dtype)))


class Attention(nnx.Module):
    """q/k/v/o projections with q/k RMSNorm over the full width (shared by self- and cross-attention)."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.q = Linear(cfg.dim, cfg.dim, cfg, rngs)
        self.k = Linear(cfg.dim, cfg.dim, cfg, rngs)
        self.v = Linear(cfg.dim, cfg.dim, cfg, rngs)
        self.o = Linear(cfg.dim, cfg.dim, cfg, rngs)
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

    def __call__(self, x, cos, sin, layer_cache, layer_layout, frame_start, is_refresh, tokens_per_frame, impl,
                 score_order=None, score_rows=None, score_now=None):
        b, l, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        num_frames = l // tokens_per_frame
        groups, h0 = [], 0
        for (ck, cv), g in zip(layer_cache, layer_layout):
            sl = slice(h0, h0 + g.num_heads)
            h0 += g.num_heads
            ck = write_chunk(ck, k[:, :, sl], frame_start, g, tokens_per_frame)
            cv = write_chunk(cv, v[:, :, sl], frame_start, g, tokens_per_frame)
            kv_len = (g.valid_frames(frame_start + num_frames) * tokens_per_frame).astype(jnp.int32)
            groups.append((ck, cv, kv_len))
        out = grouped_attention(q, tuple(groups), impl=impl)
        scores = None
        if score_order is not None:  # Dummy Forcing's frame attention scores, keys in frame order
            def score():
                keys = groups[0][0][:, score_order]
                return frame_attention_scores(q, keys, len(score_order), tokens_per_frame, l, score_rows)

            no_score = lambda: jnp.zeros((self.cfg.num_heads, 3), jnp.float32)
            scores = score() if score_now is None else jax.lax.cond(score_now, score, no_score)
        new_cache, h0 = [], 0
        for (ck, cv, _), g in zip(groups, layer_layout):
            sl = slice(h0, h0 + g.num_heads)
            h0 += g.num_heads
            new_cache.append((refresh_packed(ck, k[:, :, sl], is_refresh, g, tokens_per_frame),
                              refresh_packed(cv, v[:, :, sl], is_refresh, g, tokens_per_frame)))
        return self.o(out.reshape(b, l, -1)), tuple(new_cache), scores


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
        self.ffn_in = Linear(cfg.dim, cfg.ffn_dim, cfg, rngs)
        self.ffn_out = Linear(cfg.ffn_dim, cfg.dim, cfg, rngs)

    def __call__(self, x, e0, text_kv, cos, sin, layer_cache, layer_layout, frame_start, is_refresh,
                 tokens_per_frame, impl, score_order=None, score_rows=None, score_now=None):
        """x [B, L, dim] fp32 residual stream; e0 [B, F, 6, dim] per-frame modulation."""
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        b, l, d = x.shape
        f = e0.shape[1]
        e = self.modulation[...].astype(jnp.float32)[None, None] + e0  # [B, F, 6, dim]
        per_frame = lambda y: y.reshape(b, f, l // f, d)
        modulate = lambda y, shift, scale: (per_frame(y) * (1 + e[:, :, scale, None]) + e[:, :, shift, None])

        h = modulate(layer_norm(x, cfg.eps), 0, 1).reshape(b, l, d).astype(dt)
        y, layer_cache, scores = self.self_attn(h, cos, sin, layer_cache, layer_layout, frame_start, is_refresh,
                                                tokens_per_frame, impl, score_order, score_rows, score_now)
        x = x + (per_frame(y.astype(jnp.float32)) * e[:, :, 2, None]).reshape(b, l, d)

        h = layer_norm(x, cfg.eps, self.norm3_weight[...], self.norm3_bias[...]).astype(dt)
        x = x + self.cross_attn(h, text_kv, impl).astype(jnp.float32)

        h = modulate(layer_norm(x, cfg.eps), 3, 4).reshape(b, l, d).astype(dt)
        y = self.ffn_out(gelu_tanh(self.ffn_in(h)))
        x = x + (per_frame(y.astype(jnp.float32)) * e[:, :, 5, None]).reshape(b, l, d)
        return x, layer_cache, scores


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
    def __call__(self, x, t, text_kv, cache, layout: AttentionLayout, rope: RopeTables, frame_start,
                 is_refresh=False, impl="auto", score_order=None, score_rows=None, score_now=None):
        """x [B, F, H, W, C], t [B, F] -> (flow [B, F, H, W, C] fp32, updated cache, scores).

        With score_order (token indices of a single-group cache in [sink ; neighbour ; chunk] frame
        order) the call also returns Dummy Forcing's frame attention scores [num_layers, H, 3] for
        the query rows score_rows [num_layers, R] (None: all rows); otherwise scores is None. With
        score_now (a traced bool) the scores are computed only where it is true, zeros elsewhere.
        """
        cfg = self.cfg
        b, f, h, w, _ = x.shape
        _, ph, pw = cfg.patch
        tpf = (h // ph) * (w // pw)
        if tpf != layout.tokens_per_frame:
            raise ValueError(f"latent {h}x{w} gives {tpf} tokens per frame; the cache layout was made for "
                             f"{layout.tokens_per_frame}.")
        if h % ph or w % pw:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch {ph}x{pw}.")
        cos, sin = rope_cos_sin(rope, frame_start, f, h // ph, w // pw)
        e, e0 = self.time_embed(t)
        xs = self.patch_embedding(self.patchify(x)).astype(jnp.float32)
        new_cache, scores = [], []
        for i, (blk, kv, layer_cache, layer_layout) in enumerate(zip(self.blocks, text_kv, cache, layout.layers)):
            rows = None if score_rows is None else score_rows[i]
            with jax.named_scope("block"):
                xs, layer_cache, s = blk(xs, e0, kv, cos, sin, layer_cache, layer_layout, frame_start,
                                         is_refresh, tpf, impl, score_order, rows, score_now)
            new_cache.append(layer_cache)
            scores.append(s)
        mod = self.head_modulation[...].astype(jnp.float32)[None, None] + e[:, :, None]  # [B, F, 2, dim]
        hs = layer_norm(xs, cfg.eps).reshape(b, f, tpf, cfg.dim) * (1 + mod[:, :, 1, None]) + mod[:, :, 0, None]
        out = self.head(hs.reshape(b, f * tpf, cfg.dim).astype(dtype_of(cfg.dtype)))
        scores = None if score_order is None else jnp.stack(scores)
        return self.unpatchify(out.astype(jnp.float32), f, h, w), tuple(new_cache), scores
