"""Frame attention scores: how much of each head's softmax mass falls on sink, neighbour and current keys.

Measured once per video, in the clean cache-refresh forward (t = 0) of AR step ar_start, on batch
element 0, over a seeded sample of the chunk's query rows (docs/dummy-forcing.md). The result feeds
the DHP solver (dfjax/dummy/dhp.py). ScoreProbe is the hook through which the DiT measures them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfjax.cache import AttentionLayout
from dfjax.dummy.heads import SCORE_COLUMNS


def frame_attention_scores(
    q: jax.Array,
    k: jax.Array,
    kv_len: int | jax.Array,
    sink_tokens: int,
    current_tokens: int,
    rows: jax.Array | np.ndarray | None = None,
    *,
    block_rows: int = 128,
) -> jax.Array:
    """Per head, the mean over query rows of the softmax mass on the [sink, neighbour, current] key groups.

    q: [B, Lq, H, D] queries of the chunk (RoPE applied). k: [B, Lk, H, D] every key the forward
    attends to, laid out [sink frames ; neighbour frames ; current chunk], of which the first kv_len
    are valid (kv_len may be traced). Softmax of q.k/sqrt(D) over the valid keys, no other mask.
    Groups: sink = keys [0, sink_tokens), current = [kv_len - current_tokens, kv_len), neighbour =
    the valid keys between. They must not overlap: sink_tokens + current_tokens <= kv_len (checked
    when kv_len is a Python int). rows: int32 indices into Lq (a sample, repeats allowed) or None for
    all rows. Batch element 0 only. Returns float32 [H, 3] (the SCORE_COLUMNS).

    Rows are processed block_rows at a time, so the largest intermediate is [H, block_rows, Lk].
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q [B, Lq, H, D] and k [B, Lk, H, D] with equal H, D; got {q.shape}, {k.shape}")
    num_query, num_heads, head_dim = q.shape[1:]
    num_keys = k.shape[1]
    if sink_tokens < 0 or current_tokens < 1 or sink_tokens + current_tokens > num_keys:
        raise ValueError(
            f"need sink_tokens >= 0, current_tokens >= 1 and sink_tokens + current_tokens <= Lk = {num_keys}; "
            f"got sink_tokens={sink_tokens}, current_tokens={current_tokens}"
        )
    if isinstance(kv_len, (int, np.integer)) and not sink_tokens + current_tokens <= kv_len <= num_keys:
        raise ValueError(
            f"kv_len must lie in [sink_tokens + current_tokens, Lk] = [{sink_tokens + current_tokens}, {num_keys}]; "
            f"got {kv_len}"
        )
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")

    rows = jnp.arange(num_query, dtype=jnp.int32) if rows is None else jnp.asarray(rows, jnp.int32)
    if rows.ndim != 1 or rows.shape[0] == 0:
        raise ValueError(f"rows must be a non-empty 1-D index array, got shape {rows.shape}")
    num_rows = rows.shape[0]
    block = min(block_rows, num_rows)
    num_blocks = -(-num_rows // block)
    # The last block is padded with row 0; its padded rows get weight 0.
    padded_rows = jnp.pad(rows, (0, num_blocks * block - num_rows)).reshape(num_blocks, block)
    row_weight = (jnp.arange(num_blocks * block) < num_rows).astype(jnp.float32).reshape(num_blocks, block)

    key_index = jnp.arange(num_keys)
    valid = key_index < kv_len
    # Padding keys get probability 0 below, so they may fall in the current group here.
    sink = key_index < sink_tokens
    current = key_index >= kv_len - current_tokens
    neighbour = ~sink & ~current
    group_of_key = jnp.stack([sink, neighbour, current], axis=-1).astype(jnp.float32)  # [Lk, SCORE_COLUMNS]

    q0, k0 = jnp.asarray(q[0]), jnp.asarray(k[0])
    scale = 1.0 / math.sqrt(head_dim)
    # Exact fp32 logits: bf16 (or f16) products are exact in fp32, so the tensor cores' fp32
    # accumulation suffices; fp32 inputs need HIGHEST (TF32 would blur near-tied heads).
    precision = jax.lax.Precision.HIGHEST
    logit_precision = precision if jnp.float32 in (q0.dtype, k0.dtype) else None

    def block_mass(args):
        index, weight = args
        logits = jnp.einsum("bhd,khd->hbk", q0[index], k0, precision=logit_precision,
                            preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
        mass = jnp.einsum("hbk,kg->hbg", probs, group_of_key, precision=precision)
        return jnp.einsum("hbg,b->hg", mass, weight)

    return jax.lax.map(block_mass, (padded_rows, row_weight)).sum(axis=0) / num_rows


def sample_query_rows(num_query_tokens: int, count: int, seed: int | Sequence[int]) -> np.ndarray:
    """`count` row indices drawn uniformly with replacement from [0, num_query_tokens), as the release does.

    seed goes to numpy's default_rng; pass (global_seed, layer) for an independent draw per layer.
    """
    if num_query_tokens < 1 or count < 1:
        raise ValueError(f"need num_query_tokens >= 1 and count >= 1, got {num_query_tokens}, {count}")
    return np.random.default_rng(seed).integers(0, num_query_tokens, size=count).astype(np.int32)


@dataclass(frozen=True)
class QueryRowSampling:
    """Which query rows the frame attention score averages over.

    release: tokens_per_frame // 3 rows (520 of the 4680 queries of a 3-frame 480P chunk, 1/9).
    paper: 25% of the chunk's queries. fraction: `fraction` of them. exact: every row, no sampling.
    The sampled modes draw with replacement (sample_query_rows).
    """

    mode: Literal["release", "paper", "fraction", "exact"] = "release"
    fraction: float | None = None

    def __post_init__(self):
        if self.mode not in ("release", "paper", "fraction", "exact"):
            raise ValueError(f"mode must be 'release', 'paper', 'fraction' or 'exact', got {self.mode!r}")
        if self.mode == "fraction":
            if self.fraction is None or not 0.0 < self.fraction <= 1.0:
                raise ValueError(f"mode 'fraction' needs fraction in (0, 1], got {self.fraction}")
        elif self.fraction is not None:
            raise ValueError(f"fraction is only read in mode 'fraction'; drop it or set mode='fraction' (mode={self.mode!r})")

    def num_rows(self, num_query_tokens: int, tokens_per_frame: int) -> int | None:
        """How many rows are drawn; None in exact mode (all rows, each once)."""
        if self.mode == "exact":
            return None
        if self.mode == "release":
            return max(1, tokens_per_frame // 3)
        fraction = 0.25 if self.mode == "paper" else self.fraction
        return max(1, round(fraction * num_query_tokens))

    def rows(self, num_query_tokens: int, tokens_per_frame: int, seed: int | Sequence[int]) -> np.ndarray | None:
        """The row indices for frame_attention_scores (None = exact)."""
        count = self.num_rows(num_query_tokens, tokens_per_frame)
        return None if count is None else sample_query_rows(num_query_tokens, count, seed)


@dataclass(frozen=True)
class ScoreProbe:
    """The DiT hook (dfjax.model.transformer.ChunkCall.probe) that measures the frame attention scores.

    Called in every self-attention layer with the chunk's queries and the layer's caches after the chunk's K/V
    were written; `layout` is the warm-up layout (one group per layer) and `chunk` the scored chunk. It scores
    only the cache-refresh forward of that chunk (zeros elsewhere, so the forwards of a chunk can add their
    outputs up). Traced input (ChunkStep.probe): the sampled query rows [layers, R] int32, or None for all rows.
    """

    layout: AttentionLayout
    chunk: int

    def __post_init__(self):
        if any(len(layer) != 1 for layer in self.layout.layers):
            raise ValueError("frame attention scores are measured on a layout of one head group per layer.")

    def key_order(self) -> np.ndarray:
        """Token indices into a layer's cache that list the keys of the scored chunk in frame order
        [frame 0 ; neighbour frames ; chunk frames], so that the scores can slice sink / neighbour / current."""
        g = self.layout.layers[0][0]
        tpf, cf = self.layout.tokens_per_frame, self.layout.chunk_frames
        end = (self.chunk + 1) * cf
        frames = [0] + [f for f in range(1, end) if g.holds(f, end)]
        slots = [g.static_slot(f) for f in frames]
        return np.concatenate([np.arange(s * tpf, (s + 1) * tpf) for s in slots]).astype(np.int32)

    def zeros(self, num_layers: int, num_heads: int) -> jax.Array:
        """The stacked output of the layers when nothing was scored."""
        return jnp.zeros((num_layers, num_heads, len(SCORE_COLUMNS)), jnp.float32)

    def __call__(self, layer: int, q, groups, step) -> jax.Array:
        order = self.key_order()
        tpf, cf = self.layout.tokens_per_frame, self.layout.chunk_frames
        rows = None if step.probe is None else step.probe[layer]

        def score():
            keys = groups[0].k[:, order]
            return frame_attention_scores(q, keys, len(order), tpf, q.shape[1], rows)

        now = step.is_refresh & (step.frame_start == self.chunk * cf)
        return jax.lax.cond(now, score, lambda: jnp.zeros((q.shape[2], len(SCORE_COLUMNS)), jnp.float32))
