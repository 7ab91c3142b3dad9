"""Trains the built-in demo model from scratch on synthetic clips (dfjax.synthetic): `dfjax train-demo`.

Four parts, in order, all from one seed:
  1. a unigram tokenizer on the prompt vocabulary (dfjax.text.make_tiny_tokenizer);
  2. a small Wan2.1-architecture causal VAE, trained with optax as an autoencoder (weighted L1 + L2
     reconstruction, with shape pixels weighted up, plus a small KL) on random windows of the clips;
     its latents are then normalised by their per-channel mean and one global std;
  3. the clips encoded to latents (the posterior mean);
  4. a small causal Wan DiT and a small UMT5 text encoder, trained jointly with flow matching in the
     chunked causal setting (Diffusion Forcing / CausVid-style teacher forcing): each chunk of latent
     frames gets its own noise level, and one forward over [clean clip ; noisy clip] with a block-causal
     mask lets noisy chunk c see the clean chunks before it and itself, while clean chunk c sees clean
     chunks <= c at t = 0. That is exactly what the KV-cached AR loop computes (the clean chunks are the
     cache-refresh forwards), so the trained weights load as a plain WanDiT. The text encoder is trained
     with the DiT rather than kept random: it is tiny, and training it lets prompts that share most
     words ("a red square ..." vs "a red circle ...") map to clearly different contexts.

The model folder (dfjax.model_io) holds transformer (EMA weights), text_encoder (EMA), a decode-only vae,
the tokenizer, and config.json with "defaults" and "sampling" for `dfjax generate`, plus "training"
(the settings, losses and timings of the run).

    dfjax train-demo --out dfjax/assets/demo                 # the shipped model (GPU: a few minutes)
    dfjax train-demo --out /tmp/m --size tiny --clips 32 --vae-steps 2 --dit-steps 2   # a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dfjax.config import SamplingConfig, WanConfig, dtype_of
from dfjax.model.rope import rope_cos_sin, rope_tables
from dfjax.model.text_encoder import UMT5Config, UMT5Encoder
from dfjax.model.transformer import WanDiT, gelu_tanh, layer_norm
from dfjax.model.vae import WanVAE, WanVAEConfig
from dfjax.params import flat_state, to_numpy
from dfjax.synthetic import BACKGROUND, DEMO_DEFAULTS, DEMO_PROMPTS, SyntheticConfig, make_dataset, prompt_corpus

# ---------------------------------------------------------------- sizes

SIZES = {
    # the shipped model: DiT 8 layers x 8 heads of 24 (about 5M parameters), UMT5 2 x 64, VAE base 16, z 16
    "demo": dict(
        dit=dict(dim=192, num_layers=8, num_heads=8, ffn_dim=768, freq_dim=64),
        text=dict(d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128, num_buckets=8, max_distance=16),
        vae=dict(base_dim=16, num_res_blocks=1),
        z_dim=16,
    ),
    # trainable on 2 CPU cores in about 40 minutes (no GPU): DiT 6 layers x 8 heads of 8 (0.4M parameters)
    "cpu": dict(
        dit=dict(dim=64, num_layers=6, num_heads=8, ffn_dim=192, freq_dim=64),
        text=dict(d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64, num_buckets=8, max_distance=16),
        vae=dict(base_dim=8, num_res_blocks=1),
        z_dim=16,
    ),
    # CPU tests: every part at its smallest
    "tiny": dict(
        dit=dict(dim=48, num_layers=2, num_heads=4, ffn_dim=96, freq_dim=32),
        text=dict(d_model=32, num_layers=1, num_heads=2, d_kv=8, d_ff=48, num_buckets=8, max_distance=16),
        vae=dict(base_dim=4, num_res_blocks=1),
        z_dim=8,
    ),
}
TEXT_LEN = 32  # prompts are at most 24 tokens with the word-level tokenizer

# The sampler stored with the model (config.json "sampling"). The DiT is trained on a continuous noise
# range, so any step list works; see choose_sampling and benchmarks/results for the comparison.
DEFAULT_SAMPLING = dict(denoising_steps=[1000.0, 875.0, 750.0, 625.0, 500.0, 375.0, 250.0, 125.0], warp=True,
                        shift=2.0, chunk_frames=3)


@dataclass(frozen=True)
class TrainConfig:
    size: str = "demo"
    seed: int = 0
    height: int = 64
    width: int = 64
    frames: int = 57  # training clips: 15 latent frames = 5 chunks of 3
    clips: int = 16384  # DiT training clips; the VAE trains on the first vae_clips of them
    vae_clips: int = 4096
    workers: int = 0  # processes drawing clips (0: all cores)
    # the data mix (dfjax.synthetic.SyntheticConfig): prompts that name only the events before this frame (0: all of
    # the clip's; the shipped model), and the speed range of the shapes that bounce or turn (pixels per frame)
    describe_frames: int = 0
    speed_min: float = 0.8
    speed_max: float = 1.6
    deadline: float = 0.0  # > 0: the DiT's time budget shrinks so that the whole run ends within this many seconds
    # VAE
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_window: int = 17  # pixel frames per VAE training window (5 latent frames)
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    foreground_weight: float = 4.0
    vae_dtype: str = "auto"  # compute dtype while training: auto = bfloat16 on GPU/TPU, float32 on CPU (the saved
    # model computes in float32)
    vae_seconds: float = 0.0  # > 0: a time budget; the step count is cut to fit it (measured after 20 steps;
    # the count used is recorded, and passing it as vae_steps with no budget reproduces the run)
    # DiT
    dit_steps: int = 20000
    dit_batch: int = 64
    dit_lr: float = 5e-4
    warmup: int = 500
    ema: float = 0.999
    context_aug: float = 0.1  # clean-context latents get N(0, s^2) noise with s ~ U(0, context_aug)
    dit_dtype: str = "float32"
    dit_seconds: float = 0.0  # like vae_seconds
    first_chunk_steps: int = 0  # > 0: a first phase on first chunks only (see train_dit)
    first_chunk_batch: int = 64
    first_chunk_seconds: float = 0.0
    log_every: int = 100

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {sorted(SIZES)}.")
        if (self.frames - 1) % 4 or (self.frames - 1) // 4 % 3 != 2:
            raise ValueError(f"frames must be 4k+1 with k+1 a multiple of 3 latent frames (e.g. 33, 45, 57), "
                             f"got {self.frames}.")
        if (self.vae_window - 1) % 4 or self.vae_window > self.frames:
            raise ValueError(f"vae_window must be 4k+1 and at most frames, got {self.vae_window}.")
        if not 0 <= self.describe_frames <= self.frames or not 0 < self.speed_min <= self.speed_max:
            raise ValueError(f"describe_frames must be in 0 .. frames and 0 < speed_min <= speed_max, got "
                             f"{self.describe_frames}, {self.speed_min}, {self.speed_max}.")

    def synthetic(self) -> SyntheticConfig:
        """The clips and prompts this run trains on."""
        return SyntheticConfig(height=self.height, width=self.width, frames=self.frames,
                               speed=(self.speed_min, self.speed_max), describe_frames=self.describe_frames)


def model_configs(size: str, vocab_size: int):
    s = SIZES[size]
    z = s["z_dim"]
    text = UMT5Config(vocab_size=vocab_size, text_len=TEXT_LEN, param_dtype="float32", dtype="float32", **s["text"])
    dit = WanConfig(**s["dit"], text_dim=text.d_model, text_len=TEXT_LEN, in_channels=z, out_channels=z,
                    param_dtype="float32", norm_dtype="float32", dtype="float32")
    vae = WanVAEConfig(z_dim=z, latents_mean=(0.0,) * z, latents_std=(1.0,) * z, param_dtype="float32",
                       dtype="float32", **s["vae"])
    return dit, text, vae


def with_dtype(cfg, dtype: str):
    return dataclasses.replace(cfg, dtype=dtype)


# ---------------------------------------------------------------- tokenizer

def build_tokenizer(folder: Path, seed: int):
    from dfjax.text import load_tokenizer, make_tiny_tokenizer

    make_tiny_tokenizer(folder, prompt_corpus(2000, seed), vocab_size=64)
    return load_tokenizer(folder)


def tokenize_clean(tokenizer, prompts, text_len: int = TEXT_LEN):
    """dfjax.text.tokenize without its cleaning step (our prompts are already clean ASCII; ftfy is not needed)."""
    out = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=text_len,
                    add_special_tokens=True, return_tensors="np")
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


# ---------------------------------------------------------------- the DiT's training forward

def teacher_forcing_mask(num_frames: int, chunk_frames: int, tokens_per_frame: int) -> np.ndarray:
    """Bool [2L, 2L] over tokens [clean clip ; noisy clip]: clean chunk c sees clean chunks <= c; noisy chunk c
    sees clean chunks < c and noisy chunk c (the KV-cached AR loop, with clean refresh K/V in the cache).
    block_causal_attention computes attention under this mask without forming it."""
    ch = np.arange(num_frames) // chunk_frames
    q, k = ch[:, None], ch[None, :]
    top = np.concatenate([k <= q, np.zeros_like(k <= q)], axis=1)
    bottom = np.concatenate([k < q, k == q], axis=1)
    m = np.concatenate([top, bottom], axis=0)
    return np.repeat(np.repeat(m, tokens_per_frame, 0), tokens_per_frame, 1)


def _softmax_attention(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def block_causal_attention(q, k, v, chunk_tokens: int):
    """Attention under teacher_forcing_mask, chunk by chunk (no masked-out logits are computed: on a CPU this
    is about 3x faster than one masked softmax). q, k, v [B, 2L, H, D] over tokens [clean ; noisy]."""
    half = q.shape[1] // 2
    n = half // chunk_tokens
    clean, noisy = [], []
    for c in range(n):
        a, b = c * chunk_tokens, (c + 1) * chunk_tokens
        clean.append(_softmax_attention(q[:, a:b], k[:, :b], v[:, :b]))
        kn = jnp.concatenate([k[:, :a], k[:, half + a:half + b]], axis=1)
        vn = jnp.concatenate([v[:, :a], v[:, half + a:half + b]], axis=1)
        noisy.append(_softmax_attention(q[:, half + a:half + b], kn, vn))
    return jnp.concatenate(clean + noisy, axis=1)


def _block_forward(blk, x, e0, text_kv, cos, sin, chunk_tokens):
    """dfjax.model.transformer.Block.__call__ with a masked full-sequence self-attention instead of the cache."""
    cfg, dt = blk.cfg, dtype_of(blk.cfg.dtype)
    b, l, d = x.shape
    f = e0.shape[1]
    e = blk.modulation[...].astype(jnp.float32)[None, None] + e0
    per_frame = lambda y: y.reshape(b, f, l // f, d)
    modulate = lambda y, shift, scale: per_frame(y) * (1 + e[:, :, scale, None]) + e[:, :, shift, None]
    h = modulate(layer_norm(x, cfg.eps), 0, 1).reshape(b, l, d).astype(dt)
    q, k, v = blk.self_attn.qkv(h, cos, sin)
    y = blk.self_attn.o(block_causal_attention(q, k, v, chunk_tokens).reshape(b, l, -1))
    x = x + (per_frame(y.astype(jnp.float32)) * e[:, :, 2, None]).reshape(b, l, d)
    h = layer_norm(x, cfg.eps, blk.norm3_weight[...], blk.norm3_bias[...]).astype(dt)
    x = x + blk.cross_attn(h, text_kv, "xla").astype(jnp.float32)
    h = modulate(layer_norm(x, cfg.eps), 3, 4).reshape(b, l, d).astype(dt)
    y = blk.ffn_out(gelu_tanh(blk.ffn_in(h)))
    return x + (per_frame(y.astype(jnp.float32)) * e[:, :, 5, None]).reshape(b, l, d)


def teacher_forcing_flow(model: WanDiT, x_clean, x_noisy, t_noisy, context, rope, chunk_frames: int):
    """Flow [B, F, h, w, C] of every noisy chunk given the clean chunks before it, in one forward.

    x_clean, x_noisy [B, F, h, w, C]; t_noisy [B, F] per-frame timesteps (equal within a chunk); context
    [B, text_len, text_dim]. Equal to running the AR loop's cache-refresh forwards on the clean chunks and
    then the noisy chunk (tests/test_demo.py checks this against WanDiT.__call__ with a KV cache).
    """
    cfg = model.cfg
    b, f, h, w, _ = x_clean.shape
    hp, wp = h // cfg.patch[1], w // cfg.patch[2]
    tpf = hp * wp
    x = jnp.concatenate([x_clean, x_noisy], axis=1)
    t = jnp.concatenate([jnp.zeros((b, f), jnp.float32), t_noisy.astype(jnp.float32)], axis=1)
    e, e0 = model.time_embed(t)
    xs = model.patch_embedding(model.patchify(x)).astype(jnp.float32)
    cos, sin = rope_cos_sin(rope, 0, f, hp, wp)
    cos, sin = jnp.concatenate([cos, cos], 0), jnp.concatenate([sin, sin], 0)
    for blk, kv in zip(model.blocks, model.text_kv(context)):
        xs = _block_forward(blk, xs, e0, kv, cos, sin, chunk_frames * tpf)
    mod = model.head_modulation[...].astype(jnp.float32)[None, None] + e[:, :, None]
    hs = layer_norm(xs, cfg.eps).reshape(b, 2 * f, tpf, cfg.dim) * (1 + mod[:, :, 1, None]) + mod[:, :, 0, None]
    hs = hs[:, f:]  # only the noisy half is predicted
    out = model.head(hs.reshape(b, f * tpf, cfg.dim).astype(dtype_of(cfg.dtype)))
    return model.unpatchify(out.astype(jnp.float32), f, h, w)


def sample_sigmas(key, batch: int, num_chunks: int, shift: float = 3.0):
    """Per-chunk noise levels: half uniform in (0, 1], half uniform through the shifted map (more high noise)."""
    k1, k2 = jax.random.split(key)
    u = jax.random.uniform(k1, (batch, num_chunks), minval=1e-3, maxval=1.0)
    shifted = shift * u / (1 + (shift - 1) * u)
    return jnp.where(jax.random.bernoulli(k2, 0.5, (batch, num_chunks)), shifted, u)


# ---------------------------------------------------------------- optimisation helpers

@contextlib.contextmanager
def cpu_friendly_convs(enabled: bool = True):
    """While active, dfjax.model.vae's conv helper runs each 3D conv as the equal sum of 2D convs over its time
    taps. XLA:CPU runs small-channel 3D convs 3-10x slower than that (forward and backward), which decides
    whether the VAE can be trained on a CPU at all; on GPU/TPU it is not used. Same parameters, same function
    (up to float rounding); anything jitted while it is active keeps the 2D form."""
    from dfjax.model import vae as vae_module

    original = vae_module._conv

    def conv(x, kernel, bias, strides, padding, dtype):
        if kernel.ndim != 5:
            return original(x, kernel, bias, strides, padding, dtype)
        kt, st = kernel.shape[0], strides[0]
        (p0, p1), sp = padding[0], padding[1:]
        x = x.astype(dtype)
        if p0 or p1:
            x = jnp.pad(x, ((0, 0), (p0, p1), (0, 0), (0, 0), (0, 0)))
        b, t, h, w, c = x.shape
        to = (t - kt) // st + 1
        out = 0
        for i in range(kt):
            xi = jax.lax.slice_in_dim(x, i, i + st * (to - 1) + 1, stride=st, axis=1).reshape(b * to, h, w, c)
            out = out + jax.lax.conv_general_dilated(
                xi, kernel[i].astype(dtype), strides[1:], sp, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=vae_module._precision(dtype))
        out = out.reshape(b, to, *out.shape[1:])
        return out + bias.astype(dtype)

    if enabled:
        vae_module._conv = conv
    try:
        yield
    finally:
        vae_module._conv = original


def _init(make):
    """make() with its parameters initialised in one compiled program (eager init compiles once per shape)."""
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1])())


def _optimizer(weight_decay: float = 0.0):
    """Adam direction (the learning rate is applied by the caller, from a host-side schedule)."""
    parts = [optax.clip_by_global_norm(1.0), optax.scale_by_adam()]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    return optax.chain(*parts)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class _Budget:
    """Step count of a loop with an optional time budget: after 20 timed steps (the first, which compiles, not
    counted), the count is cut to what fits the rest of the budget."""

    def __init__(self, steps: int, seconds: float):
        self.total, self.seconds = steps, seconds
        self.t0 = time.perf_counter()
        self._mark = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, i: int, value) -> None:
        if not self.seconds:
            return
        if i == 1:
            jax.block_until_ready(value)
            self._mark = time.perf_counter()
        elif i == 21:
            jax.block_until_ready(value)
            per_step = (time.perf_counter() - self._mark) / 20
            self.total = min(self.total, i + max(0, int((self.seconds - self.elapsed()) / per_step)))


# ---------------------------------------------------------------- VAE

def train_vae(cfg: TrainConfig, vae_cfg: WanVAEConfig, videos_u8: np.ndarray, log=print):
    """Returns (trained WanVAE with encoder, record dict)."""
    dtype = cfg.vae_dtype if cfg.vae_dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    vae = _init(lambda: WanVAE(with_dtype(vae_cfg, dtype), rngs=nnx.Rngs(cfg.seed + 2)))
    graphdef, params = nnx.split(vae)
    opt = _optimizer()
    opt_state = opt.init(params)
    data = jnp.asarray(videos_u8)  # uint8 on the device: windows are cut there
    n, f = videos_u8.shape[:2]
    win = cfg.vae_window
    bg = jnp.asarray(BACKGROUND, jnp.float32) * 2 - 1

    def loss_fn(params, x, key):
        model = nnx.merge(graphdef, params)
        mu, logvar = model.encoder(x)
        logvar = jnp.clip(logvar, -30.0, 20.0)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
        dec = model.decoder
        rec, _ = dec(z, dec.init_cache(x.shape[0], z.shape[2], z.shape[3]))
        rec = rec.astype(jnp.float32)
        fg = (jnp.abs(x - bg).max(-1, keepdims=True) > 0.1).astype(jnp.float32)
        wgt = 1.0 + cfg.foreground_weight * fg
        err = rec - x
        recon = jnp.sum(wgt * (jnp.abs(err) + jnp.square(err))) / (jnp.sum(wgt) * 3)
        kl = 0.5 * jnp.mean(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar)
        return recon + cfg.kl_weight * kl, (recon, kl, jnp.mean(jnp.square(err)))

    @jax.jit
    def step(params, opt_state, data, key, lr):
        k1, k2, k3 = jax.random.split(key, 3)
        idx = jax.random.randint(k1, (cfg.vae_batch,), 0, n)
        start = jax.random.randint(k2, (cfg.vae_batch,), 0, f - win + 1)
        clip = jax.vmap(lambda i, s: jax.lax.dynamic_slice_in_dim(data[i], s, win, 0))(idx, start)
        x = clip.astype(jnp.float32) / 127.5 - 1.0
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, k3)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state, loss, aux

    key = jax.random.PRNGKey(cfg.seed + 20)
    budget, history, i = _Budget(cfg.vae_steps, cfg.vae_seconds), [], 0
    warmup = min(100, cfg.vae_steps // 10 + 1)
    while i < budget.total:
        params, opt_state, loss, aux = step(params, opt_state, data, jax.random.fold_in(key, i),
                                            _lr(i, budget.total, cfg.vae_lr, warmup))
        budget.update(i, loss)
        if i % cfg.log_every == 0 or i == budget.total - 1:
            rec = dict(step=i, loss=float(loss), recon=float(aux[0]), kl=float(aux[1]), mse=float(aux[2]),
                       seconds=round(budget.elapsed(), 1))
            history.append(rec)
            log(f"vae {i:6d}/{budget.total} loss {rec['loss']:.4f} recon {rec['recon']:.4f} kl {rec['kl']:.2f} "
                f"mse {rec['mse']:.5f} ({rec['seconds']} s)")
        i += 1
    vae = nnx.merge(graphdef, params)
    return vae, dict(steps=i, seconds=round(budget.elapsed(), 1), history=history)


def load_full_vae(path: str | Path, vae_cfg: WanVAEConfig) -> WanVAE:
    """A VAE saved with --save-vae, under `vae_cfg` (whose latent statistics replace the saved ones)."""
    from dfjax.params import assign_params

    with np.load(path) as z:
        saved = json.loads(str(z["config"]))
        flat = {k: z[k] for k in z.files if k != "config"}
    cfg = dataclasses.replace(vae_cfg, **{k: saved[k] for k in ("z_dim", "base_dim", "num_res_blocks")},
                              with_encoder=True)
    return assign_params(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))), flat)


def encode_dataset(vae: WanVAE, videos_u8: np.ndarray, batch: int = 64) -> np.ndarray:
    """Posterior means [N, F_lat, h, w, z], normalised by the VAE config's latent statistics (while training
    they are mean 0 and std 1, so these are the raw means)."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def enc(state, x_u8):
        model = nnx.merge(graphdef, state)
        return model.encoder(x_u8.astype(jnp.float32) / 127.5 - 1.0)[0]

    out = []
    for i in range(0, len(videos_u8), batch):
        chunk = videos_u8[i:i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        out.append(np.asarray(enc(state, jnp.asarray(chunk)))[:batch - pad])
    return np.concatenate(out)


def latent_stats(latents: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and one global std (repeated per channel): channels the KL left unused stay near 0
    after normalising instead of being blown up to unit variance."""
    z = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
    mean = z.mean(0)
    std = float(np.sqrt(np.mean(np.square(z - mean))))
    return tuple(float(m) for m in mean), (std,) * z.shape[1]


# ---------------------------------------------------------------- DiT + text encoder

def train_dit(cfg: TrainConfig, dit_cfg: WanConfig, text_cfg: UMT5Config, latents: np.ndarray, ids: np.ndarray,
              mask: np.ndarray, chunk_frames: int = 3, log=print, init=None):
    """Returns (DiT, text encoder) with EMA weights, and a record dict.

    Two phases share the optimiser and the EMA: first (cfg.first_chunk_steps > 0) the first chunk of each clip
    alone, from the prompt only, in large batches (cheap steps that teach the text conditioning, which the
    full-clip loss, dominated by chunks with history, learns slowly); then whole clips, teacher-forced.
    init: (dit, text) modules to start from instead of a fresh initialisation.
    """
    if init is None:
        dit = _init(lambda: WanDiT(with_dtype(dit_cfg, cfg.dit_dtype), nnx.Rngs(cfg.seed + 3)))
        text = _init(lambda: UMT5Encoder(text_cfg, nnx.Rngs(cfg.seed + 4)))
    else:
        dit, text = init
    graphdef, params = nnx.split((dit, text))
    opt = _optimizer(weight_decay=0.0)
    opt_state = opt.init(params)
    ema = params
    rope = rope_tables(dit_cfg.head_dim, dit_cfg.rope_max_pos, dit_cfg.rope_theta)
    data, ids_d, mask_d = jnp.asarray(latents, jnp.float32), jnp.asarray(ids), jnp.asarray(mask)
    n = latents.shape[0]

    def make_step(batch: int, frames: int):
        num_chunks = frames // chunk_frames

        def loss_fn(params, x0, ids, mask, key):
            model, encoder = nnx.merge(graphdef, params)
            k1, k2, k3, k4 = jax.random.split(key, 4)
            b = x0.shape[0]
            sig = jnp.repeat(sample_sigmas(k1, b, num_chunks), chunk_frames, axis=1)  # [B, F]
            noise = jax.random.normal(k2, x0.shape)
            s = sig[:, :, None, None, None]
            x_t = (1 - s) * x0 + s * noise
            aug = jax.random.uniform(k3, (b, 1, 1, 1, 1), maxval=cfg.context_aug)
            clean = x0 + aug * jax.random.normal(k4, x0.shape)
            context = encoder(ids, mask)
            flow = teacher_forcing_flow(model, clean, x_t, sig * 1000.0, context, rope, chunk_frames)
            return jnp.mean(jnp.square(flow - (noise - x0)))

        @jax.jit
        def step(params, opt_state, ema, data, ids_d, mask_d, key, lr):
            k1, k2 = jax.random.split(key)
            idx = jax.random.randint(k1, (batch,), 0, n)
            loss, grads = jax.value_and_grad(loss_fn)(params, data[idx, :frames], ids_d[idx], mask_d[idx], k2)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
            ema = jax.tree.map(lambda e, p: cfg.ema * e + (1 - cfg.ema) * p, ema, params)
            return params, opt_state, ema, loss

        return step

    phases = []
    if cfg.first_chunk_steps:
        phases.append(("first-chunk", cfg.first_chunk_steps, cfg.first_chunk_seconds, cfg.first_chunk_batch,
                       chunk_frames, cfg.seed + 31))
    phases.append(("dit", cfg.dit_steps, cfg.dit_seconds, cfg.dit_batch, latents.shape[1], cfg.seed + 30))
    record, total_steps = {}, 0
    for name, steps, seconds, batch, frames, seed in phases:
        step = make_step(batch, frames)
        key = jax.random.PRNGKey(seed)
        budget, history, running, i = _Budget(steps, seconds), [], [], 0
        warmup = min(cfg.warmup, steps // 10 + 1)
        while i < budget.total:
            params, opt_state, ema, loss = step(params, opt_state, ema, data, ids_d, mask_d,
                                                jax.random.fold_in(key, i), _lr(i, budget.total, cfg.dit_lr, warmup))
            budget.update(i, loss)
            running.append(loss)
            if i % cfg.log_every == 0 or i == budget.total - 1:
                mean = float(jnp.mean(jnp.stack(running)))
                running = []
                history.append(dict(step=i, loss=mean, seconds=round(budget.elapsed(), 1)))
                log(f"{name} {i:6d}/{budget.total} loss {mean:.4f} ({budget.elapsed():.1f} s)")
            i += 1
        total_steps += i
        record[name] = dict(steps=i, batch=batch, latent_frames=frames, seconds=round(budget.elapsed(), 1),
                            history=history)
    if total_steps < 1 / (1 - cfg.ema):  # too few steps for the EMA to have moved: keep the raw weights
        ema = params
    dit, text = nnx.merge(graphdef, ema)
    out = dict(record["dit"])
    if "first-chunk" in record:
        out["first_chunk"] = record["first-chunk"]
    return dit, text, out


def load_dit_and_text(folder: str | Path, dit_cfg: WanConfig, text_cfg: UMT5Config):
    """The DiT and text encoder of a model folder, to continue training them (--init-from)."""
    from dfjax.model_io import load_params
    from dfjax.params import abstract_params, assign_params

    out = []
    for name, make in (("transformer", lambda: WanDiT(dit_cfg, nnx.Rngs(0))),
                       ("text_encoder", lambda: UMT5Encoder(text_cfg, nnx.Rngs(0)))):
        out.append(assign_params(nnx.eval_shape(make), load_params(folder, name, abstract_params(make))))
    return tuple(out)


# ---------------------------------------------------------------- the model folder

def write_demo_folder(out: Path, dit: WanDiT, text: UMT5Encoder, vae: WanVAE, tokenizer_dir: Path,
                      dit_cfg: WanConfig, text_cfg: UMT5Config, vae_cfg: WanVAEConfig, sampling: dict,
                      defaults: dict, training: dict) -> Path:
    from dfjax.model_io import write_model_folder

    dec_cfg = dataclasses.replace(vae_cfg, with_encoder=False)
    vae_flat = {k: v for k, v in to_numpy(flat_state(vae)).items() if k.startswith("decoder.")}
    params = {"transformer": _stored(to_numpy(flat_state(dit))), "text_encoder": to_numpy(flat_state(text)),
              "vae": _stored(vae_flat)}
    config = {"transformer": _plain(dit_cfg), "text_encoder": _plain(text_cfg), "vae": _plain(dec_cfg),
              "defaults": defaults, "sampling": sampling, "training": training}
    return write_model_folder(out, config, params, copy_dirs={"tokenizer": tokenizer_dir}, overwrite=True)


def _stored(flat: dict) -> dict:
    """DiT and VAE weights are stored in bfloat16 (half the package size) and computed in float32 (orbax casts
    to the config's dtype when loading): on the demo prompts the videos stay within 44-60 dB PSNR of the
    float32 weights'."""
    import ml_dtypes

    return {k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v for k, v in flat.items()}


def repack(src: str | Path, out: str | Path) -> Path:
    """A model folder written by an earlier train-demo (weights stored in float32) in today's storage format."""
    from dfjax.model_io import load_params, read_config, write_model_folder
    from dfjax.params import abstract_params
    from dfjax.t2v import load_transformer, load_vae

    src = Path(src)
    meta = read_config(src)
    text_cfg = UMT5Config(**meta["text_encoder"])
    text = load_params(src, "text_encoder", abstract_params(lambda: UMT5Encoder(text_cfg, nnx.Rngs(0))))
    dit = load_transformer(src, fp8=False)  # the stored (unquantised) weights, whatever the folder runs with
    params = {"transformer": _stored(to_numpy(flat_state(dit))), "text_encoder": to_numpy(text),
              "vae": _stored(to_numpy(flat_state(load_vae(src))))}
    config = {k: v for k, v in meta.items() if k not in ("format", "version")}
    return write_model_folder(out, config, params, copy_dirs={"tokenizer": src / "tokenizer"}, overwrite=True)


def write_raw_folder(out: Path, dit, text, vae, tokenizer_dir, dit_cfg, text_cfg, vae_cfg, sampling, defaults,
                     training) -> Path:
    """The model folder's content without orbax: params.npz (keys "<component>/<flat key>") + raw_config.json.
    Written like a model folder (dfjax.model_io.staged_folder): it replaces only a folder dfjax wrote, atomically."""
    from dfjax.model_io import RAW_FORMAT, staged_folder

    with staged_folder(out, overwrite=True) as tmp:
        flat = {f"transformer/{k}": v for k, v in to_numpy(flat_state(dit)).items()}
        flat |= {f"text_encoder/{k}": v for k, v in to_numpy(flat_state(text)).items()}
        flat |= {f"vae/{k}": v for k, v in to_numpy(flat_state(vae)).items() if k.startswith("decoder.")}
        np.savez(tmp / "params.npz", **flat)
        dec_cfg = dataclasses.replace(vae_cfg, with_encoder=False)
        config = {"format": RAW_FORMAT, "transformer": _plain(dit_cfg), "text_encoder": _plain(text_cfg),
                  "vae": _plain(dec_cfg), "defaults": defaults, "sampling": sampling, "training": training}
        (tmp / "raw_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    return Path(out).absolute()


def finalize_raw(raw: str | Path, out: str | Path) -> Path:
    """A model folder from write_raw_folder's output."""
    from dfjax.model_io import write_model_folder

    raw = Path(raw)
    config = json.loads((raw / "raw_config.json").read_text())
    config.pop("format", None)
    params: dict = {"transformer": {}, "text_encoder": {}, "vae": {}}
    with np.load(raw / "params.npz") as z:
        for k in z.files:
            part, key = k.split("/", 1)
            params[part][key] = z[k]
    params = {**params, "transformer": _stored(params["transformer"]), "vae": _stored(params["vae"])}
    return write_model_folder(out, config, params, copy_dirs={"tokenizer": raw / "tokenizer"}, overwrite=True)


def _plain(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def train(cfg: TrainConfig, out: str | Path, log=print, sampling: dict | None = None,
          tokenizer_dir: str | Path | None = None, preview: str | Path | None = None,
          save_vae: str | Path | None = None, vae_from: str | Path | None = None,
          init_from: str | Path | None = None) -> Path:
    """The whole run; writes the model folder `out` (atomically) and returns its path.

    tokenizer_dir: a tokenizer folder made before (by build_tokenizer with the same seed) instead of a new one.
    """
    from dfjax.text import load_tokenizer

    t_start = time.perf_counter()
    out = Path(out)
    synth = cfg.synthetic()
    workers = cfg.workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    # every clip is drawn before JAX starts a backend (no fork after that)
    videos, prompts = make_dataset(cfg.clips, cfg.seed, synth, workers=workers)
    log(f"data: {len(videos)} clips {videos.shape[1:]} in {time.perf_counter() - t0:.1f} s ({workers} workers)")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        if tokenizer_dir:
            shutil.copytree(tokenizer_dir, tok_dir)
            tokenizer = load_tokenizer(tok_dir)
        else:
            tokenizer = build_tokenizer(tok_dir, cfg.seed)
        vocab = int(math.ceil(len(tokenizer) / 8) * 8)
        dit_cfg, text_cfg, vae_cfg = model_configs(cfg.size, vocab)
        ids, mask = tokenize_clean(tokenizer, prompts)
        log(f"tokenizer: {len(tokenizer)} pieces; prompts up to {int(mask.sum(1).max())} tokens")

        cpu = jax.default_backend() == "cpu"
        with cpu_friendly_convs(cpu):
            if vae_from:  # a VAE saved by an earlier run (--save-vae): its weights, this run's latent statistics
                vae, vae_rec = load_full_vae(vae_from, vae_cfg), {"from": str(vae_from)}
                log(f"vae: loaded {vae_from}")
            else:
                vae, vae_rec = train_vae(cfg, vae_cfg, videos[:cfg.vae_clips], log)
            t0 = time.perf_counter()
            raw = encode_dataset(vae, videos, batch=8 if cpu else 64)
        mean, std = latent_stats(raw)
        latents = (raw - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        vae_cfg = dataclasses.replace(vae_cfg, latents_mean=mean, latents_std=std)
        log(f"latents: {latents.shape} in {time.perf_counter() - t0:.1f} s; global std {std[0]:.3f}, "
            f"per-channel std after normalising {np.round(latents.reshape(-1, latents.shape[-1]).std(0), 2).tolist()}")
        vae = _with_config(vae, vae_cfg)
        if save_vae:  # the whole VAE, encoder included (the model folder keeps the decoder only)
            Path(save_vae).parent.mkdir(parents=True, exist_ok=True)
            np.savez(save_vae, config=json.dumps(_plain(vae_cfg)), **to_numpy(flat_state(vae)))
        with cpu_friendly_convs(cpu):
            vae_rec["heldout_psnr"] = reconstruction_psnr(vae, cfg, synth, num=8 if cpu else 32)
        log(f"vae: held-out reconstruction PSNR {vae_rec['heldout_psnr']:.2f} dB")

        del videos
        if cfg.deadline:
            left = cfg.deadline - (time.perf_counter() - t_start) - (60.0 if preview else 30.0)  # to save (+ preview)
            if cfg.first_chunk_steps:  # the first-chunk phase's own budget comes out of the same deadline
                left -= cfg.first_chunk_seconds
            cfg = dataclasses.replace(cfg, dit_seconds=max(10.0, min(cfg.dit_seconds or left, left)))
            log(f"dit: time budget {cfg.dit_seconds:.0f} s")
        init = load_dit_and_text(init_from, dit_cfg, text_cfg) if init_from else None
        dit, text, dit_rec = train_dit(cfg, dit_cfg, text_cfg, latents, ids, mask, log=log, init=init)
        if init_from:
            dit_rec["init_from"] = str(init_from)
        training = dict(config=dataclasses.asdict(cfg), device=str(jax.devices()[0].device_kind),
                        backend=jax.default_backend(), jax=jax.__version__, vae=vae_rec, dit=dit_rec,
                        seconds=round(time.perf_counter() - t_start, 1))
        defaults = dict(DEMO_DEFAULTS, height=cfg.height, width=cfg.width, frames=min(DEMO_DEFAULTS["frames"], cfg.frames))
        if preview:
            t0 = time.perf_counter()
            px, pp = preview_videos(dit, text, vae, tokenizer, cfg, sampling or DEFAULT_SAMPLING)
            np.savez_compressed(preview, videos=px, prompts=np.asarray(pp))
            log(f"preview: {px.shape} -> {preview} in {time.perf_counter() - t0:.1f} s")
        args = (dit, text, vae, tok_dir, dit_cfg, text_cfg, vae_cfg, sampling or DEFAULT_SAMPLING, defaults, training)
        try:
            path = write_demo_folder(out, *args)
        except ImportError as e:  # no orbax here: save plain arrays; `--finalize` makes the folder elsewhere
            log(f"cannot write a model folder ({e}); writing {out} as npz (finish it with --finalize)")
            path = write_raw_folder(out, *args)
    log(f"wrote {path} in {time.perf_counter() - t_start:.1f} s")
    return path


def reconstruction_psnr(vae: WanVAE, cfg: TrainConfig, synth: SyntheticConfig, num: int = 32) -> float:
    """PSNR (dB, pixels in [0, 1]) of decode(encode(x)) on clips the VAE never saw."""
    from dfjax.model.vae import decode
    from dfjax.synthetic import make_batch

    x, _ = make_batch(range(50_000_000, 50_000_000 + num), cfg.seed, synth)
    z = encode_dataset(vae, (np.clip(np.rint((x + 1) * 127.5), 0, 255)).astype(np.uint8), batch=num)  # normalised
    vg, vs = nnx.split(vae)
    rec = np.asarray(decode(vg, vs, jnp.asarray(z)))
    mse = np.mean(np.square((rec - x) / 2))
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def preview_videos(dit, text, vae, tokenizer, cfg: TrainConfig, sampling: dict, num: int = 6, seed: int = 0):
    """A few held-out prompts through the real AR loop (dfjax.pipeline.Generator) and the VAE: uint8 videos."""
    from dfjax.config import VideoShape
    from dfjax.model.vae import decode
    from dfjax.pipeline import Generator, RunConfig
    from dfjax.synthetic import clip_spec, to_uint8

    synth = cfg.synthetic()
    prompts = [clip_spec(20_000_000 + i, cfg.seed, synth).prompt for i in range(num)]
    run = RunConfig(video=VideoShape(cfg.height, cfg.width, cfg.frames), attn_impl="xla",
                    sampling=SamplingConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in sampling.items()}))
    gen = Generator(dit, run)
    enc = jax.jit(lambda ids, mask: text(ids, mask))
    vg, vs = nnx.split(vae)
    out = []
    for i, p in enumerate(prompts):
        ids, mask = tokenize_clean(tokenizer, [p])
        lat = gen.generate(enc(jnp.asarray(ids), jnp.asarray(mask)), seed=seed + i)
        out.append(to_uint8(np.asarray(decode(vg, vs, lat))[0]))
    return np.stack(out), prompts


def _with_config(vae: WanVAE, cfg: WanVAEConfig) -> WanVAE:
    """The same weights under a config with other latent statistics (and float32 compute)."""
    cfg = dataclasses.replace(cfg, dtype="float32")
    graphdef, state = nnx.split(vae)
    fresh = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    from dfjax.params import assign_params

    return assign_params(fresh, flat_state(state))


# ---------------------------------------------------------------- choosing the sampler

SAMPLER_CANDIDATES = {
    "sf4-shift5": dict(denoising_steps=[1000.0, 750.0, 500.0, 250.0], warp=True, shift=5.0),  # Self Forcing's
    "4-shift1": dict(denoising_steps=[1000.0, 750.0, 500.0, 250.0], warp=True, shift=1.0),
    "8-shift1": dict(denoising_steps=[1000.0 - 125.0 * i for i in range(8)], warp=True, shift=1.0),
    "8-shift2": dict(denoising_steps=[1000.0 - 125.0 * i for i in range(8)], warp=True, shift=2.0),
    "16-shift2": dict(denoising_steps=[1000.0 - 62.5 * i for i in range(16)], warp=True, shift=2.0),
}


def evaluate_samplers(folder: str | Path, num: int = 16, seed: int = 1, frames: int = 33, candidates=None,
                      log=print) -> dict:
    """Generates held-out prompts with each candidate sampler and scores the decoded frames against the data:
    colour hits (each colour the prompt names covers >= 0.3% of the pixels of the video), stray pixels (share
    of pixels far from every palette colour) and, per frame, the primary colour's pixel share vs the data's."""
    from dfjax.config import VideoShape
    from dfjax.model.vae import decode
    from dfjax.pipeline import Generator, RunConfig
    from dfjax.synthetic import colour_fractions, make_clip, prompt_colours, to_uint8
    from dfjax.t2v import VideoModel

    model = VideoModel.load(folder)
    synth = SyntheticConfig(frames=frames)
    clips = [make_clip(10_000_000 + i, seed, synth) for i in range(num)]
    vg, vs = nnx.split(model.vae)
    results = {}
    for name, spec in (candidates or SAMPLER_CANDIDATES).items():
        run = RunConfig(video=VideoShape(64, 64, frames), sampling=SamplingConfig(chunk_frames=3, **{
            k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}), attn_impl="xla")
        gen = Generator(model.dit, run)
        hits, stray, area_err = [], [], []
        for i, clip in enumerate(clips):
            lat = gen.generate(model.text([clip.prompt]), seed=i)
            px = to_uint8(np.asarray(decode(vg, vs, lat))[0])
            fr = colour_fractions(px)
            hits += [fr[c] >= 0.003 for c in prompt_colours(clip.prompt)]
            stray.append(fr["unmatched"])
            want = colour_fractions(to_uint8(clip.frames))[clip.objects[0]["colour"]]
            area_err.append(abs(fr[clip.objects[0]["colour"]] - want) / max(want, 1e-3))
        results[name] = dict(colour_hits=float(np.mean(hits)), stray=float(np.mean(stray)),
                             area_error=float(np.mean(area_err)), sampling=spec)
        log(f"sampler {name:10s}: colour hits {results[name]['colour_hits']:.3f}, stray pixels "
            f"{results[name]['stray']:.4f}, primary-colour area error {results[name]['area_error']:.3f}")
    return results


def set_sampling(folder: str | Path, sampling: dict) -> None:
    """Rewrites config.json's "sampling" of a model folder in place."""
    path = Path(folder) / "config.json"
    meta = json.loads(path.read_text())
    meta["sampling"] = sampling
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------- README media

def write_demo_media(folder: str | Path, out_dir: str | Path, prompts=None, seed: int = 0, scale: int = 2) -> list[Path]:
    """Generates `prompts` (default dfjax.demo.DEMO_PROMPTS) with a model folder at its default size and writes
    out_dir/demo.gif (one row per prompt) and out_dir/demo_strip.png (every 4th frame). Needs Pillow."""
    from PIL import Image, ImageDraw

    from dfjax.config import VideoShape, config_from_dict
    from dfjax.model.vae import decode
    from dfjax.model_io import read_config
    from dfjax.pipeline import Generator, RunConfig
    from dfjax.synthetic import to_uint8
    from dfjax.t2v import VideoModel

    prompts = list(prompts or DEMO_PROMPTS)
    meta = read_config(folder)
    d = meta["defaults"]
    model = VideoModel.load(folder)
    run = RunConfig(video=VideoShape(d["height"], d["width"], d["frames"]), attn_impl="xla",
                    sampling=config_from_dict(SamplingConfig, meta["sampling"]))
    gen = Generator(model.dit, run)
    vg, vs = nnx.split(model.vae)
    videos = [to_uint8(np.asarray(decode(vg, vs, gen.generate(model.text([p]), seed)))[0]) for p in prompts]
    videos = np.stack(videos).repeat(scale, 2).repeat(scale, 3)  # [P, F, H, W, 3]
    n, f, h, w, _ = videos.shape
    label_w, pad = 330, 2

    def canvas(frames_per_row):
        """One image: a label column, then the given frames of every prompt side by side."""
        cols = len(frames_per_row[0])
        img = Image.new("RGB", (label_w + cols * (w + pad), n * (h + pad)), (24, 24, 28))
        draw = ImageDraw.Draw(img)
        for r, (prompt, frames) in enumerate(zip(prompts, frames_per_row)):
            y = r * (h + pad)
            draw.text((6, y + h // 2 - 6), prompt, fill=(230, 230, 230))
            for c, fr in enumerate(frames):
                img.paste(Image.fromarray(fr), (label_w + c * (w + pad), y))
        return img

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gif = out_dir / "demo.gif"
    frames = [canvas([[v[t]] for v in videos]) for t in range(f)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=int(1000 / d.get("fps", 8)), loop=0)
    strip = out_dir / "demo_strip.png"
    canvas([list(v[::4]) for v in videos]).save(strip)
    return [gif, strip]


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfjax train-demo", description="Train the built-in demo model from scratch.")
    p.add_argument("--out", required=True, help="model folder to write (an existing one is replaced if dfjax wrote "
                                                "it, or it is empty; anything else is refused)")
    p.add_argument("--tar", help="also pack the folder into this .tar file")
    p.add_argument("--preview", help="also save a few generated held-out videos to this .npz")
    p.add_argument("--save-vae", help="also save the whole trained VAE (with its encoder) to this .npz")
    p.add_argument("--vae-from", help="skip VAE training: take the VAE saved by an earlier run's --save-vae")
    p.add_argument("--init-from", help="start the DiT and text encoder from this model folder's weights (the same "
                                       "size and tokenizer)")
    p.add_argument("--tokenizer", help="use this tokenizer folder (from an earlier run) instead of training one")
    p.add_argument("--media", metavar="DIR", help="after training, write DIR/demo.gif and DIR/demo_strip.png")
    p.add_argument("--repack", metavar="SRC", help="only rewrite the trained model folder SRC at --out in today's "
                                                   "storage format (bfloat16 DiT and VAE weights)")
    p.add_argument("--finalize", metavar="RAW", help="only turn a run's npz output (no orbax there) into a model "
                                                     "folder at --out")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    p.add_argument("--eval-samplers", type=int, default=0, metavar="N",
                   help="after training, compare the candidate samplers on N held-out prompts (report in "
                        "config.json training.samplers)")
    return p


def main(argv=None) -> int:
    from dfjax.model_io import ModelFolderError, check_output

    a = build_parser().parse_args(argv)
    try:  # --out is replaced, but only if dfjax wrote it (or it is empty): refused before any training
        check_output(a.out, overwrite=True)
    except ModelFolderError as e:
        print(f"dfjax train-demo: error: {e}", file=sys.stderr)
        return 2
    if a.finalize:
        print(f"wrote {finalize_raw(a.finalize, a.out)}")
        return 0
    if a.repack:
        print(f"wrote {repack(a.repack, a.out)}")
        return 0
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    path = train(cfg, a.out, log=lambda s: print(s, flush=True), tokenizer_dir=a.tokenizer, preview=a.preview,
                 save_vae=a.save_vae, vae_from=a.vae_from, init_from=a.init_from)
    if a.eval_samplers:
        res = evaluate_samplers(path, num=a.eval_samplers, log=lambda s: print(s, flush=True))
        meta_path = Path(path) / "config.json"
        meta = json.loads(meta_path.read_text())
        meta["training"]["samplers"] = res
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    if a.media:
        for media in write_demo_media(path, a.media):
            print(f"wrote {media}")
    if a.tar:
        import tarfile

        with tarfile.open(a.tar, "w") as tar:
            tar.add(path, arcname=Path(path).name)
        print(f"packed {a.tar}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
