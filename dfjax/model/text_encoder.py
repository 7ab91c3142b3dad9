"""UMT5 encoder (the text encoder of Wan2.1) in Flax NNX.

T5 v1.1 layout with UMT5's twist: every layer owns its relative position bias table. Pre-RMSNorm
without mean subtraction, attention without 1/sqrt(d) scaling, gated tanh-GELU feed-forward.
Outputs at padded positions are zero, as the Wan release trims each sequence to its length and the
DiT pads the context back with zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES = ("float32", "bfloat16")  # float16 would need T5's inf clamps; the release runs bf16


@dataclass(frozen=True)
class UMT5Config:
    vocab_size: int = 256384
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512
    param_dtype: str = "bfloat16"
    dtype: str = "bfloat16"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff", "text_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"UMT5Config.{name} must be a positive int, got {value!r}.")
        # Bidirectional buckets: half per direction, half of those exact, the rest log-spaced up to
        # max_distance; so at least 4 buckets, an even count, and max_distance beyond the exact range.
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"UMT5Config.num_buckets must be an even int >= 4, got {self.num_buckets!r}.")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(
                f"UMT5Config.max_distance ({self.max_distance}) must exceed num_buckets // 4 ({self.num_buckets // 4})."
            )
        if not self.eps > 0:
            raise ValueError(f"UMT5Config.eps must be > 0, got {self.eps!r}.")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"UMT5Config.{name} must be one of {DTYPES}, got {getattr(self, name)!r}.")

    @classmethod
    def xxl(cls) -> UMT5Config:
        """google/umt5-xxl's encoder, as shipped with Wan2.1."""
        return cls()

    @classmethod
    def tiny(cls) -> UMT5Config:
        """A few-layer fp32 model for tests and demos; inner width (heads * d_kv) differs from d_model on purpose."""
        return cls(vocab_size=128, d_model=32, num_layers=2, num_heads=4, d_kv=16, d_ff=48,
                   num_buckets=8, max_distance=16, text_len=16, param_dtype="float32", dtype="float32")

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of (key position - query position), [q_len, k_len] int32, computed on the host.

    The log is taken in float32 as the PyTorch references do, so bucket edges round the same way.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    dist = np.abs(rel)
    log_ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
        math.log(max_distance / max_exact)
    )
    large = np.minimum(max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64), half - 1)
    buckets = np.where(rel > 0, half, 0) + np.where(dist < max_exact, dist, large)
    return buckets.astype(np.int32)


class RMSNorm(nnx.Module):
    """T5 LayerNorm: scale only, no mean subtraction, statistics in fp32."""

    def __init__(self, dim: int, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
        inner = cfg.num_heads * cfg.d_kv
        kw = dict(use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        self.q = nnx.Linear(cfg.d_model, inner, **kw)
        self.k = nnx.Linear(cfg.d_model, inner, **kw)
        self.v = nnx.Linear(cfg.d_model, inner, **kw)
        self.o = nnx.Linear(inner, cfg.d_model, **kw)
        # [bucket, head]: this layer's own relative position bias (UMT5 does not share it across layers).
        self.pos_bias = nnx.Param(jax.random.normal(rngs.params(), (cfg.num_buckets, cfg.num_heads), cfg.jnp_param_dtype))
        self.cfg = cfg

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, length, _ = x.shape
        heads = lambda t: t.reshape(b, length, cfg.num_heads, cfg.d_kv)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # No 1/sqrt(d_kv) scaling: T5 folds it into the initialisation. Logits and softmax in fp32.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        buckets = relative_position_buckets(length, length, cfg.num_buckets, cfg.max_distance)
        bias = self.pos_bias[...].astype(jnp.float32)[buckets]  # [q, k, head]
        logits = logits + jnp.transpose(bias, (2, 0, 1))[None]
        # A finite fill keeps a fully padded row finite (uniform weights) instead of NaN.
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(cfg.jnp_dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.o(out.reshape(b, length, cfg.num_heads * cfg.d_kv))


class GatedGeluFFN(nnx.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        self.wi_0 = nnx.Linear(cfg.d_model, cfg.d_ff, **kw)
        self.wi_1 = nnx.Linear(cfg.d_model, cfg.d_ff, **kw)
        self.wo = nnx.Linear(cfg.d_ff, cfg.d_model, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class Block(nnx.Module):
    def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
        norm = dict(dim=cfg.d_model, eps=cfg.eps, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype)
        self.norm1 = RMSNorm(**norm)
        self.attn = SelfAttention(cfg, rngs)
        self.norm2 = RMSNorm(**norm)
        self.ffn = GatedGeluFFN(cfg, rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nnx.Module):
    def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs
        )
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.eps, cfg.jnp_dtype, cfg.jnp_param_dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """ids [B, L] int32, mask [B, L] (nonzero = real token) -> [B, L, d_model], zero at padded positions."""
        key_mask = mask.astype(bool)
        x = self.token_embedding(ids)
        for i, block in enumerate(self.blocks):
            with jax.named_scope(f"block_{i}"):
                x = block(x, key_mask)
        x = self.norm(x)
        return jnp.where(key_mask[..., None], x, jnp.zeros((), x.dtype))
