"""The head plan: the type of every head of every layer, with the head table it refers to, and its profile file.

A HeadPlan is frozen and hashable, so it can be a static argument of jit: everything it shapes (head
permutations, per-group cache sizes) is fixed at compile time. Its scores and DHP normalisation are provenance
only: they are saved in the profile but do not take part in equality or hashing, so two plans with the same head
types compile to the same program.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from dfjax.dummy.dhp import Normalize, solve_dhp
from dfjax.dummy.heads import DUMMY, NEIGHBOUR, HeadTable, HeadType, standard_table

PROFILE_FORMAT = "dfjax.dummy_forcing.head_plan"
PROFILE_VERSION = 2  # version 1 had no head table: its local_context_length / packed_dummy name a standard one
_PROFILE_KEYS = {
    1: {"format", "version", "num_layers", "num_heads", "num_dummy", "local_context_length", "packed_dummy",
        "normalize", "head_types", "scores"},
    2: {"format", "version", "num_layers", "num_heads", "num_dummy", "head_table", "normalize", "head_types",
        "scores"},
}
_TYPE_KEYS = {f.name for f in dataclasses.fields(HeadType)}


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """Per layer, per original head, a code of `table` (the standard table: SINK=0, NEIGHBOUR=1, DUMMY=2)."""

    head_types: tuple[tuple[int, ...], ...]
    table: HeadTable = standard_table()
    # Provenance, saved in the profile; not compared or hashed (see the module docstring).
    scores: tuple[tuple[tuple[float, float, float], ...], ...] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    normalize: Normalize | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        # Accept numpy arrays / lists and store plain int tuples, so the plan hashes and serialises.
        types = np.asarray(self.head_types)
        if types.ndim != 2 or types.size == 0:
            raise ValueError(f"head_types must be [num_layers, num_heads] and non-empty, got shape {types.shape}")
        if not isinstance(self.table, HeadTable):
            raise ValueError(f"table must be a HeadTable, got {type(self.table).__name__}")
        if not np.isin(types, self.table.codes).all():
            raise ValueError(f"head_types codes must be those of the head table {self.table.codes}, got "
                             f"{sorted(set(types.ravel().tolist()))}")
        object.__setattr__(self, "head_types", tuple(tuple(int(t) for t in row) for row in types))
        if self.scores is not None:
            scores = np.asarray(self.scores, dtype=np.float64)
            if scores.shape != types.shape + (3,):
                raise ValueError(f"scores must be [num_layers, num_heads, 3] = {types.shape + (3,)}, got {scores.shape}")
            object.__setattr__(self, "scores", tuple(tuple(tuple(float(x) for x in h) for h in layer) for layer in scores))
        if self.normalize not in (None, "release", "none"):
            raise ValueError(f"normalize must be 'release', 'none' or None, got {self.normalize!r}")

    # ---- constructors ----

    @classmethod
    def from_scores(cls, scores: np.ndarray, num_dummy: int, normalize: Normalize = "release",
                    table: HeadTable | None = None) -> HeadPlan:
        """Solve DHP on scores [num_layers, num_heads, 3] and keep the scores as provenance."""
        table = table or standard_table()
        types = solve_dhp(scores, num_dummy, normalize, table)
        return cls(types, table, scores=np.asarray(scores), normalize=normalize)

    @classmethod
    def uniform(cls, num_layers: int, num_heads: int, head_type: int = NEIGHBOUR,
                table: HeadTable | None = None) -> HeadPlan:
        """Every head of one type (all NEIGHBOUR: a baseline-like local-window plan)."""
        return cls(np.full((num_layers, num_heads), int(head_type)), table or standard_table())

    # ---- shape and groups ----

    @property
    def num_layers(self) -> int:
        return len(self.head_types)

    @property
    def num_heads(self) -> int:
        return len(self.head_types[0])

    @property
    def num_dummy(self) -> int:
        """Heads of the table's dummy type over all layers (derived from head_types, so it cannot disagree)."""
        dummy = self.table.dummy
        return 0 if dummy is None else sum(row.count(dummy.code) for row in self.head_types)

    @cached_property
    def permutation(self) -> tuple[tuple[int, ...], ...]:
        """Per layer, original head indices in the table's order (HeadTable.order: cache group by cache group),
        each type's heads in ascending original order. Permuted head j of layer l is original head
        permutation[l][j]."""
        order = [t.code for t in self.table.order]
        return tuple(tuple(h for code in order for h, t in enumerate(row) if t == code) for row in self.head_types)

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
    def group_sizes(self) -> tuple[tuple[int, ...], ...]:
        """Per layer, the head count of each type in the table's order (HeadTable.order); any may be 0. For the
        standard table: (n_sink, n_dummy, n_neighbour)."""
        return tuple(tuple(row.count(t.code) for t in self.table.order) for row in self.head_types)

    def head_type_array(self) -> np.ndarray:
        """head_types as int8 [num_layers, num_heads]."""
        return np.asarray(self.head_types, dtype=np.int8)

    def dummy_heads(self) -> frozenset[tuple[int, int]]:
        """{(layer, head)} of every dummy head."""
        code = DUMMY if self.table.dummy is None else self.table.dummy.code
        return frozenset((l, h) for l, row in enumerate(self.head_types) for h, t in enumerate(row) if t == code)

    def validate(self, num_layers: int, num_heads: int) -> None:
        """Raise if the plan was made for a model of another shape."""
        if (self.num_layers, self.num_heads) != (num_layers, num_heads):
            raise ValueError(
                f"profile made for a model with {self.num_layers} layers x {self.num_heads} heads, "
                f"this model has {num_layers} layers x {num_heads} heads; calibrate a profile for this model"
            )

    def describe(self, chunk_frames: int) -> str:
        """One line: how many heads of each type, and what each sees besides the current chunk, in latent frames."""
        count = lambda t: sum(row.count(t.code) for row in self.head_types)

        def sees(t):
            parts = [f"the first {t.first_frames} frame(s)"] if t.first_frames else []
            parts += [f"the newest {t.newest_frames} frame(s)"] if t.newest_frames else []
            if t.history_chunks:
                parts += [f"the last {t.history_chunks * chunk_frames} frames"
                          + (f" (none before frame {t.history_from})" if t.history_from else "")]
            return " + ".join(parts) or "nothing earlier"

        return "; ".join(f"{count(t)} {t.name} heads see {sees(t)}" for t in self.table.types)

    # ---- calibration profile (JSON) ----

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": PROFILE_FORMAT,
                "version": PROFILE_VERSION,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "num_dummy": self.num_dummy,
                "head_table": [dataclasses.asdict(t) for t in self.table.types],
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
        version = data.get("version")
        if version not in _PROFILE_KEYS:
            raise ValueError(f"head plan profile version {version!r} is not supported (expected one of "
                             f"{sorted(_PROFILE_KEYS)})")
        keys = _PROFILE_KEYS[version]
        if set(data) != keys:
            raise ValueError(
                f"malformed head plan profile: missing keys {sorted(keys - set(data))}, "
                f"unknown keys {sorted(set(data) - keys)}"
            )
        try:
            plan = cls(data["head_types"], _table_of(data), scores=data["scores"], normalize=data["normalize"])
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


def _table_of(data: dict) -> HeadTable:
    if data["version"] == 1:
        if not isinstance(data["packed_dummy"], bool):
            raise ValueError(f"packed_dummy must be true or false, got {data['packed_dummy']!r}")
        return standard_table(data["local_context_length"], data["packed_dummy"])
    rows = data["head_table"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) and set(r) == _TYPE_KEYS for r in rows):
        raise ValueError(f"head_table must be a list of objects with the keys {sorted(_TYPE_KEYS)}")
    return HeadTable(tuple(HeadType(**r) for r in rows))


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
