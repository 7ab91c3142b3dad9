"""A head plan rounded to a mesh: every cache group of every layer split evenly over `tensor` devices.

Tensor parallelism splits each KV cache along its heads, so each cache group (dfjax.dummy.heads) of each layer
must hold a multiple of `tensor` heads. DHP does not know about devices; `shardable_plan` moves as few heads (or
as little attention mass) as it can to get there, for tables with two history types in different cache groups
(the standard one: sink and neighbour).
"""

from __future__ import annotations

import numpy as np

from dfjax.dummy.dhp import history_masses
from dfjax.dummy.plan import HeadPlan


def cache_group_sizes(plan: HeadPlan) -> tuple[tuple[int, ...], ...]:
    """Per layer, the head count of each cache group of the table (HeadTable.groups), empty ones included."""
    return tuple(tuple(sum(row.count(t.code) for t in group) for group in plan.table.groups)
                 for row in plan.head_types)


def plan_is_shardable(plan: HeadPlan, tensor: int) -> bool:
    return all(n % tensor == 0 for layer in cache_group_sizes(plan) for n in layer)


def _top(values: np.ndarray, candidates: list[int], k: int) -> list[int]:
    """The k candidates with the largest values; ties to the lower head index (deterministic)."""
    return sorted(candidates, key=lambda h: (-values[h], h))[:k]


def _split_history(types: np.ndarray, codes: tuple[int, int], dummy: int | None, fixed: int, gain: np.ndarray,
                   tensor: int) -> None:
    """In place, for one layer: choose which non-dummy heads take history type codes[0] (the others codes[1]) so
    that its cache group (`fixed` other heads in it) is a multiple of `tensor`, taking the top heads by `gain`
    (mass of the first type - mass of the second) and, of the two nearest admissible counts, the one that keeps
    more mass (the nearer on a tie, then the smaller)."""
    free = [h for h in range(len(types)) if types[h] != dummy]
    k0 = int(np.sum(types == codes[0]))
    r = (-fixed) % tensor
    down = k0 - ((k0 - r) % tensor)
    options = [k for k in (down, down + tensor) if 0 <= k <= len(free)]
    ranked = _top(gain, free, len(free))
    best = max(options, key=lambda k: (sum(gain[h] for h in ranked[:k]), -abs(k - k0), -k))
    chosen = set(ranked[:best])
    for h in free:
        types[h] = codes[0] if h in chosen else codes[1]


def shardable_plan(plan: HeadPlan, tensor: int) -> HeadPlan:
    """The plan rounded so that every cache group of every layer splits evenly over `tensor` devices.

    When the dummy type shares its cache group (the release's packed dummy heads), the dummy heads stay exactly as
    they are (same heads, same count); per layer only heads move between the two history types. When it has a
    group of its own (the paper's dummy heads), the dummy count of every layer is rounded to a multiple of
    `tensor` too, the total to the nearest multiple of `tensor`, the extra or missing dummies taken where DHP's
    cost (the larger history mass) is lowest; then the history types as above.
    With the plan's scores the choices keep the most attention mass (normalised as DHP did); without scores they
    change as few heads as possible (ties to the lower head index). A plan that is already shardable comes back
    unchanged.
    """
    if tensor < 1:
        raise ValueError(f"tensor must be >= 1, got {tensor}.")
    if plan.num_heads % tensor:
        raise ValueError(f"{plan.num_heads} heads per layer do not split over tensor={tensor}; choose a tensor size "
                         f"that divides {plan.num_heads}.")
    if plan_is_shardable(plan, tensor):
        return plan
    table = plan.table
    history = table.history
    group_of = {t.code: i for i, group in enumerate(table.groups) for t in group}
    if len(history) != 2 or group_of[history[0].code] == group_of[history[1].code]:
        raise ValueError(f"a plan of head types {[t.name for t in table.types]} cannot be rounded to tensor={tensor} "
                         "(rounding needs two history types in different cache groups); give a plan whose cache "
                         "groups are multiples of the tensor size.")
    codes = (history[0].code, history[1].code)
    dummy = None if table.dummy is None else table.dummy.code
    types = np.array(plan.head_types, dtype=np.int64)
    L, H = types.shape
    if plan.scores is None:  # no scores: values that make the current assignment the best one
        masses = np.stack([(types == c).astype(np.float64) for c in codes], axis=-1)
    else:
        masses = history_masses(plan.scores, plan.normalize, table)
    alone = dummy is not None and len(table.groups[group_of[dummy]]) == 1
    if alone:
        # what a head loses by becoming dummy: DHP's cost, or (no scores) 1 for every head not dummy now
        keep = (types != dummy).astype(np.float64) if plan.scores is None else masses.max(axis=-1)
        target = int(round(plan.num_dummy / tensor)) * tensor
        order = [sorted(range(H), key=lambda h: (keep[l, h], h)) for l in range(L)]  # cheapest first
        count = [0] * L
        for _ in range(target // tensor):  # convex per-layer costs: greedy by the next block of heads is optimal
            cost = [sum(keep[l, h] for h in order[l][count[l]:count[l] + tensor]) if count[l] + tensor <= H
                    else np.inf for l in range(L)]
            l = int(np.argmin(cost))
            count[l] += tensor
        for l in range(L):
            dummies = set(order[l][:count[l]])
            for h in range(H):
                if h in dummies:
                    types[l, h] = dummy
                elif types[l, h] == dummy:
                    types[l, h] = codes[0] if masses[l, h, 0] >= masses[l, h, 1] else codes[1]
    shares_first = dummy is not None and not alone and group_of[dummy] == group_of[codes[0]]
    for l in range(L):
        fixed = int(np.sum(types[l] == dummy)) if shares_first else 0
        _split_history(types[l], codes, dummy, fixed, masses[l, :, 0] - masses[l, :, 1], tensor)
    out = HeadPlan(types, table, scores=plan.scores, normalize=plan.normalize)
    assert plan_is_shardable(out, tensor), (cache_group_sizes(out), tensor)
    return out
