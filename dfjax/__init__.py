"""dfjax: Dummy Forcing on a causal, KV-cached Wan2.1 video diffusion transformer in JAX."""

__version__ = "0.1.0"
