"""Prompts -> UMT5 context embeddings: tokenizer loading, prompt cleaning, a cached jit-compiled encoder."""

from __future__ import annotations

import html
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfjax.model.text_encoder import UMT5Config, UMT5Encoder
from dfjax.model_io import load_params, read_config
from dfjax.params import abstract_params, assign_params

TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


class TokenizerNotFoundError(FileNotFoundError):
    """A tokenizer folder that is missing or holds no tokenizer files."""


def load_tokenizer(folder: str | Path):
    """A UMT5 tokenizer from a local folder (never the network): the Wan2.1 release's google/umt5-xxl folder,
    a dfjax model folder's tokenizer/, or one written by make_tiny_tokenizer."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # not its "PyTorch was not found" on every run
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerNotFoundError(
            f"{folder}: no tokenizer found (need one of {', '.join(TOKENIZER_FILES)}). Point to the google/umt5-xxl "
            "folder of the Wan2.1 release, or to the tokenizer/ folder of a dfjax model folder."
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def clean_prompt(text: str) -> str:
    """The Wan release's cleaning: fix mojibake, unescape HTML (twice, for double-escaped text), collapse whitespace."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip()


def tokenize(tokenizer, prompts: Sequence[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cleaned prompts -> (ids, mask), both [B, text_len] int32; padded or truncated, ending in </s>."""
    out = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        truncation=True,
        max_length=text_len,
        add_special_tokens=True,
        return_tensors="np",
    )
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


class TextEncoder:
    """Tokenizer + jit-compiled UMT5 encoder; embeddings are cached per cleaned prompt for the life of the object."""

    def __init__(self, tokenizer, encoder: UMT5Encoder):
        self.tokenizer = tokenizer
        self.cfg: UMT5Config = encoder.cfg
        graphdef, state = nnx.split(encoder)
        self._state = state
        self._encode = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
        self._cache: dict[str, jax.Array] = {}

    @classmethod
    def from_model_folder(cls, folder: str | Path) -> TextEncoder:
        """Loads the 'text_encoder' part and tokenizer/ of a dfjax model folder."""
        cfg = UMT5Config(**read_config(folder)["text_encoder"])
        make = lambda: UMT5Encoder(cfg, nnx.Rngs(0))
        encoder = assign_params(nnx.eval_shape(make), load_params(folder, "text_encoder", abstract_params(make)))
        return cls(load_tokenizer(Path(folder) / "tokenizer"), encoder)

    def __call__(self, prompts: Sequence[str]) -> jax.Array:
        """prompts -> [B, text_len, d_model] in the model dtype, zero at padded positions."""
        keys = [clean_prompt(p) for p in prompts]
        for key in dict.fromkeys(keys):
            if key not in self._cache:
                self._warn_if_cut(key)
                # One prompt per call: a single compiled shape, whatever the batch.
                ids, mask = tokenize(self.tokenizer, [key], self.cfg.text_len)
                self._cache[key] = self._encode(self._state, ids, mask)[0]
        return jnp.stack([self._cache[k] for k in keys])


    def _warn_if_cut(self, prompt: str) -> None:
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) > self.cfg.text_len:
            kept = self.tokenizer.decode(ids[:self.cfg.text_len - 1], skip_special_tokens=True).split()
            warnings.warn(f"the prompt is {len(ids)} tokens and the text encoder takes {self.cfg.text_len}: it was cut "
                          f"after \"...{' '.join(kept[-6:])}\"", stacklevel=3)


def make_tiny_tokenizer(folder: str | Path, sentences: Sequence[str], vocab_size: int = 64) -> Path:
    """Trains a small unigram sentencepiece model on `sentences` (offline) and saves it as a T5 tokenizer folder.

    Ids follow T5: <pad>=0, </s>=1, <unk>=2. `vocab_size` is an upper bound (small corpora give fewer pieces).
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(model.getvalue())
        # transformers converts the sentencepiece model to its tokenizers backend; no sentinel ids for a tiny vocab.
        T5Tokenizer.from_pretrained(tmp, extra_ids=0).save_pretrained(str(folder))
    return folder
