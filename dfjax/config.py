"""Frozen, hashable configuration of the DiT, the sampler, the KV cache and the video shape.

Configs are static arguments of jit: they hold only ints, floats that never change per call,
strings and tuples. Per-call floats (timesteps, sigmas) are traced arrays, never config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}.")
    return DTYPES[name]


def config_from_dict(cls, d: dict):
    """Builds a frozen config from a JSON dict, refusing unknown fields by name; lists become tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(names)}.")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class WanConfig:
    """The Wan2.1 T2V DiT. Defaults are the 1.3B model (docs/model.md)."""

    dim: int = 1536
    num_layers: int = 30
    num_heads: int = 12
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_channels: int = 16
    out_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_pos: int = 1024
    param_dtype: str = "bfloat16"  # linear weights
    norm_dtype: str = "float32"  # norm weights, modulation tables and the time embedding
    dtype: str = "bfloat16"  # matmul / attention compute
    # The blocks' linears (attention q/k/v/o, FFN) in float8_e4m3fn with per-channel weight scales and per-token
    # activation scales (dfjax.model.fp8, docs/fp8.md); embeddings, head, norms and attention stay as above.
    fp8: bool = False

    def __post_init__(self):
        if not isinstance(self.fp8, bool):
            raise ValueError(f"fp8 must be true or false, got {self.fp8!r}.")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}.")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 6 for 3D RoPE.")
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"patch must be three positive ints, got {self.patch}.")
        for name in ("param_dtype", "norm_dtype", "dtype"):
            dtype_of(getattr(self, name))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def wan_1_3b(cls, **kw) -> "WanConfig":
        return cls(**kw)

    @classmethod
    def wan_14b(cls, **kw) -> "WanConfig":
        return cls(**{**dict(dim=5120, num_layers=40, num_heads=40, ffn_dim=13824), **kw})

    @classmethod
    def tiny(cls, **kw) -> "WanConfig":
        """A few-layer model for tests: 4 heads of 12 (RoPE split 4:4:4), text width 32."""
        return cls(**{**dict(dim=48, num_layers=2, num_heads=4, ffn_dim=96, freq_dim=32, text_dim=32,
                             text_len=16, in_channels=4, out_channels=4, param_dtype="float32",
                             dtype="float32"), **kw})

    @classmethod
    def preset(cls, name: str) -> "WanConfig":
        presets = {"wan-1.3b": cls.wan_1_3b, "wan-14b": cls.wan_14b, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}.")
        return presets[name]()


@dataclass(frozen=True)
class SamplingConfig:
    """Self Forcing's few-step flow-matching sampler (docs/model.md)."""

    denoising_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    warp: bool = True  # index the shifted 1000-step table, as Self Forcing's `warp_denoising_step`
    shift: float = 5.0
    num_train_timesteps: int = 1000
    context_noise: float = 0.0  # timestep of the cache-refresh forward
    chunk_frames: int = 3  # latent frames per autoregressive chunk
    # Causal Forcing++: chunk 0 has a schedule of its own (`denoising_step_list_first_chunk`); None: the same
    first_chunk_denoising_steps: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("denoising_steps", "first_chunk_denoising_steps"):
            steps = getattr(self, name)
            if steps is None and name != "denoising_steps":
                continue
            if not steps:
                raise ValueError(f"{name} is empty; give at least one timestep.")
            if any(not 0 < t <= self.num_train_timesteps for t in steps):
                raise ValueError(f"{name} {steps} must lie in (0, {self.num_train_timesteps}].")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}.")


@dataclass(frozen=True)
class CacheConfig:
    """Which earlier frames the self-attention sees.

    kind="global": every earlier frame (Self Forcing). kind="local": the first `sink_frames` frames plus
    the most recent `window_frames` frames, the current chunk included (LongLive: window 12 with a
    3-frame sink means sink_frames=3, window_frames=9).
    """

    kind: str = "global"
    sink_frames: int = 0
    window_frames: int = 0

    def __post_init__(self):
        if self.kind not in ("global", "local"):
            raise ValueError(f"cache kind {self.kind!r} is unknown; use 'global' or 'local'.")
        if self.sink_frames < 0 or self.window_frames < 0:
            raise ValueError("sink_frames and window_frames must be >= 0.")
        if self.kind == "local" and self.window_frames == 0:
            raise ValueError("a local cache needs window_frames > 0 (the current chunk is part of the window).")

    @classmethod
    def longlive(cls) -> "CacheConfig":
        return cls(kind="local", sink_frames=3, window_frames=9)


@dataclass(frozen=True)
class VideoShape:
    """Pixel size and frame count of one video, with the latent sizes they imply."""

    height: int = 480
    width: int = 832
    frames: int = 81
    vae_stride: tuple[int, int, int] = (4, 8, 8)

    def __post_init__(self):
        st, sh, sw = self.vae_stride
        if self.height % (sh * 2) or self.width % (sw * 2):
            raise ValueError(
                f"resolution {self.width}x{self.height} is not a multiple of {sw * 2}x{sh * 2} "
                f"(VAE stride x patch size); try e.g. {self.width // 16 * 16}x{self.height // 16 * 16}."
            )
        if self.frames < 1 or (self.frames - 1) % st:
            raise ValueError(f"frames must be {st}*k+1 (e.g. 21, 81), got {self.frames}.")

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // self.vae_stride[0] + 1

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_stride[1], self.width // self.vae_stride[2]

    @staticmethod
    def frames_for_latents(latent_frames: int, vae_temporal_stride: int = 4) -> int:
        return (latent_frames - 1) * vae_temporal_stride + 1


RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280), "1080p": (1088, 1920)}
# Baselines whose attention cost per chunk a long-context plan matches, in latent frames a chunk attends to (its own
# included): LongLive's local window (3 sink + 9 frames) and Self Forcing's longest context (21 frames, 81 frames).
LONG_CONTEXT_BASELINES = {"longlive": 12, "self-forcing": 21}


@dataclass(frozen=True)
class DummyForcingConfig:
    """Dummy Forcing settings (docs/dummy-forcing.md); defaults are the public release's."""

    num_dummy: int | None = None  # None: half of all heads (the release's 180 of 360)
    ar_start: int = 1  # AR step whose cache-refresh forward is scored; the plan applies from the next
    local_context_length: int = 1  # chunks kept by neighbour heads
    packed_dummy: bool = True  # release: dummy heads keep the newest clean frame; paper: current chunk only
    normalize: str = "release"  # DHP score normalisation: "release" or "none" (the paper's raw objective)
    query_rows: str = "release"  # scored query rows: "release", "paper", "exact" or "fraction"
    query_fraction: float | None = None  # for query_rows="fraction"
    seed: int = 0  # seeds the query-row sample
    # Long-context mode: the neighbour heads' window is made as long as the attention a baseline spends per chunk
    # allows, the baseline seeing this many latent frames per chunk (its current chunk included; LongLive's 3 sink +
    # 9 window: 12). None: the window is local_context_length chunks.
    long_context: int | None = None

    def __post_init__(self):
        if self.long_context is not None and self.long_context < 1:
            raise ValueError(f"long_context must be >= 1 latent frames, got {self.long_context}.")
        if self.ar_start < 0:
            raise ValueError(f"ar_start must be >= 0, got {self.ar_start}.")
        if self.local_context_length < 0:
            raise ValueError(f"local_context_length must be >= 0 (chunks), got {self.local_context_length}.")
        if self.num_dummy is not None and self.num_dummy < 0:
            raise ValueError(f"num_dummy must be >= 0, got {self.num_dummy}.")
        if self.normalize not in ("release", "none"):
            raise ValueError(f"normalize must be 'release' or 'none', got {self.normalize!r}.")

    def dummy_count(self, num_layers: int, num_heads: int) -> int:
        total = num_layers * num_heads
        n = total // 2 if self.num_dummy is None else self.num_dummy
        if n > total:
            raise ValueError(f"num_dummy {n} is out of range: this model has {num_layers} x {num_heads} = {total} "
                             f"heads; choose 0..{total}.")
        return n
