"""Dummy Forcing over one video, as the AR loop (dfjax.pipeline) sees it.

Chunks 0..ar_start run on the warm-up layout (every head sees frame 0, the last L chunks and the chunk). The
cache-refresh forward of chunk ar_start is scored (ScoreProbe); on the host DHP turns the scores into a plan (or a
calibrated plan is given), rounded to the mesh's tensor size. From chunk ar_start + 1 on the heads are permuted
into the table's order, the caches rebuilt per cache group (hma.transition_cache) and the plan's layout runs.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import numpy as np

from dfjax.cache import AttentionLayout
from dfjax.config import DummyForcingConfig
from dfjax.dummy import hma
from dfjax.dummy.heads import HeadTable, standard_table
from dfjax.dummy.mesh import shardable_plan
from dfjax.dummy.plan import HeadPlan
from dfjax.dummy.scores import QueryRowSampling, ScoreProbe


class DummyForcing:
    """The algorithm's side of a Generator: layouts, the score probe, the plan. Holds no per-video state."""

    def __init__(self, cfg: DummyForcingConfig, num_layers: int, num_heads: int, tokens_per_frame: int,
                 chunk_frames: int, num_chunks: int, plan: HeadPlan | None = None, tensor: int = 1):
        self.cfg, self.tensor = cfg, tensor
        self.num_layers, self.num_heads = num_layers, num_heads
        self.num_dummy = cfg.dummy_count(num_layers, num_heads)  # range check before any work
        self.table = standard_table(cfg.local_context_length, cfg.packed_dummy)
        if plan is None and cfg.ar_start < 1:
            raise ValueError("Dummy Forcing scores the heads on chunk ar_start's attention to earlier chunks; "
                             "ar_start=0 has none. Use ar_start >= 1, or pass a calibrated plan (--profile).")
        self.first_layout = hma.warmup_layout(num_layers, num_heads, cfg.local_context_length, tokens_per_frame,
                                              chunk_frames)
        # after this chunk's refresh the plan applies (None: the video ends before any chunk could use it)
        self.switch_chunk = cfg.ar_start if cfg.ar_start + 1 < num_chunks else None
        # the probe that scores chunk ar_start's refresh (None: a plan is given, or nothing would use the scores)
        self.probe = ScoreProbe(self.first_layout, cfg.ar_start) if self.switch_chunk is not None else None
        self.plan = None
        if plan is not None:
            self.use(plan)

    def use(self, plan: HeadPlan) -> None:
        """A calibrated plan for every following video instead of online scores."""
        plan.validate(self.num_layers, self.num_heads)
        self.plan, self.probe = self.rounded(plan), None

    @cached_property
    def query_rows(self) -> np.ndarray | None:
        """The sampled query rows per layer [layers, R] of the scored refresh (seeded: the same for every video),
        or None for every row."""
        layout, d = self.first_layout, self.cfg
        sampling = QueryRowSampling(d.query_rows, d.query_fraction)
        lq = layout.tokens_per_frame * layout.chunk_frames
        per_layer = [sampling.rows(lq, layout.tokens_per_frame, (d.seed, i)) for i in range(self.num_layers)]
        return None if per_layer[0] is None else np.stack(per_layer)

    def rounded(self, plan: HeadPlan) -> HeadPlan:
        """The plan rounded to the mesh, then (long-context mode) its neighbour window sized."""
        plan = plan if self.tensor == 1 else shardable_plan(plan, self.tensor)
        return plan if self.cfg.long_context is None else long_context_plan(plan, self.cfg.long_context,
                                                                            self.first_layout.chunk_frames)

    def plan_from_scores(self, scores: np.ndarray) -> HeadPlan:
        """DHP on the host from one video's frame attention scores [layers, heads, 3]."""
        d = self.cfg
        return self.rounded(HeadPlan.from_scores(scores, self.num_dummy, d.normalize, self.table))

    def layout(self, plan: HeadPlan) -> AttentionLayout:
        return hma.plan_layout(plan, self.first_layout.tokens_per_frame, self.first_layout.chunk_frames)


def attention_frames(plan: HeadPlan, chunk_frames: int) -> int:
    """The latent frames all heads of all layers attend to per chunk once the caches are full (the attention cost
    of a chunk, in units of heads x frames)."""
    cost = {t.code: t.fixed_frames + (t.history_chunks + 1) * chunk_frames for t in plan.table.types}
    return sum(cost[code] for row in plan.head_types for code in row)


def long_context_plan(plan: HeadPlan, baseline_frames: int, chunk_frames: int) -> HeadPlan:
    """The plan with its neighbour heads' history as long as the attention of a baseline whose every head sees
    `baseline_frames` frames per chunk allows (whole chunks, never shorter than the plan's own): the paper's
    long-context mode, which spends what the dummy heads save on the heads that use history."""
    nbr = max(plan.table.history, key=lambda t: t.history_chunks)  # the standard table's neighbour type
    count = sum(row.count(nbr.code) for row in plan.head_types)
    if not count:
        return plan
    budget = plan.num_layers * plan.num_heads * baseline_frames
    others = attention_frames(plan, chunk_frames) - count * (nbr.history_chunks + 1) * chunk_frames
    chunks = max(nbr.history_chunks, (budget - others) // (count * chunk_frames) - 1)
    table = HeadTable(tuple(dataclasses.replace(t, history_chunks=chunks) if t is nbr else t
                            for t in plan.table.types))
    return HeadPlan(plan.head_types, table, scores=plan.scores, normalize=plan.normalize)


def context_summary(plan: HeadPlan, chunk_frames: int, baseline_frames: int | None = None) -> str:
    """What each head type sees besides its chunk, in frames; with a baseline, the neighbour heads' context
    against it and the attention cost against its."""
    text = plan.describe(chunk_frames)
    if baseline_frames is None:
        return text
    nbr = max(plan.table.history, key=lambda t: t.history_chunks)
    context, base = nbr.history_chunks * chunk_frames, baseline_frames - chunk_frames
    cost = attention_frames(plan, chunk_frames) / (plan.num_layers * plan.num_heads * baseline_frames)
    return (f"{text}. Long context: the {nbr.name} heads see {context} earlier frames, a baseline of "
            f"{baseline_frames} frames a chunk sees {base} ({context / max(base, 1):.2f}x), at "
            f"{100 * cost:.0f} % of its attention per chunk")
