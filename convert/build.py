"""`dfjax convert`: PyTorch checkpoints -> one dfjax model folder (written atomically)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from dfjax.convert.common import ConversionError
from dfjax.config import WanConfig, config_from_dict
from dfjax.model_io import FLUSH_BYTES, write_model_folder


def _given_config(config: str | None) -> WanConfig | None:
    if config is None:
        return None
    if config.endswith(".json"):
        path = Path(config)
        if not path.is_file():
            raise ConversionError(f"--config {config}: no such file.")
        return config_from_dict(WanConfig, json.loads(path.read_text()))
    return WanConfig.preset(config)


def transformer_part(src, config=None, num_heads=None, ema=True, lora=None, lora_alpha=None, dtype="bfloat16"):
    from dfjax.convert.common import read_state_dict
    from dfjax.convert.transformer import check_config, convert_transformer, detect_format, infer_config, merge_lora, \
        read_transformer_state

    sd, extra = read_transformer_state(src, ema=ema)
    if lora:
        lora_sd = read_state_dict(lora, subkey="generator_lora") if _has_entry(lora, "generator_lora") \
            else read_state_dict(lora)
        sd = merge_lora(sd, lora_sd, lora_alpha)
    given = _given_config(config)
    heads = num_heads or extra.get("num_heads") or (given.num_heads if given else None)
    cfg = infer_config(sd, detect_format(sd), num_heads=heads)
    if given is not None:
        check_config(cfg, given)
        cfg = given
    cfg = replace(cfg, param_dtype=dtype)
    return cfg, convert_transformer(sd, cfg, stream=True)  # tensors converted (and cast) as the writer asks


def _has_entry(path, key) -> bool:
    path = Path(path)
    if path.suffix not in (".pt", ".pth", ".bin"):
        return False
    from dfjax.convert.common import read_torch_file

    return key in read_torch_file(path)


def text_encoder_part(src, dtype="bfloat16"):
    from dfjax.convert.common import read_state_dict
    from dfjax.convert.text_encoder import infer_text_encoder_config, text_encoder_params

    sd = read_state_dict(src)
    cfg = infer_text_encoder_config(sd)
    cfg = replace(cfg, param_dtype=dtype)
    return cfg, text_encoder_params(sd, cfg, source=str(src), stream=True)


def vae_part(src, dtype="bfloat16"):
    from dfjax.convert.vae import convert_vae, infer_vae_config, read_vae_checkpoint

    sd, hf = read_vae_checkpoint(src)
    cfg = infer_vae_config(sd, hf, param_dtype=dtype)
    return cfg, convert_vae(sd, cfg, stream=True)


def convert_model_folder(src, out, *, config=None, num_heads=None, ema=True, lora=None, lora_alpha=None,
                         text_encoder=None, vae=None, tokenizer=None, dtype="bfloat16", overwrite=False,
                         flush_bytes=FLUSH_BYTES) -> Path:
    """Converts every given part into the folder, tensor by tensor as it is written (host memory holds about
    `flush_bytes` of the output, never a whole part), and makes the folder appear in one atomic step."""
    if Path(out).exists() and not overwrite:
        raise ConversionError(f"{out} already exists; choose another output path or pass --overwrite.")
    configs, params, dirs = {}, {}, {}
    configs["transformer"], params["transformer"] = transformer_part(src, config, num_heads, ema, lora, lora_alpha,
                                                                    dtype)
    if text_encoder:
        configs["text_encoder"], params["text_encoder"] = text_encoder_part(text_encoder, dtype)
    if vae:
        configs["vae"], params["vae"] = vae_part(vae, dtype)
    if tokenizer:
        from dfjax.text import load_tokenizer

        load_tokenizer(tokenizer)  # fails now, with the fix, rather than at generation time
        dirs["tokenizer"] = tokenizer
    meta = {k: v.__dict__ for k, v in configs.items()}
    return write_model_folder(out, meta, params, copy_dirs=dirs, overwrite=overwrite, flush_bytes=flush_bytes)
