"""UMT5 encoder checkpoints -> dfjax flat parameters.

Two sources, told apart by their keys:
  wan: the Wan2.1 release's models_t5_umt5-xxl-enc-bf16.pth (token_embedding, blocks.N.*, norm).
  hf:  a transformers UMT5EncoderModel (shared / encoder.embed_tokens, encoder.block.N.layer.*),
       as a folder of .safetensors shards or one .safetensors file.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from flax import nnx

from dfjax.convert.common import ConversionError, Rule, apply_key_map, linear, read_state_dict
from dfjax.model.text_encoder import UMT5Config, UMT5Encoder
from dfjax.params import abstract_params

WAN_RULES = [
    Rule(r"token_embedding\.weight", "token_embedding.embedding"),
    Rule(r"blocks\.(\d+)\.norm1\.weight", r"blocks.\1.norm1.scale"),
    Rule(r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"blocks.\1.attn.\2.kernel", linear),
    Rule(r"blocks\.(\d+)\.pos_embedding\.embedding\.weight", r"blocks.\1.attn.pos_bias"),
    Rule(r"blocks\.(\d+)\.norm2\.weight", r"blocks.\1.norm2.scale"),
    Rule(r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"blocks.\1.ffn.wi_0.kernel", linear),
    Rule(r"blocks\.(\d+)\.ffn\.fc1\.weight", r"blocks.\1.ffn.wi_1.kernel", linear),
    Rule(r"blocks\.(\d+)\.ffn\.fc2\.weight", r"blocks.\1.ffn.wo.kernel", linear),
    Rule(r"norm\.weight", "norm.scale"),
]

_HF_BLOCK = r"encoder\.block\.(\d+)\.layer"
HF_RULES = [
    Rule(r"shared\.weight", "token_embedding.embedding"),
    Rule(_HF_BLOCK + r"\.0\.layer_norm\.weight", r"blocks.\1.norm1.scale"),
    Rule(_HF_BLOCK + r"\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.kernel", linear),
    Rule(_HF_BLOCK + r"\.0\.SelfAttention\.relative_attention_bias\.weight", r"blocks.\1.attn.pos_bias"),
    Rule(_HF_BLOCK + r"\.1\.layer_norm\.weight", r"blocks.\1.norm2.scale"),
    Rule(_HF_BLOCK + r"\.1\.DenseReluDense\.(wi_0|wi_1|wo)\.weight", r"blocks.\1.ffn.\2.kernel", linear),
    Rule(r"encoder\.final_layer_norm\.weight", "norm.scale"),
]

# Per format: the rule table and the torch names of the tensors infer_text_encoder_config reads.
_FORMATS = {
    "wan": dict(
        rules=WAN_RULES,
        embedding="token_embedding.weight",
        block=r"blocks\.(\d+)\.",
        q="blocks.0.attn.q.weight",
        pos_bias="blocks.0.pos_embedding.embedding.weight",
        wi_0="blocks.0.ffn.gate.0.weight",
    ),
    "hf": dict(
        rules=HF_RULES,
        embedding="shared.weight",
        block=_HF_BLOCK + r"\.",
        q="encoder.block.0.layer.0.SelfAttention.q.weight",
        pos_bias="encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        wi_0="encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
    ),
}


def detect_format(sd: dict[str, np.ndarray]) -> str:
    if "token_embedding.weight" in sd:
        return "wan"
    if "shared.weight" in sd or "encoder.embed_tokens.weight" in sd:
        return "hf"
    raise ConversionError(
        "not a UMT5 encoder checkpoint: found neither 'token_embedding.weight' (Wan .pth) nor "
        f"'shared.weight' / 'encoder.embed_tokens.weight' (transformers); first keys: {sorted(sd)[:5]}."
    )


def _untie_hf_embedding(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers ties encoder.embed_tokens to shared and may store either or both: keep one, as 'shared'."""
    if "encoder.embed_tokens.weight" not in sd:
        return sd
    sd = dict(sd)
    tied = sd.pop("encoder.embed_tokens.weight")
    if "shared.weight" not in sd:
        sd["shared.weight"] = tied
    elif not np.array_equal(sd["shared.weight"], tied):
        raise ConversionError("'encoder.embed_tokens.weight' differs from 'shared.weight'; they must be tied.")
    return sd


def _canonical(sd: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
    fmt = detect_format(sd)
    return fmt, (_untie_hf_embedding(sd) if fmt == "hf" else sd)


def infer_text_encoder_config(sd: dict[str, np.ndarray], base: UMT5Config | None = None) -> UMT5Config:
    """Sizes read from tensor shapes; what shapes cannot tell (max_distance, eps, text_len, dtypes) comes from `base`
    (default: UMT5Config.xxl())."""
    fmt, sd = _canonical(sd)
    names = _FORMATS[fmt]
    for role in ("embedding", "q", "pos_bias", "wi_0"):
        if names[role] not in sd:
            raise ConversionError(f"{fmt} UMT5 checkpoint has no '{names[role]}'; cannot infer the model size.")
    vocab_size, d_model = sd[names["embedding"]].shape
    num_buckets, num_heads = sd[names["pos_bias"]].shape
    inner = sd[names["q"]].shape[0]
    if inner % num_heads:
        raise ConversionError(f"'{names['q']}' has {inner} outputs, not a multiple of {num_heads} heads.")
    num_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(names["block"], k)))
    return dataclasses.replace(
        base or UMT5Config.xxl(),
        vocab_size=int(vocab_size),
        d_model=int(d_model),
        num_layers=num_layers,
        num_heads=int(num_heads),
        d_kv=int(inner // num_heads),
        d_ff=int(sd[names["wi_0"]].shape[0]),
        num_buckets=int(num_buckets),
    )


def text_encoder_params(sd: dict[str, np.ndarray], cfg: UMT5Config, source: str = "checkpoint", stream: bool = False):
    """A UMT5 state dict (either format) -> flat dfjax params, every key and shape checked against `cfg`
    (stream: see convert.common.apply_key_map)."""
    fmt, sd = _canonical(sd)
    expected = abstract_params(lambda: UMT5Encoder(cfg, nnx.Rngs(0)))
    # stored in the model's parameter dtype (bf16 through ml_dtypes), cast tensor by tensor
    return apply_key_map(sd, _FORMATS[fmt]["rules"], expected, source=f"{source} ({fmt} UMT5)", stream=stream)


def convert_text_encoder(src: str | Path, cfg: UMT5Config) -> dict[str, np.ndarray]:
    """Reads a Wan .pth, a transformers folder or a .safetensors file and returns flat params for `cfg`."""
    return text_encoder_params(read_state_dict(src), cfg, source=str(src))
