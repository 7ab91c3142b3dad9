"""Flat parameter dictionaries: the one exchange format between converters, Orbax and NNX modules.

A flat key is the NNX state path joined with dots, e.g. "blocks.3.self_attn.q.kernel".
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx


def path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_state(module_or_state: Any) -> dict[str, Any]:
    """{flat key: array} of every nnx.Param of a module (or of a State)."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    return {path_key(path): var.get_value() if hasattr(var, "get_value") else var for path, var in nnx.to_flat_state(state)}


def abstract_params(make_module: Callable[[], nnx.Module]) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a module's parameters without allocating them."""
    return flat_state(nnx.eval_shape(make_module))


def assign_params(module: nnx.Module, flat: dict[str, Any]) -> nnx.Module:
    """Replace every parameter of `module` (in place) by `flat[key]`, checking keys, shapes and casting dtype."""
    state = nnx.state(module, nnx.Param)
    expected = flat_state(state)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(f"parameter keys do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    new_leaves = []
    for path, var in nnx.to_flat_state(state):
        key = path_key(path)
        value, want = flat[key], var.get_value()
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"parameter {key}: shape {tuple(value.shape)}, the model expects {tuple(want.shape)}")
        new_leaves.append((path, jax.numpy.asarray(value, dtype=want.dtype)))
    for path, value in new_leaves:
        node = module
        for p in path[:-1]:
            node = node[p] if isinstance(p, int) else getattr(node, p)
        getattr(node, path[-1]).set_value(value)
    return module


def to_numpy(flat: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat.items()}
