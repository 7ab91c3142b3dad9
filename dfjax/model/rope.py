"""3D rotary position embedding of Wan2.1 (docs/model.md).

The head dimension is split t:h:w = (d - 4*(d//6)) : 2*(d//6) : 2*(d//6), each axis with its own
frequency ladder. Consecutive channel pairs form complex numbers. Angle tables are computed once on
the host in float64 (as the release does) and only their cos/sin enter the jitted code, so the time
axis can be indexed by a traced frame offset without recompiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    third = head_dim // 6
    return head_dim - 4 * third, 2 * third, 2 * third


def axis_angles(dim: int, max_pos: int, theta: float) -> np.ndarray:
    """[max_pos, dim//2] float64 angles pos * theta^(-2i/dim)."""
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return np.outer(np.arange(max_pos, dtype=np.float64), freqs)


@dataclass(frozen=True)
class RopeTables:
    """cos/sin per axis: time [max_pos, dt/2], height [max_pos, dh/2], width [max_pos, dw/2] (float32)."""

    cos_t: jnp.ndarray
    sin_t: jnp.ndarray
    cos_h: jnp.ndarray
    sin_h: jnp.ndarray
    cos_w: jnp.ndarray
    sin_w: jnp.ndarray


def rope_tables(head_dim: int, max_pos: int = 1024, theta: float = 10000.0) -> RopeTables:
    tabs = []
    for d in axis_dims(head_dim):
        a = axis_angles(d, max_pos, theta)
        tabs += [np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)]
    return RopeTables(*(jnp.asarray(t) for t in tabs))


def rope_cos_sin(tables: RopeTables, frame_start, num_frames: int, h: int, w: int):
    """cos, sin of shape [num_frames*h*w, head_dim//2] for tokens in (f, h, w) raster order.

    frame_start may be traced: the time index of a token is its absolute latent-frame index.
    """
    import jax

    ft = jax.lax.dynamic_slice_in_dim(tables.cos_t, frame_start, num_frames, 0)
    st = jax.lax.dynamic_slice_in_dim(tables.sin_t, frame_start, num_frames, 0)

    def grid(t, hh, ww):
        t = jnp.broadcast_to(t[:, None, None, :], (num_frames, h, w, t.shape[-1]))
        hh = jnp.broadcast_to(hh[:h][None, :, None, :], (num_frames, h, w, hh.shape[-1]))
        ww = jnp.broadcast_to(ww[:w][None, None, :, :], (num_frames, h, w, ww.shape[-1]))
        return jnp.concatenate([t, hh, ww], axis=-1).reshape(num_frames * h * w, -1)

    return grid(ft, tables.cos_h, tables.cos_w), grid(st, tables.sin_h, tables.sin_w)


def apply_rope(x, cos, sin):
    """x [B, L, H, D] (pairs interleaved); cos/sin [L, D//2]. Computes in fp32, returns x.dtype."""
    b, l, h, d = x.shape
    xf = x.astype(jnp.float32).reshape(b, l, h, d // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(b, l, h, d).astype(x.dtype)
