"""The built-in demo model: what `dfjax generate` uses when no --model is given.

The package ships a small trained model folder under dfjax/assets/demo when it has one. Without
it, a model folder with the same tiny architecture and seeded random weights is built once into
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

PACKAGED = Path(__file__).parent / "assets" / "demo"
DEMO_PROMPTS = ["a red square moves left", "a blue circle bounces", "a green triangle moves right"]
# generation defaults stored with the demo model: 64x64, 33 frames (9 latent frames, 3 chunks)
DEMO_DEFAULTS = {"height": 64, "width": 64, "frames": 33, "fps": 8}


def is_trained(folder: Path) -> bool:
    return folder.resolve() == PACKAGED.resolve()


def demo_model_folder() -> Path:
    if (PACKAGED / "config.json").is_file():
        return PACKAGED
    cache = Path(os.environ.get("DFJAX_CACHE", Path.home() / ".cache" / "dfjax")) / "random-demo"
    if not (cache / "config.json").is_file():
        build_random_model_folder(cache)
    return cache


def demo_configs() -> tuple[WanConfig, UMT5Config, WanVAEConfig]:
    dit = WanConfig.tiny(dim=64, num_layers=4, num_heads=4, ffn_dim=128, in_channels=16, out_channels=16)
    return dit, UMT5Config.tiny(), WanVAEConfig.tiny(with_encoder=False)


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
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tiny_tokenizer(Path(tmp) / "tokenizer", DEMO_PROMPTS * 4, vocab_size=40)
        return write_model_folder(out, config, params, copy_dirs={"tokenizer": tok}, overwrite=True)



