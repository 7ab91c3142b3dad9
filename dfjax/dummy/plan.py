"""The head plan: which head of which layer is sink, neighbour or dummy, and its calibration profile file.

A HeadPlan is frozen and hashable, so it can be a static argument of jit: everything it shapes
(head permutations, per-group cache sizes) is fixed at compile time. Its scores and DHP
normalisation are provenance only: they are saved in the profile but do not take part in
equality or hashing, so two plans with the same head types compile to the same program.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from dfjax.dummy.dhp import DUMMY, NEIGHBOUR, SINK, solve_dhp

PROFILE_FORMAT = "dfjax.dummy_forcing.head_plan"
PROFILE_VERSION = 1
_PROFILE_KEYS = {
    "format", "version", "num_layers", "num_heads", "num_dummy", "local_context_length",
    "packed_dummy", "normalize", "head_types", "scores",
}


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """Per layer, per original head, a HeadType code (SINK=0, NEIGHBOUR=1, DUMMY=2).

    local_context_length: chunks of history kept by neighbour heads (besides the current chunk).
    packed_dummy: True = release (PAF): dummy heads keep the newest clean latent frame, so they
    share one attention call with the sink heads; False = paper: dummy heads see the current
    chunk only.
    """

    head_types: tuple[tuple[int, ...], ...]
    local_context_length: int = 1
    packed_dummy: bool = True
    # Provenance, saved in the profile; not compared or hashed (see the module docstring).
    scores: tuple[tuple[tuple[float, float, float], ...], ...] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    normalize: Literal["release", "none"] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        # Accept numpy arrays / lists and store plain int tuples, so the plan hashes and serialises.
        types = np.asarray(self.head_types)
        if types.ndim != 2 or types.size == 0:
            raise ValueError(f"head_types must be [num_layers, num_heads] and non-empty, got shape {types.shape}")
        if not np.isin(types, [SINK, NEIGHBOUR, DUMMY]).all():
            raise ValueError(f"head_types codes must be SINK=0, NEIGHBOUR=1 or DUMMY=2, got {sorted(set(types.ravel().tolist()))}")
        object.__setattr__(self, "head_types", tuple(tuple(int(t) for t in row) for row in types))
        if isinstance(self.local_context_length, bool) or not isinstance(self.local_context_length, (int, np.integer)):
            raise ValueError(f"local_context_length must be an int, got {self.local_context_length!r}")
        if self.local_context_length < 0:
            raise ValueError(
                f"local_context_length must be >= 0 (chunks kept by neighbour heads; the release uses 1), "
                f"got {self.local_context_length}"
            )
        object.__setattr__(self, "local_context_length", int(self.local_context_length))
        object.__setattr__(self, "packed_dummy", bool(self.packed_dummy))
        if self.scores is not None:
            scores = np.asarray(self.scores, dtype=np.float64)
            if scores.shape != types.shape + (3,):
                raise ValueError(f"scores must be [num_layers, num_heads, 3] = {types.shape + (3,)}, got {scores.shape}")
            object.__setattr__(self, "scores", tuple(tuple(tuple(float(x) for x in h) for h in layer) for layer in scores))
        if self.normalize not in (None, "release", "none"):
            raise ValueError(f"normalize must be 'release', 'none' or None, got {self.normalize!r}")

    # ---- constructors ----

    @classmethod
    def from_scores(
        cls,
        scores: np.ndarray,
        num_dummy: int,
        normalize: Literal["release", "none"] = "release",
        local_context_length: int = 1,
        packed_dummy: bool = True,
    ) -> HeadPlan:
        """Solve DHP on scores [num_layers, num_heads, 3] and keep the scores as provenance."""
        types = solve_dhp(scores, num_dummy, normalize)
        return cls(types, local_context_length, packed_dummy, scores=np.asarray(scores), normalize=normalize)

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        num_heads: int,
        head_type: int = NEIGHBOUR,
        local_context_length: int = 1,
        packed_dummy: bool = True,
    ) -> HeadPlan:
        """Every head of the same type (all NEIGHBOUR: a baseline-like local-window plan)."""
        return cls(np.full((num_layers, num_heads), int(head_type)), local_context_length, packed_dummy)

    # ---- shape and groups ----

    @property
    def num_layers(self) -> int:
        return len(self.head_types)

    @property
    def num_heads(self) -> int:
        return len(self.head_types[0])

    @property
    def num_dummy(self) -> int:
        """Dummy heads over all layers (derived from head_types, so it cannot disagree with them)."""
        return sum(row.count(DUMMY) for row in self.head_types)

    @cached_property
    def permutation(self) -> tuple[tuple[int, ...], ...]:
        """Per layer, original head indices ordered [sink heads, dummy heads, neighbour heads].

        Each group in ascending original order. Sink and dummy heads are adjacent because under
        PAF both keep one frame + the current chunk and run in one attention call.
        Permuted head j of layer l is original head permutation[l][j].
        """
        return tuple(
            tuple(h for kind in (SINK, DUMMY, NEIGHBOUR) for h, t in enumerate(row) if t == kind)
            for row in self.head_types
        )

    @cached_property
    def inverse_permutation(self) -> tuple[tuple[int, ...], ...]:
        """Per layer, the permuted position of each original head: outputs_original = outputs_permuted[inv]."""
        inverse = []
        for perm in self.permutation:
            inv = [0] * len(perm)
            for position, head in enumerate(perm):
                inv[head] = position
            inverse.append(tuple(inv))
        return tuple(inverse)

    @cached_property
    def group_sizes(self) -> tuple[tuple[int, int, int], ...]:
        """Per layer (n_sink, n_dummy, n_neighbour), in permutation order; any of them may be 0."""
        return tuple((row.count(SINK), row.count(DUMMY), row.count(NEIGHBOUR)) for row in self.head_types)

    def head_type_array(self) -> np.ndarray:
        """head_types as int8 [num_layers, num_heads]."""
        return np.asarray(self.head_types, dtype=np.int8)

    def dummy_heads(self) -> frozenset[tuple[int, int]]:
        """{(layer, head)} of every dummy head."""
        return frozenset((l, h) for l, row in enumerate(self.head_types) for h, t in enumerate(row) if t == DUMMY)

    def validate(self, num_layers: int, num_heads: int) -> None:
        """Raise if the plan was made for a model of another shape."""
        if (self.num_layers, self.num_heads) != (num_layers, num_heads):
            raise ValueError(
                f"profile made for a model with {self.num_layers} layers x {self.num_heads} heads, "
                f"this model has {num_layers} layers x {num_heads} heads; calibrate a profile for this model"
            )

    # ---- calibration profile (JSON) ----

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": PROFILE_FORMAT,
                "version": PROFILE_VERSION,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "num_dummy": self.num_dummy,
                "local_context_length": self.local_context_length,
                "packed_dummy": self.packed_dummy,
                "normalize": self.normalize,
                "head_types": [list(row) for row in self.head_types],
                "scores": None if self.scores is None else [[list(h) for h in layer] for layer in self.scores],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> HeadPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a head plan profile: invalid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a head plan profile: expected format {PROFILE_FORMAT!r}")
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"head plan profile version {data.get('version')!r} is not supported (expected {PROFILE_VERSION})")
        if set(data) != _PROFILE_KEYS:
            raise ValueError(
                f"malformed head plan profile: missing keys {sorted(_PROFILE_KEYS - set(data))}, "
                f"unknown keys {sorted(set(data) - _PROFILE_KEYS)}"
            )
        if not isinstance(data["packed_dummy"], bool):
            raise ValueError(f"malformed head plan profile: packed_dummy must be true or false, got {data['packed_dummy']!r}")
        try:
            plan = cls(
                data["head_types"],
                data["local_context_length"],
                data["packed_dummy"],
                scores=data["scores"],
                normalize=data["normalize"],
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"malformed head plan profile: {e}") from None
        declared = (data["num_layers"], data["num_heads"], data["num_dummy"])
        if declared != (plan.num_layers, plan.num_heads, plan.num_dummy):
            raise ValueError(
                f"malformed head plan profile: declares {declared[0]} layers x {declared[1]} heads with "
                f"{declared[2]} dummy, but head_types hold {plan.num_layers} x {plan.num_heads} with {plan.num_dummy}"
            )
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HeadPlan:
        try:
            return cls.from_json(Path(path).read_text())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def aggregate_profiles(score_sets: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of per-prompt scores [num_layers, num_heads, 3]: a calibration over a prompt set."""
    if len(score_sets) == 0:
        raise ValueError("aggregate_profiles needs at least one score array")
    shapes = {np.shape(s) for s in score_sets}
    if len(shapes) != 1:
        raise ValueError(f"all score arrays must have the same shape, got {sorted(shapes)}")
    return np.mean(np.stack([np.asarray(s, dtype=np.float64) for s in score_sets]), axis=0)


def dummy_overlap(plan_a: HeadPlan, plan_b: HeadPlan) -> float:
    """Jaccard index of the two plans' dummy head sets (1.0 when both have none)."""
    plan_b.validate(plan_a.num_layers, plan_a.num_heads)
    a, b = plan_a.dummy_heads(), plan_b.dummy_heads()
    union = a | b
    return len(a & b) / len(union) if union else 1.0

