"""Dummy Forcing, all of it: the head-type table, frame attention scores, DHP, head plans and profiles, HMA (layouts,
head permutation, cache transition), the rounding of a plan to a mesh, and the algorithm's side of the AR loop."""

from dfjax.dummy.dhp import solve_dhp
from dfjax.dummy.heads import DUMMY, NEIGHBOUR, SINK, HeadTable, HeadType, standard_table
from dfjax.dummy.plan import HeadPlan, aggregate_profiles, dummy_overlap
from dfjax.dummy.scores import QueryRowSampling, ScoreProbe, frame_attention_scores, sample_query_rows

__all__ = [
    "DUMMY",
    "NEIGHBOUR",
    "SINK",
    "HeadPlan",
    "HeadTable",
    "HeadType",
    "QueryRowSampling",
    "ScoreProbe",
    "aggregate_profiles",
    "dummy_overlap",
    "frame_attention_scores",
    "sample_query_rows",
    "solve_dhp",
    "standard_table",
]
