"""DHP: choose each head's type from its frame attention scores, for exactly N dummy heads over all layers.

A head of a history type (a row of the head table with a score column) keeps that column's mass plus the
current chunk's; a dummy head keeps only the current chunk's. The retained mass is largest when every non-dummy
head takes the history type of largest mass (the first in table order on a tie: sink before neighbour) and the N
heads whose best history mass is smallest are dummy. A sort, not a dynamic program; it runs once per video on
the host.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dfjax.dummy.heads import HeadTable, standard_table

Normalize = Literal["release", "none"]


def check_num_dummy(num_dummy: int, num_layers: int, num_heads: int) -> None:
    total = num_layers * num_heads
    if not 0 <= num_dummy <= total:
        raise ValueError(
            f"num_dummy must be in [0, {total}] ({num_layers} layers x {num_heads} heads), got {num_dummy}"
        )


def history_masses(scores: np.ndarray, normalize: Normalize | None, table: HeadTable) -> np.ndarray:
    """[..., T] the mass each head keeps in each history type of the table (table.history order), as DHP compares
    them: "release" (and None, the default) divides each score column by its sum over all heads (the public
    release), "none" compares raw masses (the paper's objective)."""
    if normalize not in (None, "release", "none"):
        raise ValueError(f"normalize must be 'release' or 'none', got {normalize!r}")
    scores = np.asarray(scores, dtype=np.float64)
    columns = []
    for t in table.history:
        mass = scores[..., t.score]
        if normalize != "none":
            mass = mass / (mass.sum() or 1.0)  # an all-zero column stays zero instead of dividing by zero
        columns.append(mass)
    return np.stack(columns, axis=-1)


def solve_dhp(scores: np.ndarray, num_dummy: int, normalize: Normalize = "release",
              table: HeadTable | None = None) -> np.ndarray:
    """Head type codes int8 [num_layers, num_heads] from scores [num_layers, num_heads, 3].

    Ties in cost go to the lower flat head index (layer-major).
    """
    table = table or standard_table()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[2] != 3:
        raise ValueError(f"scores must be [num_layers, num_heads, 3], got shape {scores.shape}")
    if not np.all(np.isfinite(scores)) or np.any(scores < 0):
        raise ValueError("scores must be finite, non-negative attention masses")
    num_layers, num_heads, _ = scores.shape
    check_num_dummy(num_dummy, num_layers, num_heads)
    if not table.history:
        raise ValueError("the head table has no type with a score; DHP has nothing to choose from.")
    if num_dummy and table.dummy is None:
        raise ValueError("the head table has no dummy type (one without a score); use num_dummy=0.")

    masses = history_masses(scores, normalize, table).reshape(num_layers * num_heads, -1)
    codes = np.array([t.code for t in table.history], np.int8)
    types = codes[np.argmax(masses, axis=-1)]  # argmax takes the first maximum: table order on ties
    # A dummy head loses what its best history type would have kept; the current chunk's mass is kept either way.
    cost = masses.max(axis=-1)
    if num_dummy:
        types[np.argsort(cost, kind="stable")[:num_dummy]] = table.dummy.code
    return types.reshape(num_layers, num_heads)
