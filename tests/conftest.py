"""One persistent JAX compilation cache for the whole test session (and the processes its tests start): the same
demo-model programs are compiled by many tests and subprocesses, and a cache hit skips XLA's compile. Tests that
check that nothing compiles count a program read back from it as a compile (tests/test_pipeline.py, dfjax.serve)."""

import os
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set before any test module imports jax
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dfjax-test-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
