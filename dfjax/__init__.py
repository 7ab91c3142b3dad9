"""dfjax: Dummy Forcing on a causal, KV-cached Wan2.1 video diffusion transformer in JAX.

    import dfjax
    pipe = dfjax.load()                                   # the built-in demo model (see dfjax.api)
    frames = pipe.generate("a red square moves left")     # uint8 [frames, height, width, 3]
"""

__version__ = "0.1.0"


def load(model=None, **options):
    """A VideoPipeline for a model folder (default: the built-in demo model); see dfjax.api.load."""
    from dfjax.api import load as _load

    return _load(model, **options)
