"""The built-in demo model: what `dfjax generate` uses when no --model is given.

The package ships a small trained model folder under dfjax/assets/demo: a Wan-architecture causal
DiT, UMT5 text encoder and Wan VAE trained from scratch by `dfjax train-demo` (dfjax/train_demo.py)
on synthetic clips of coloured shapes that move (dfjax/synthetic.py), so prompts like
DEMO_PROMPTS give recognisable 64x64 videos. Without the folder (a source tree where it was
removed), a model folder with the same architecture and seeded random weights is built once into
the user's cache, so the whole text -> mp4 path still runs with nothing downloaded (its videos are
noise-like; the CLI says so).
"""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from dfjax.config import WanConfig
from dfjax.model.text_encoder import UMT5Config, UMT5Encoder
from dfjax.model.transformer import WanDiT
from dfjax.model.vae import WanVAE, WanVAEConfig
from dfjax.model_io import write_model_folder
from dfjax.params import flat_state, to_numpy
from dfjax.synthetic import DEMO_DEFAULTS, DEMO_PROMPTS  # noqa: F401 (the demo's prompts and defaults)

PACKAGED = Path(__file__).parent / "assets" / "demo"


def is_trained(folder: Path) -> bool:
    return folder.resolve() == PACKAGED.resolve()


def is_demo_folder(folder: Path) -> bool:
    """The shipped demo model or its random stand-in (both know only the synthetic language at 64x64)."""
    return is_trained(folder) or folder.resolve() == _stand_in_folder().resolve()


def _stand_in_folder() -> Path:
    return Path(os.environ.get("DFJAX_CACHE", Path.home() / ".cache" / "dfjax")) / "random-demo"


def demo_model_folder() -> Path:
    if (PACKAGED / "config.json").is_file():
        return PACKAGED
    cache = _stand_in_folder()
    if not (cache / "config.json").is_file():
        build_random_model_folder(cache)
    return cache


def demo_configs() -> tuple[WanConfig, UMT5Config, WanVAEConfig]:
    """The shipped model's architecture ("demo" size of dfjax.train_demo), for the random stand-in."""
    import dataclasses

    from dfjax.train_demo import model_configs

    dit, text, vae = model_configs("demo", vocab_size=56)
    return dit, text, dataclasses.replace(vae, with_encoder=False)


def build_random_model_folder(out: Path, seed: int = 0) -> Path:
    from dfjax.text import make_tiny_tokenizer

    dit_cfg, te_cfg, vae_cfg = demo_configs()
    params = {
        "transformer": to_numpy(flat_state(WanDiT(dit_cfg, nnx.Rngs(seed)))),
        "text_encoder": to_numpy(flat_state(UMT5Encoder(te_cfg, nnx.Rngs(seed + 1)))),
        "vae": to_numpy(flat_state(WanVAE(vae_cfg, rngs=nnx.Rngs(seed + 2)))),
    }
    config = {"transformer": dit_cfg.__dict__, "text_encoder": te_cfg.__dict__, "vae": vae_cfg.__dict__,
              "defaults": DEMO_DEFAULTS, "sampling": {"chunk_frames": 3}}
    from dfjax.synthetic import prompt_corpus
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tiny_tokenizer(Path(tmp) / "tokenizer", prompt_corpus(200), vocab_size=64)
        return write_model_folder(out, config, params, copy_dirs={"tokenizer": tok}, overwrite=True)



