"""The one place where differences between the supported jax/flax versions are handled.

Supported: jax 0.10.2 + flax 0.12.8 (Python 3.11, CPU CI) and jax 0.11.2 + flax 0.12.10 (H100 machine).
Add a small function here, with a comment naming the versions, instead of version checks elsewhere.
"""

from __future__ import annotations

import jax


def jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())
