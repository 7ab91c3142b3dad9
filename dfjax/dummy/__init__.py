"""Dummy Forcing, host side: frame attention scores, the DHP solver and the head plan."""

from dfjax.dummy.dhp import DUMMY, NEIGHBOUR, SINK, HeadType, solve_dhp
from dfjax.dummy.plan import HeadPlan, aggregate_profiles, dummy_overlap
from dfjax.dummy.scores import QueryRowSampling, frame_attention_scores, sample_query_rows

__all__ = [
    "DUMMY",
    "NEIGHBOUR",
    "SINK",
    "HeadPlan",
    "HeadType",
    "QueryRowSampling",
    "aggregate_profiles",
    "dummy_overlap",
    "frame_attention_scores",
    "sample_query_rows",
    "solve_dhp",
]
