"""The head types of Dummy Forcing, in one table.

A row says what a head of that type attends to besides the current chunk (which every head sees), so what its
KV cache keeps, and which frame attention score measures what it keeps. Everything else reads the table: the
per-type cache layouts and the cache transition (hma.py), DHP (dhp.py), plans and profiles (plan.py) and the
rounding of a plan to a mesh (mesh.py). A new head type is a new row.

The standard table (the public release, and the paper's variant):
  sink       the video's first latent frame                      scored by the sink mass
  dummy      the newest clean latent frame (release, "packed")   no history score: DHP makes the N cheapest
             or nothing (paper)                                   heads dummy
  neighbour  the last local_context_length chunks (not frame 0)  scored by the neighbour mass

Heads of types with the same cache shape (fixed frames, history chunks) share one cache group, so one attention
call: the release's sink and packed dummy heads both keep one frame plus the chunk (its Packed Attention
Forward). After a plan is fixed, each layer's heads are permuted into the table's order, group by group.
"""

from __future__ import annotations

from dataclasses import dataclass

# The frame attention score of a head has one column per key group of the scored forward: the first latent
# frame, the rest of the history, the current chunk (dfjax.dummy.scores).
SCORE_COLUMNS = ("sink", "neighbour", "current")


@dataclass(frozen=True)
class HeadType:
    name: str
    code: int  # in plans and profiles
    first_frames: int = 0  # the video's first latent frames, kept for ever (attention sinks)
    newest_frames: int = 0  # the newest clean latent frames, replaced at every cache refresh
    history_chunks: int = 0  # the most recent chunks before the current one
    score: int | None = None  # SCORE_COLUMNS index of the history mass this type keeps; None: it keeps none
    history_from: int = 0  # the first frame its history may hold (the release's neighbour heads: 1, since frame 0
    # is the sink heads'; it matters once the history reaches back to frame 0, as long windows do)

    def __post_init__(self):
        if min(self.first_frames, self.newest_frames, self.history_chunks, self.history_from) < 0:
            raise ValueError(f"head type {self.name!r}: frame and chunk counts must be >= 0.")
        if self.first_frames and self.newest_frames:
            raise ValueError(f"head type {self.name!r}: its fixed slots hold the first or the newest frames, "
                             "not both.")
        if self.score is not None and not 0 <= self.score < len(SCORE_COLUMNS) - 1:
            raise ValueError(f"head type {self.name!r}: score must index a history column of {SCORE_COLUMNS[:-1]}.")

    @property
    def fixed_frames(self) -> int:
        return self.first_frames + self.newest_frames

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        """(fixed frames, history chunks, first history frame): types with the same shape share a cache group."""
        return self.fixed_frames, self.history_chunks, self.history_from


@dataclass(frozen=True)
class HeadTable:
    types: tuple[HeadType, ...]

    def __post_init__(self):
        object.__setattr__(self, "types", tuple(self.types))
        for attr in ("code", "name"):
            values = [getattr(t, attr) for t in self.types]
            if len(set(values)) != len(values):
                raise ValueError(f"head types repeat a {attr}: {values}.")
        for group in self.groups:
            seen_newest = False
            for t in group:  # a cache group keeps its newest-frame heads last (dfjax.cache.GroupLayout)
                if t.first_frames and seen_newest:
                    raise ValueError(f"head type {t.name!r} keeps first frames but comes after a newest-frame type "
                                     "of the same cache shape; list newest-frame types after it.")
                seen_newest |= bool(t.newest_frames)

    def __getitem__(self, code: int) -> HeadType:
        for t in self.types:
            if t.code == code:
                return t
        raise KeyError(f"no head type with code {code}; the table has {self.codes}.")

    @property
    def codes(self) -> tuple[int, ...]:
        return tuple(t.code for t in self.types)

    @property
    def groups(self) -> tuple[tuple[HeadType, ...], ...]:
        """Types by cache group, groups in the order of their first type in the table, types in table order."""
        shapes = list(dict.fromkeys(t.cache_shape for t in self.types))
        return tuple(tuple(t for t in self.types if t.cache_shape == s) for s in shapes)

    @property
    def order(self) -> tuple[HeadType, ...]:
        """The order of head types in a layer after the head permutation: group by group."""
        return tuple(t for group in self.groups for t in group)

    @property
    def history(self) -> tuple[HeadType, ...]:
        """The types DHP chooses between for a head it does not make dummy (those with a score), in table order."""
        return tuple(t for t in self.types if t.score is not None)

    @property
    def dummy(self) -> HeadType | None:
        """The type DHP gives the heads that cost least to lose their history: the one without a score."""
        none = [t for t in self.types if t.score is None]
        if len(none) > 1:
            raise ValueError(f"head types {[t.name for t in none]} have no score; DHP needs at most one.")
        return none[0] if none else None

    def with_type(self, t: HeadType) -> "HeadTable":
        return HeadTable(self.types + (t,))


SINK, NEIGHBOUR, DUMMY = 0, 1, 2  # the standard table's codes (profile files use them)


def standard_table(local_context_length: int = 1, packed_dummy: bool = True,
                   neighbour_sees_frame0: bool = False) -> HeadTable:
    """The release's head types (packed_dummy) or the paper's (dummy heads see the current chunk only).

    neighbour_sees_frame0: the release's neighbour heads never see frame 0 (it is the sink heads'), also when their
    window reaches back to it; True lets it stay in their window while it fits (one cache layout for everyone:
    an all-neighbour plan with a window over the whole video is then the dense baseline)."""
    if local_context_length < 0:
        raise ValueError(f"local_context_length must be >= 0 (chunks kept by neighbour heads; the release uses 1), "
                         f"got {local_context_length}")
    return HeadTable((
        HeadType("sink", SINK, first_frames=1, score=0),
        HeadType("dummy", DUMMY, newest_frames=1 if packed_dummy else 0),
        HeadType("neighbour", NEIGHBOUR, history_chunks=local_context_length, score=1,
                 history_from=0 if neighbour_sees_frame0 else 1),
    ))
