"""DHP: choose which heads become dummy, sink or neighbour heads from their frame attention scores.

Per head F = (F0 sink, F1 neighbour, F2 current). A sink head keeps F0 + F2, a neighbour head
F1 + F2, a dummy head F2. With exactly N dummy heads over all layers the retained mass is maximal
when the N heads with the smallest max(F0, F1) are dummy and every other head takes the larger of
F0, F1 (sink on a tie). A sort, not a dynamic program; it runs once per video on the host.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

import numpy as np


class HeadType(IntEnum):
    """Head codes used in plans and profiles."""

    SINK = 0  # keys: first latent frame ; current chunk
    NEIGHBOUR = 1  # keys: last local_context_length chunks ; current chunk
    DUMMY = 2  # keys: current chunk (paper) or newest clean latent frame ; current chunk (release)


SINK, NEIGHBOUR, DUMMY = HeadType.SINK, HeadType.NEIGHBOUR, HeadType.DUMMY


def check_num_dummy(num_dummy: int, num_layers: int, num_heads: int) -> None:
    total = num_layers * num_heads
    if not 0 <= num_dummy <= total:
        raise ValueError(
            f"num_dummy must be in [0, {total}] ({num_layers} layers x {num_heads} heads), got {num_dummy}"
        )


def solve_dhp(
    scores: np.ndarray, num_dummy: int, normalize: Literal["release", "none"] = "release"
) -> np.ndarray:
    """Head types int8 [num_layers, num_heads] (HeadType codes) from scores [num_layers, num_heads, 3].

    normalize="release" divides F0 and F1 by their sums over all heads before comparing (the public
    release); "none" compares the raw masses (the paper's objective). Ties in cost go to the lower
    flat head index (layer-major); sink/neighbour ties go to sink.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[2] != 3:
        raise ValueError(f"scores must be [num_layers, num_heads, 3], got shape {scores.shape}")
    if not np.all(np.isfinite(scores)) or np.any(scores < 0):
        raise ValueError("scores must be finite, non-negative attention masses")
    if normalize not in ("release", "none"):
        raise ValueError(f"normalize must be 'release' or 'none', got {normalize!r}")
    num_layers, num_heads, _ = scores.shape
    check_num_dummy(num_dummy, num_layers, num_heads)

    sink_mass, neighbour_mass = scores[..., 0].ravel(), scores[..., 1].ravel()
    if normalize == "release":
        # An all-zero column stays zero instead of dividing by zero.
        sink_mass = sink_mass / (sink_mass.sum() or 1.0)
        neighbour_mass = neighbour_mass / (neighbour_mass.sum() or 1.0)

    types = np.where(sink_mass >= neighbour_mass, SINK, NEIGHBOUR).astype(np.int8)
    # A dummy head loses what its best non-dummy type would have kept; F2 is kept either way.
    cost = np.maximum(sink_mass, neighbour_mass)
    types[np.argsort(cost, kind="stable")[:num_dummy]] = DUMMY
    return types.reshape(num_layers, num_heads)
