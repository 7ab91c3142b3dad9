"""UMT5 text encoder: parity with transformers, both checkpoint formats, tokenizer and prompt cleaning."""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dfjax.convert.common import ConversionError
from dfjax.convert.text_encoder import convert_text_encoder, infer_text_encoder_config, text_encoder_params
from dfjax.model.text_encoder import UMT5Config, UMT5Encoder, relative_position_buckets
from dfjax.model_io import write_model_folder
from dfjax.params import assign_params
from dfjax.text import (
    TextEncoder,
    TokenizerNotFoundError,
    clean_prompt,
    load_tokenizer,
    make_tiny_tokenizer,
    tokenize,
)

CFG = UMT5Config.tiny()
SENTENCES = [
    "a cat sits on a red mat",
    "a dog runs through the park at night",
    "the quick brown fox jumps over the lazy dog",
    "video of a car driving along the coast",
]

# HF name -> Wan release name: the inverse of the converter's Wan T5 .pth -> HF UMT5 map (docs/model.md), written
# independently of the converter so the Wan path is checked against transformers' own weights.
HF_TO_WAN = [
    (r"shared\.weight", "token_embedding.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm", r"blocks.\1.norm1"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias", r"blocks.\1.pos_embedding.embedding"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.", r"blocks.\1.attn."),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm", r"blocks.\1.norm2"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0", r"blocks.\1.ffn.gate.0"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1", r"blocks.\1.ffn.fc1"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo", r"blocks.\1.ffn.fc2"),
    (r"encoder\.final_layer_norm", "norm"),
]


def to_wan_name(key: str) -> str:
    for pattern, repl in HF_TO_WAN:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise KeyError(key)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import UMT5Config as HFConfig
    from transformers import UMT5EncoderModel

    hf_cfg = HFConfig(
        vocab_size=CFG.vocab_size, d_model=CFG.d_model, num_layers=CFG.num_layers, num_heads=CFG.num_heads,
        d_kv=CFG.d_kv, d_ff=CFG.d_ff, relative_attention_num_buckets=CFG.num_buckets,
        relative_attention_max_distance=CFG.max_distance, layer_norm_epsilon=CFG.eps,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )
    torch.manual_seed(0)
    model = UMT5EncoderModel._from_config(hf_cfg, attn_implementation="eager").eval()
    # Random weights everywhere, norms included, scaled so that (unscaled) attention logits stay O(1)
    # and the softmax is not saturated: a saturated softmax would hide errors in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name or name == "shared.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module")
def hf_state_dict(hf_model):
    return {k: v.numpy().copy() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def wan_state_dict(hf_state_dict):
    return {to_wan_name(k): v for k, v in hf_state_dict.items() if k != "encoder.embed_tokens.weight"}


def make_inputs(length=40):
    # Longer than max_distance (16) so the log-spaced buckets are used; two different padding lengths.
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CFG.vocab_size, size=(2, length)).astype(np.int32)
    mask = np.zeros((2, length), np.int32)
    mask[0, :length] = 1
    mask[1, :25] = 1
    ids[mask == 0] = 0
    return ids, mask


def flax_encoder(params, cfg=CFG):
    return assign_params(UMT5Encoder(cfg, nnx.Rngs(1)), params)


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 16), (16, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    from transformers import UMT5Config as HFConfig
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    attn = UMT5Attention(
        HFConfig(relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance),
        has_relative_attention_bias=True,
    )
    length = 600
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    want = attn._relative_position_bucket(rel).numpy()
    np.testing.assert_array_equal(relative_position_buckets(length, length, num_buckets, max_distance), want)


@pytest.mark.parametrize("source", ["hf_safetensors", "wan_pth"])
def test_matches_transformers(source, hf_model, wan_state_dict, tmp_path):
    if source == "hf_safetensors":
        hf_model.save_pretrained(tmp_path)  # stores the tied embedding once, as shared.weight
        src = tmp_path
    else:
        src = tmp_path / "models_t5_umt5-xxl-enc.pth"
        torch.save({k: torch.from_numpy(v) for k, v in wan_state_dict.items()}, src)
    params = convert_text_encoder(src, CFG)
    ids, mask = make_inputs()

    out = np.asarray(flax_encoder(params)(jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        want = hf_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).last_hidden_state
    want = want.numpy()

    valid = mask.astype(bool)
    # fp32 on both sides, outputs O(1) after the final RMSNorm: only summation order differs (einsum vs
    # matmul, softmax reductions), a few ulp (1e-7) per op over 2 layers, well under 1e-5.
    np.testing.assert_allclose(out[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert np.abs(want[valid]).max() > 0.5  # the comparison is not between near-zero tensors
    assert np.all(out[~valid] == 0)


def test_infer_config_from_either_format(hf_state_dict, wan_state_dict):
    base = dataclasses.replace(CFG, num_layers=7, d_ff=5, vocab_size=3)  # sizes must come from shapes
    assert infer_text_encoder_config(hf_state_dict, base=base) == CFG
    assert infer_text_encoder_config(wan_state_dict, base=base) == CFG
    xxl_sized = infer_text_encoder_config(wan_state_dict)
    assert (xxl_sized.d_model, xxl_sized.max_distance, xxl_sized.text_len) == (CFG.d_model, 128, 512)


def test_hf_tied_embedding_stored_either_way(hf_state_dict):
    both = text_encoder_params(hf_state_dict, CFG)
    only_tied = {k: v for k, v in hf_state_dict.items() if k != "shared.weight"}
    assert set(text_encoder_params(only_tied, CFG)) == set(both)
    np.testing.assert_array_equal(
        text_encoder_params(only_tied, CFG)["token_embedding.embedding"], both["token_embedding.embedding"]
    )
    untied = dict(hf_state_dict, **{"encoder.embed_tokens.weight": hf_state_dict["shared.weight"] + 1})
    with pytest.raises(ConversionError, match="encoder.embed_tokens.weight"):
        text_encoder_params(untied, CFG)


def test_malformed_checkpoints_name_the_key(wan_state_dict):
    missing = {k: v for k, v in wan_state_dict.items() if k != "blocks.1.ffn.fc1.weight"}
    with pytest.raises(ConversionError, match=r"blocks\.1\.ffn\.wi_1\.kernel"):
        text_encoder_params(missing, CFG)

    extra = dict(wan_state_dict, **{"blocks.0.attn.extra.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn\.extra\.weight"):
        text_encoder_params(extra, CFG)

    bad = dict(wan_state_dict, **{"blocks.0.attn.q.weight": np.zeros((CFG.d_model, CFG.d_model), np.float32)})
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn\.q\.weight"):
        text_encoder_params(bad, CFG)

    with pytest.raises(ConversionError, match="not a UMT5 encoder checkpoint"):
        text_encoder_params({"model.weight": np.zeros(3)}, CFG)


def test_converted_params_take_the_config_dtype(wan_state_dict):
    bf16 = dataclasses.replace(CFG, param_dtype="bfloat16")
    params = text_encoder_params(wan_state_dict, bf16)
    assert {v.dtype for v in params.values()} == {jnp.dtype("bfloat16")}


@pytest.mark.parametrize(
    ("field", "value"),
    [("d_model", 0), ("num_layers", 2.0), ("num_buckets", 7), ("max_distance", 2), ("eps", 0.0), ("dtype", "float16")],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"UMT5Config.{field}"):
        dataclasses.replace(CFG, **{field: value})


def test_xxl_preset_matches_reference():
    cfg = UMT5Config.xxl()
    assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff) == (
        256384, 4096, 24, 64, 64, 10240)
    assert (cfg.num_buckets, cfg.max_distance, cfg.text_len) == (32, 128, 512)


def test_clean_prompt():
    assert clean_prompt("  a\tcat\n\n  on   a mat  ") == "a cat on a mat"
    assert clean_prompt("salt &amp;amp; pepper") == "salt & pepper"  # double-escaped HTML
    assert clean_prompt("caf\u00c3\u00a9 au lait") == "caf\u00e9 au lait"  # mojibake fixed by ftfy


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", SENTENCES * 4)


def test_tiny_tokenizer_round_trips(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert len(tok) <= CFG.vocab_size
    ids, mask = tokenize(tok, ["a  cat sits\non the mat", SENTENCES[2]], text_len=CFG.text_len)
    assert ids.shape == mask.shape == (2, CFG.text_len) and ids.dtype == mask.dtype == np.int32
    n = int(mask[0].sum())
    assert ids[0, n - 1] == tok.eos_token_id == 1 and np.all(ids[0, n:] == tok.pad_token_id) and tok.pad_token_id == 0
    assert tok.decode(ids[0], skip_special_tokens=True) == "a cat sits on the mat"
    assert mask[1].all() and ids[1, -1] == 1  # truncated to text_len, still ending in </s>


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    for folder in (tmp_path / "nowhere", tmp_path):  # absent, and present without tokenizer files
        with pytest.raises(TokenizerNotFoundError, match=re.escape(str(folder)) + ".*umt5-xxl"):
            load_tokenizer(folder)


def test_text_encoder_from_model_folder_caches_per_prompt(tokenizer_dir, wan_state_dict, tmp_path):
    params = text_encoder_params(wan_state_dict, CFG)
    folder = write_model_folder(
        tmp_path / "model", {"text_encoder": dataclasses.asdict(CFG)}, {"text_encoder": params},
        copy_dirs={"tokenizer": tokenizer_dir},
    )
    enc = TextEncoder.from_model_folder(folder)
    out = enc([SENTENCES[0], "  " + SENTENCES[0] + " ", SENTENCES[1]])
    assert out.shape == (3, CFG.text_len, CFG.d_model)
    assert len(enc._cache) == 2  # the two spellings of the first prompt clean to the same text
    np.testing.assert_array_equal(out[0], out[1])

    ids, mask = tokenize(load_tokenizer(tokenizer_dir), [SENTENCES[1]], CFG.text_len)
    direct = flax_encoder(params)(jnp.asarray(ids), jnp.asarray(mask))[0]
    np.testing.assert_allclose(np.asarray(out[2]), np.asarray(direct), atol=1e-5)  # jit fuses differently: ulp-level
    assert np.all(np.asarray(out[2])[mask[0] == 0] == 0)
