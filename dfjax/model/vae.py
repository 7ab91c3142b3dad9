"""The Wan2.1 causal 3D VAE in Flax NNX, channels-last (B, T, H, W, C).

Every 3x3x3 conv is causal in time: its input is preceded by the last two input frames of the
previous call (zeros at the start of a video). Carrying those frames between calls in a
`DecoderCache` makes chunk-by-chunk decoding equal to decoding the whole video, one latent frame
at a time, as the release does. A chunk of T latent frames is decoded in one batched pass.

The first latent frame is special (the release's 'Rep' path): the temporal upsamplers pass it
through as one frame, and their time convs see the sequence from the second frame on. So N latent
frames give 4N-3 pixel frames, and the first chunk compiles apart from the later ones.

Latents are normalised per channel: encode returns (mu - mean) / std, decode takes z * std + mean.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial, wraps

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = ("float32", "bfloat16")

# Per-channel latent statistics of the Wan2.1 VAE (the release and diffusers' AutoencoderKLWan).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class WanVAEConfig:
    z_dim: int = 16
    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder stage; the decoder mirrors it
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    with_encoder: bool = True  # False: a decode-only model (no encoder parameters at all)
    param_dtype: str = "bfloat16"
    dtype: str = "bfloat16"  # conv / attention compute and the decoder cache; norms and softmax run in fp32

    def __post_init__(self):
        # JSON gives lists: store tuples so that the config stays hashable (a static jit argument).
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("z_dim", "base_dim", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"WanVAEConfig.{name} must be a positive int, got {value!r}.")
        if len(self.dim_mult) < 2 or not all(isinstance(m, int) and m > 0 for m in self.dim_mult):
            raise ValueError(f"WanVAEConfig.dim_mult must be >= 2 positive ints, got {self.dim_mult!r}.")
        if any(self.base_dim * m % 2 for m in self.dim_mult):
            raise ValueError("WanVAEConfig: every width base_dim * dim_mult[i] must be even (upsamplers halve it).")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig.temporal_downsample needs {len(self.dim_mult) - 1} entries (one per "
                f"downsampling stage), got {self.temporal_downsample!r}."
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"WanVAEConfig.latents_mean and latents_std need z_dim = {self.z_dim} values each.")
        if not all(s > 0 for s in self.latents_std):
            raise ValueError("WanVAEConfig.latents_std must be > 0.")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"WanVAEConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}.")

    @classmethod
    def wan21(cls) -> WanVAEConfig:
        """The Wan2.1 VAE (Wan2.1_VAE.pth, 127M parameters)."""
        return cls()

    @classmethod
    def tiny(cls, **kw) -> WanVAEConfig:
        """The Wan2.1 structure at width 8, fp32: for tests and demos."""
        return cls(**{**dict(base_dim=8, param_dtype="float32", dtype="float32"), **kw})

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return self.temporal_downsample[::-1]

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def num_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from `latent_frames` latent frames (4N-3 for Wan2.1)."""
        return self.temporal_factor * (latent_frames - 1) + 1


# ---------------------------------------------------------------- layers

def _precision(dtype):
    # fp32 is the reference path: keep it exact on GPUs too (no TF32).
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _conv(x, kernel, bias, strides, padding, dtype):
    """NDHWC x DHWIO conv in `dtype`; padding is explicit per spatial-temporal axis."""
    y = jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        window_strides=strides,
        padding=padding,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=_precision(dtype),
    )
    return y + bias.astype(dtype)


def _kernel(rngs, shape, cfg):
    return nnx.initializers.lecun_normal()(rngs.params(), shape, jnp.dtype(cfg.param_dtype))


class CausalConv3d(nnx.Module):
    """A conv with kernel (kt, kh, kw), kt > 1: causal in time (its cache holds the kt-1 frames before x), 'same'
    in space."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_kernel(rngs, (*kernel, cin, cout), cfg))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.dtype(cfg.param_dtype)))
        self.cin = cin
        self.cache_frames = kernel[0] - 1
        self.dtype = jnp.dtype(cfg.dtype)

    def init_cache(self, batch: int, h: int, w: int) -> jax.Array:
        return jnp.zeros((batch, self.cache_frames, h, w, self.cin), self.dtype)

    def __call__(self, x, cache=None):
        """x [B, T, H, W, Cin], cache: the previous call's last kt-1 input frames (None: start of the video).

        Returns (y [B, T, H, W, Cout], the new cache).
        """
        if cache is None:
            cache = self.init_cache(x.shape[0], x.shape[2], x.shape[3])
        x = jnp.concatenate([cache, x.astype(self.dtype)], axis=1)
        return self.valid(x), x[:, x.shape[1] - self.cache_frames :]

    def valid(self, x, time_stride: int = 1):
        """The conv without time padding (the encoder's strided time convs)."""
        kh, kw = self.kernel.shape[1:3]
        pad = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
        return _conv(x, self.kernel[...], self.bias[...], (time_stride, 1, 1), pad, self.dtype)


class FrameConv(nnx.Module):
    """A torch Conv2d (kernel HWIO) applied to every frame, as a 3D conv with a time kernel of 1."""

    def __init__(self, cin: int, cout: int, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_kernel(rngs, (3, 3, cin, cout), cfg))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.dtype(cfg.param_dtype)))
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x, stride: int, padding: tuple[tuple[int, int], tuple[int, int]]):
        return _conv(x, self.kernel[None], self.bias[...], (1, stride, stride), ((0, 0), *padding), self.dtype)


class Pointwise(nnx.Module):
    """A 1x1(x1) conv as a matmul over channels. The kernel keeps the torch conv's rank, (1,)*spatial_rank +
    (Cin, Cout), so that checkpoints map with the plain conv transposes."""

    def __init__(self, cin: int, cout: int, spatial_rank: int, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_kernel(rngs, (1,) * spatial_rank + (cin, cout), cfg))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.dtype(cfg.param_dtype)))
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):
        w = self.kernel[...].reshape(self.kernel.shape[-2:]).astype(self.dtype)
        y = jnp.einsum("...c,cd->...d", x.astype(self.dtype), w, precision=_precision(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """x / ||x|| over channels * sqrt(C) * gamma (torch F.normalize, eps 1e-12), in fp32.
    No bias: every RMS_norm of the Wan2.1 VAE has bias=False."""

    def __init__(self, dim: int, *, cfg: WanVAEConfig):
        self.gamma = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)))
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), 1e-24))
        scale = math.sqrt(xf.shape[-1]) * self.gamma[...].astype(jnp.float32)
        return (xf * inv * scale).astype(self.dtype)


class ResBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cin, cfg=cfg)
        self.conv1 = CausalConv3d(cin, cout, (3, 3, 3), cfg=cfg, rngs=rngs)
        self.norm2 = RMSNorm(cout, cfg=cfg)
        self.conv2 = CausalConv3d(cout, cout, (3, 3, 3), cfg=cfg, rngs=rngs)
        self.shortcut = Pointwise(cin, cout, 3, cfg=cfg, rngs=rngs) if cin != cout else None

    def init_cache(self, batch, h, w):
        return {"conv1": self.conv1.init_cache(batch, h, w), "conv2": self.conv2.init_cache(batch, h, w)}

    def __call__(self, x, cache=None):
        cache = cache or {"conv1": None, "conv2": None}
        skip = x if self.shortcut is None else self.shortcut(x)
        x, c1 = self.conv1(jax.nn.silu(self.norm1(x)), cache["conv1"])
        x, c2 = self.conv2(jax.nn.silu(self.norm2(x)), cache["conv2"])
        return x + skip, {"conv1": c1, "conv2": c2}


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time).

    The queries go in blocks so that no block's logits exceed `max_logits` elements: a 1080P frame has
    32640 latent pixels, and one [32640, 32640] fp32 logits matrix per frame (12.8 GB for a chunk of
    three) is what made the 1080P decode compile and run slowly. Each query row's softmax is its own,
    so blocking the queries changes no result.
    """

    max_logits = 2**28  # elements of one query block's fp32 logits (1 GiB); 480P stays one block

    def __init__(self, dim: int, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, cfg=cfg)
        self.to_qkv = Pointwise(dim, 3 * dim, 2, cfg=cfg, rngs=rngs)
        self.proj = Pointwise(dim, dim, 2, cfg=cfg, rngs=rngs)

    def __call__(self, x):
        b, t, h, w, c = x.shape
        n = h * w
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, n, 3, c)  # channels are [q | k | v]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        prec = _precision(q.dtype)

        def attend(q):  # q [b*t, m, c] -> [b*t, m, c]
            logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=prec, preferred_element_type=jnp.float32)
            p = jax.nn.softmax(logits / math.sqrt(c), axis=-1).astype(v.dtype)
            return jnp.einsum("bqk,bkc->bqc", p, v, precision=prec)

        blocks = -(-b * t * n * n // self.max_logits)
        if blocks == 1:
            o = attend(q)
        else:  # equal blocks of queries, the last padded; one compiled body in a loop
            size = -(-n // blocks)
            qb = jnp.pad(q, ((0, 0), (0, blocks * size - n), (0, 0))).reshape(b * t, blocks, size, c)
            o = jax.lax.map(attend, qb.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
            o = o.reshape(b * t, blocks * size, c)[:, :n]
        return x + self.proj(o.reshape(b, t, h, w, c))


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResBlock(dim, dim, cfg=cfg, rngs=rngs) for _ in range(2)])
        self.attention = AttentionBlock(dim, cfg=cfg, rngs=rngs)

    def init_cache(self, batch, h, w):
        return {"resnets": [r.init_cache(batch, h, w) for r in self.resnets]}

    def __call__(self, x, cache=None):
        c0, c1 = cache["resnets"] if cache else (None, None)
        x, c0 = self.resnets[0](x, c0)
        x, c1 = self.resnets[1](self.attention(x), c1)
        return x, {"resnets": [c0, c1]}


# ---------------------------------------------------------------- decoder

class Upsample(nnx.Module):
    """x2 in time (optional: a causal time conv to 2C channels, interleaved), then x2 nearest in space and a
    3x3 conv to dim // 2 channels."""

    def __init__(self, dim: int, temporal: bool, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), cfg=cfg, rngs=rngs) if temporal else None
        self.conv = FrameConv(dim, dim // 2, cfg=cfg, rngs=rngs)

    def __call__(self, x, cache, first: bool):
        if self.time_conv is not None:
            x, cache = self._upsample_time(x, cache, first)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # torch 'nearest-exact' at an integer factor
        return self.conv(x, 1, ((1, 1), (1, 1))), cache

    def _upsample_time(self, x, cache, first):
        # The video's first frame stays one frame and is not part of the time conv's sequence.
        head, rest = (x[:, :1], x[:, 1:]) if first else (x[:, :0], x)
        if rest.shape[1] == 0:
            return head, cache
        y, cache = self.time_conv(rest, cache)
        b, t, h, w, c2 = y.shape
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
        return jnp.concatenate([head.astype(y.dtype), y], axis=1), cache


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, upsample: str | None, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        dims = [cin] + [cout] * (cfg.num_res_blocks + 1)
        self.resnets = nnx.List([ResBlock(i, o, cfg=cfg, rngs=rngs) for i, o in zip(dims[:-1], dims[1:])])
        self.upsampler = None if upsample is None else Upsample(cout, upsample == "3d", cfg=cfg, rngs=rngs)

    def init_cache(self, batch, h, w):
        cache = {"resnets": [r.init_cache(batch, h, w) for r in self.resnets]}
        if self.upsampler is not None and self.upsampler.time_conv is not None:
            cache["time_conv"] = self.upsampler.time_conv.init_cache(batch, h, w)
        return cache

    def __call__(self, x, cache, first: bool):
        new = {"resnets": []}
        for resnet, c in zip(self.resnets, cache["resnets"]):
            x, c = resnet(x, c)
            new["resnets"].append(c)
        if self.upsampler is not None:
            x, c = self.upsampler(x, cache.get("time_conv"), first)
            if "time_conv" in cache:
                new["time_conv"] = c
        return x, new


@partial(jax.tree_util.register_dataclass, data_fields=["frames"], meta_fields=["started"])
@dataclass(frozen=True)
class DecoderCache:
    """What the decoder carries from one chunk to the next: the last input frames of every causal conv.

    frames: nested like the decoder's modules, each leaf [B, 2, h, w, C] in the compute dtype; shapes never
    change, so the cache can be donated. started: static; False until the first chunk is decoded (the first
    chunk has the 'Rep' first frame and 4T-3 output frames, later chunks 4T), so jit compiles two versions.
    """

    frames: dict
    started: bool = field(default=False)


class WanDecoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        widths = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        self.post_quant_conv = Pointwise(cfg.z_dim, cfg.z_dim, 3, cfg=cfg, rngs=rngs)
        self.conv_in = CausalConv3d(cfg.z_dim, widths[0], (3, 3, 3), cfg=cfg, rngs=rngs)
        self.mid_block = MidBlock(widths[0], cfg=cfg, rngs=rngs)
        blocks = []
        last = len(cfg.dim_mult) - 1
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            cin = cin if i == 0 else cin // 2  # each upsampler halves the width
            upsample = None if i == last else ("3d" if cfg.temporal_upsample[i] else "2d")
            blocks.append(UpBlock(cin, cout, upsample, cfg=cfg, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(widths[-1], cfg=cfg)
        self.conv_out = CausalConv3d(widths[-1], 3, (3, 3, 3), cfg=cfg, rngs=rngs)

    def init_cache(self, batch: int, latent_h: int, latent_w: int) -> DecoderCache:
        h, w = latent_h, latent_w
        up = []
        for block in self.up_blocks:
            up.append(block.init_cache(batch, h, w))
            if block.upsampler is not None:
                h, w = 2 * h, 2 * w
        frames = {
            "conv_in": self.conv_in.init_cache(batch, latent_h, latent_w),
            "mid_block": self.mid_block.init_cache(batch, latent_h, latent_w),
            "up_blocks": up,
            "conv_out": self.conv_out.init_cache(batch, h, w),
        }
        return DecoderCache(frames, started=False)

    def __call__(self, z, cache: DecoderCache):
        """z [B, T, h, w, z_dim] normalised latents -> (pixels [B, 4T-3 (first chunk) or 4T, 8h, 8w, 3] in [-1, 1],
        the cache for the next chunk)."""
        cfg = self.cfg
        want = cache.frames["conv_in"].shape
        if z.ndim != 5 or z.shape[-1] != cfg.z_dim or (z.shape[0], *z.shape[2:4]) != (want[0], *want[2:4]):
            raise ValueError(
                f"latents {z.shape} do not fit the cache (batch {want[0]}, latent {want[2]}x{want[3]}, "
                f"{cfg.z_dim} channels); make the cache with init_decoder_cache for this size."
            )
        step = self.frames_per_pass(*z.shape[2:4])
        pieces = []
        for start in range(0, z.shape[1], step):
            pixels, cache = self._decode(z[:, start : start + step], cache)
            pieces.append(pixels)
        return jnp.concatenate(pieces, axis=1), cache

    # cuDNN's convolutions index with 32-bit integers: a tensor of 2^31 elements or more gets slow fallback
    # kernels (a 1080P chunk of 12 frames is 4.8e9 elements at the last upsampler; autotuning its first decode
    # took 159 s and more). So a chunk is decoded a few latent frames at a time, as the release decodes one:
    # the causal caches make that exact.
    max_elements = 2**31 - 1

    def frames_per_pass(self, latent_h: int, latent_w: int) -> int:
        """Latent frames per pass such that the largest full-resolution tensors stay under max_elements: the
        last upsampler's input (the width before it, at full size) and the causal convs after it (two cache
        frames more)."""
        f, pixels = self.cfg.temporal_factor, latent_h * latent_w * self.cfg.spatial_factor**2
        wide, last = self.up_blocks[-2].resnets[-1].conv2.cin, self.conv_out.cin
        fits = lambda s: max(f * s * pixels * wide, (f * s + 2) * pixels * last) <= self.max_elements
        if not fits(1):
            warnings.warn(f"a {latent_h}x{latent_w} latent frame gives tensors over 2^31 elements even one at a time: "
                          "the VAE decode will compile and run slowly (cuDNN's fallback kernels).")
        return next((s for s in range(64, 1, -1) if fits(s)), 1)

    def _decode(self, z, cache: DecoderCache):
        cfg = self.cfg
        first = not cache.started
        frames = cache.frames
        mean = jnp.asarray(cfg.latents_mean, jnp.float32)
        std = jnp.asarray(cfg.latents_std, jnp.float32)
        x = self.post_quant_conv(z.astype(jnp.float32) * std + mean)
        x, c_in = self.conv_in(x, frames["conv_in"])
        with jax.named_scope("mid_block"):
            x, c_mid = self.mid_block(x, frames["mid_block"])
        c_up = []
        for i, (block, c) in enumerate(zip(self.up_blocks, frames["up_blocks"])):
            with jax.named_scope(f"up_block_{i}"):
                x, c = block(x, c, first)
            c_up.append(c)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), frames["conv_out"])
        new = DecoderCache({"conv_in": c_in, "mid_block": c_mid, "up_blocks": c_up, "conv_out": c_out}, started=True)
        return jnp.clip(x, -1.0, 1.0), new


# ---------------------------------------------------------------- encoder

class Downsample(nnx.Module):
    """/2 in space (pad right/bottom, 3x3 stride-2 conv), then optionally /2 in time."""

    def __init__(self, dim: int, temporal: bool, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.conv = FrameConv(dim, dim, cfg=cfg, rngs=rngs)
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), cfg=cfg, rngs=rngs) if temporal else None

    def __call__(self, x):
        x = self.conv(x, 2, ((0, 1), (0, 1)))
        if self.time_conv is None or x.shape[1] == 1:
            return x
        # The first frame passes alone; then stride-2 windows over frames (0,1,2), (2,3,4), ... (1+2m -> 1+m).
        return jnp.concatenate([x[:, :1], self.time_conv.valid(x, time_stride=2)], axis=1)


class DownBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, downsample: str | None, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        dims = [cin] + [cout] * cfg.num_res_blocks
        self.resnets = nnx.List([ResBlock(i, o, cfg=cfg, rngs=rngs) for i, o in zip(dims[:-1], dims[1:])])
        self.downsampler = None if downsample is None else Downsample(cout, downsample == "3d", cfg=cfg, rngs=rngs)

    def __call__(self, x):
        for resnet in self.resnets:
            x, _ = resnet(x)
        return x if self.downsampler is None else self.downsampler(x)


class WanEncoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        widths = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(3, widths[0], (3, 3, 3), cfg=cfg, rngs=rngs)
        last = len(cfg.dim_mult) - 1
        self.down_blocks = nnx.List([
            DownBlock(cin, cout, None if i == last else ("3d" if cfg.temporal_downsample[i] else "2d"), cfg=cfg, rngs=rngs)
            for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]))
        ])
        self.mid_block = MidBlock(widths[-1], cfg=cfg, rngs=rngs)
        self.norm_out = RMSNorm(widths[-1], cfg=cfg)
        self.conv_out = CausalConv3d(widths[-1], 2 * cfg.z_dim, (3, 3, 3), cfg=cfg, rngs=rngs)
        self.quant_conv = Pointwise(2 * cfg.z_dim, 2 * cfg.z_dim, 3, cfg=cfg, rngs=rngs)

    def __call__(self, x):
        """x [B, 1 + 4k, H, W, 3] in [-1, 1], H and W multiples of 8 -> (mu, logvar), each [B, 1 + k, H/8, W/8, z_dim].

        mu is normalised, (mu_raw - mean) / std; logvar is that of the normalised latent (logvar_raw - 2 log std),
        so mu + exp(logvar / 2) * eps samples the latent space the DiT sees.
        """
        cfg = self.cfg
        t, h, w = x.shape[1:4] if x.ndim == 5 else (0, 0, 0)
        if x.ndim != 5 or x.shape[-1] != 3 or (t - 1) % cfg.temporal_factor or h % cfg.spatial_factor or w % cfg.spatial_factor:
            raise ValueError(
                f"pixels {x.shape}: expected [B, 1 + {cfg.temporal_factor}k, H, W, 3] with H and W multiples of "
                f"{cfg.spatial_factor}."
            )
        x, _ = self.conv_in(x)
        for i, block in enumerate(self.down_blocks):
            with jax.named_scope(f"down_block_{i}"):
                x = block(x)
        with jax.named_scope("mid_block"):
            x, _ = self.mid_block(x)
        x, _ = self.conv_out(jax.nn.silu(self.norm_out(x)))
        mu, logvar = jnp.split(self.quant_conv(x).astype(jnp.float32), 2, axis=-1)
        std = jnp.asarray(cfg.latents_std, jnp.float32)
        return (mu - jnp.asarray(cfg.latents_mean, jnp.float32)) / std, logvar - 2.0 * jnp.log(std)


# ---------------------------------------------------------------- the model and its jitted entry points

class WanVAE(nnx.Module):
    """Flat parameter keys: decoder.*, and encoder.* when cfg.with_encoder."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.decoder = WanDecoder(cfg, rngs=rngs)
        self.encoder = WanEncoder(cfg, rngs=rngs) if cfg.with_encoder else None


class _JitChannelsLast:
    """jax.jit that keeps the 3D convolutions channels-last (NDHWC) on NVIDIA GPUs.

    XLA's layout heuristic gives every 3D convolution NCDHW, and cuDNN then transposes each
    activation to NHWC and back: asking for NHWC took the 480P decode of 81 frames from 0.93 s to
    0.70 s on an H100 (benchmarks/profile_video.py, 2026-11-25). Other backends compile as usual. The
    backend is looked up at the first call, not at import (jax.distributed must initialise first).
    """

    def __init__(self, fn, **jit_kw):
        self.fn, self.jit_kw, self.jitted = fn, jit_kw, {}
        wraps(fn)(self)

    def _jit(self):
        backend = jax.default_backend()
        if backend not in self.jitted:
            options = {"xla_gpu_force_conv_nhwc": True} if backend == "gpu" else None
            self.jitted[backend] = jax.jit(self.fn, compiler_options=options, **self.jit_kw)
        return self.jitted[backend]

    def __call__(self, *args, **kw):
        return self._jit()(*args, **kw)

    def __getattr__(self, name):  # lower, clear_cache, ... of the jitted function
        return getattr(self._jit(), name)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))  # one compiled program per size: ~100 zero buffers in one call
def init_decoder_cache(cfg: WanVAEConfig, batch: int, latent_h: int, latent_w: int) -> DecoderCache:
    """A cleared cache for a new video: decode its first chunk with it, then pass on what decode_chunk returns."""
    decoder = nnx.eval_shape(lambda: WanDecoder(cfg, rngs=nnx.Rngs(0)))  # shapes only, no parameters
    return decoder.init_cache(batch, latent_h, latent_w)


@partial(_JitChannelsLast, static_argnames="graphdef", donate_argnames="cache")
def decode_chunk(graphdef: nnx.GraphDef, state: nnx.State, z: jax.Array, cache: DecoderCache):
    """Decodes the next T latent frames [B, T, h, w, z_dim] of a video -> (pixels, cache).

    (graphdef, state) = nnx.split(WanVAE(...)). Compiles once for the first chunk and once for the later ones
    (per chunk shape); the cache is donated.
    """
    return nnx.merge(graphdef, state).decoder(z, cache)


@partial(_JitChannelsLast, static_argnames="graphdef")
def decode(graphdef: nnx.GraphDef, state: nnx.State, z: jax.Array) -> jax.Array:
    """A whole video [B, N, h, w, z_dim] -> pixels [B, 4N-3, 8h, 8w, 3] in [-1, 1]."""
    decoder = nnx.merge(graphdef, state).decoder
    return decoder(z, decoder.init_cache(z.shape[0], z.shape[2], z.shape[3]))[0]


@partial(_JitChannelsLast, static_argnames="graphdef")
def encode(graphdef: nnx.GraphDef, state: nnx.State, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A whole video [B, 1 + 4k, H, W, 3] in [-1, 1] -> normalised (mu, logvar) [B, 1 + k, H/8, W/8, z_dim]."""
    vae = nnx.merge(graphdef, state)
    if vae.encoder is None:
        raise ValueError("this WanVAE has no encoder (its config has with_encoder=False).")
    return vae.encoder(pixels)
