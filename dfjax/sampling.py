"""Self Forcing's few-step flow-matching schedule (docs/model.md).

Host-side numpy: timesteps and sigmas are computed once per config, then enter jit as arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dfjax.config import SamplingConfig


def shifted_table(cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """The 1000-step tables of the shifted flow-matching scheduler: (timesteps, sigmas), float64."""
    n = cfg.num_train_timesteps
    sigmas = np.linspace(1.0, 0.0, n + 1)[:-1]
    sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    return sigmas * n, sigmas


def schedule(cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of the denoising steps, float64.

    With warp, step t indexes the shifted table (with 0 appended) at n - t, as Self Forcing's
    `warp_denoising_step`: [1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625]. Without warp the
    listed values are used as timesteps directly. Sigma is the table's sigma at the nearest timestep.
    """
    n = cfg.num_train_timesteps
    table_t, table_s = shifted_table(cfg)
    steps = np.asarray(cfg.denoising_steps, dtype=np.float64)
    if cfg.warp:
        full = np.append(table_t, 0.0)
        timesteps = full[(n - steps).astype(np.int64)]
    else:
        timesteps = steps
    sigmas = table_s[np.argmin(np.abs(table_t[None, :] - timesteps[:, None]), axis=1)]
    return timesteps, sigmas


def chunk_noise(key, chunk, step, shape):
    """The Gaussian draws of one chunk: step 0 its initial noise, step i+1 the re-noising after step i. Keyed by
    (seed, chunk, step) alone, so every sampler (sequential or stream batch) draws the same numbers."""
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, chunk), step), shape, jnp.float32)


def x0_from_flow(x_t, flow, sigma):
    """Flow matching: x_t = (1 - s) x0 + s noise and v = noise - x0, so x0 = x_t - s v."""
    return x_t - sigma * flow


def renoise(x0, noise, sigma):
    return (1 - sigma) * x0 + sigma * noise


def schedule_arrays(cfg: SamplingConfig):
    """Timesteps of every forward of a chunk (denoising steps, then the refresh at context_noise) and
    the sigmas after each step (the next step's sigma; 0 after the last), as fp32 device arrays."""
    t, s = schedule(cfg)
    forwards_t = np.append(t, cfg.context_noise)
    return jnp.asarray(forwards_t, jnp.float32), jnp.asarray(s, jnp.float32), jnp.asarray(np.append(s[1:], 0.0), jnp.float32)
