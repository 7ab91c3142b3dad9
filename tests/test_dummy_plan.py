"""Host side of Dummy Forcing: frame attention scores, the DHP solver and the head plan profile."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfjax.dummy import (
    DUMMY,
    NEIGHBOUR,
    SINK,
    HeadPlan,
    QueryRowSampling,
    aggregate_profiles,
    dummy_overlap,
    frame_attention_scores,
    sample_query_rows,
    solve_dhp,
    standard_table,
)

# ---------------------------------------------------------------- DHP


def retained_mass(types: np.ndarray, scores: np.ndarray, normalize: str) -> np.ndarray:
    """The DHP objective written out directly: sink keeps F0+F2, neighbour F1+F2, dummy F2.

    types: [..., num_heads_total] assignments; scores: [num_heads_total, 3].
    """
    f0, f1, f2 = scores[:, 0], scores[:, 1], scores[:, 2]
    if normalize == "release":
        f0, f1 = f0 / f0.sum(), f1 / f1.sum()
    kept = np.stack([f0 + f2, f1 + f2, f2], axis=-1)  # [heads, type] in SINK, NEIGHBOUR, DUMMY order
    return np.take_along_axis(kept.T[None], types[:, None, :], axis=1)[:, 0].sum(-1)


def exhaustive_best(scores: np.ndarray, num_dummy: int, normalize: str) -> float:
    flat = scores.reshape(-1, 3)
    every = np.array(list(itertools.product([SINK, NEIGHBOUR, DUMMY], repeat=len(flat))))
    allowed = every[(every == DUMMY).sum(axis=1) == num_dummy]
    return retained_mass(allowed, flat, normalize).max()


def random_scores(rng, shape, integer):
    if integer:  # small integers: many exact ties in costs and in F0 vs F1
        return rng.integers(0, 3, size=shape + (3,)).astype(np.float64) + np.array([1.0, 1.0, 0.0])
    raw = rng.random(shape + (3,))
    return raw / raw.sum(-1, keepdims=True)


@pytest.mark.parametrize("normalize", ["release", "none"])
@pytest.mark.parametrize("integer", [False, True])
def test_dhp_matches_exhaustive_search(normalize, integer):
    rng = np.random.default_rng(0)
    for _ in range(6):
        scores = random_scores(rng, (2, 3), integer)
        for num_dummy in range(7):
            types = solve_dhp(scores, num_dummy, normalize)
            assert types.shape == (2, 3) and types.dtype == np.int8
            assert (types == DUMMY).sum() == num_dummy
            got = retained_mass(types.reshape(1, -1).astype(np.int64), scores.reshape(-1, 3), normalize)[0]
            np.testing.assert_allclose(got, exhaustive_best(scores, num_dummy, normalize), rtol=1e-12)


def test_dhp_tie_breaking_is_deterministic():
    # Many equal costs over 200 heads (enough that an unstable sort would reorder them): among equal
    # costs the lower flat (layer-major) index becomes dummy first; F0 == F1 gives sink.
    scores = np.random.default_rng(5).integers(1, 4, size=(10, 20, 3)).astype(np.float64)
    f0, f1 = scores[..., 0].ravel(), scores[..., 1].ravel()
    by_cost = sorted(range(200), key=lambda i: (max(f0[i], f1[i]), i))
    expected = np.where(f0 >= f1, SINK, NEIGHBOUR)
    expected[by_cost[:70]] = DUMMY
    np.testing.assert_array_equal(solve_dhp(scores, 70, "none"), expected.reshape(10, 20))
    # Same cost for heads 1 and 2 of layer 0 (max is 0.5 in both), head 0 cheaper: 0 then 1.
    scores = np.array([[[0.2, 0.1, 0.7], [0.5, 0.2, 0.3], [0.1, 0.5, 0.4]]])
    np.testing.assert_array_equal(solve_dhp(scores, 2, "none"), [[DUMMY, DUMMY, NEIGHBOUR]])


def test_dhp_release_normalisation_changes_the_sink_neighbour_choice():
    # Raw F0 > F1 for both heads; after dividing by the column sums head 1 leans to neighbour.
    scores = np.array([[[0.8, 0.1, 0.1], [0.4, 0.1, 0.5]]])
    np.testing.assert_array_equal(solve_dhp(scores, 0, "none"), [[SINK, SINK]])
    np.testing.assert_array_equal(solve_dhp(scores, 0, "release"), [[SINK, NEIGHBOUR]])


@pytest.mark.parametrize("num_dummy", [-1, 7])
def test_dhp_num_dummy_out_of_range(num_dummy):
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        solve_dhp(np.full((2, 3, 3), 0.3), num_dummy)


def test_dhp_rejects_bad_inputs():
    with pytest.raises(ValueError, match="num_layers, num_heads, 3"):
        solve_dhp(np.zeros((2, 3)), 0)
    with pytest.raises(ValueError, match="normalize"):
        solve_dhp(np.full((2, 3, 3), 0.3), 1, "sum")
    with pytest.raises(ValueError, match="finite"):
        solve_dhp(np.full((2, 3, 3), np.nan), 1)


# ---------------------------------------------------------------- plan


def test_permutation_and_group_sizes():
    plan = HeadPlan(((NEIGHBOUR, DUMMY, SINK, DUMMY, NEIGHBOUR), (SINK,) * 5))
    assert plan.permutation == ((2, 1, 3, 0, 4), (0, 1, 2, 3, 4))
    assert plan.group_sizes == ((1, 2, 2), (5, 0, 0))
    assert plan.num_dummy == 2

    rng = np.random.default_rng(1)
    plan = HeadPlan(rng.integers(0, 3, size=(6, 8)))
    order = {SINK: 0, DUMMY: 1, NEIGHBOUR: 2}
    for types, perm, inv, sizes in zip(plan.head_types, plan.permutation, plan.inverse_permutation, plan.group_sizes):
        assert sorted(perm) == list(range(8))
        keys = [(order[types[h]], h) for h in perm]
        assert keys == sorted(keys)  # grouped [sink, dummy, neighbour], ascending within a group
        assert [perm[inv[h]] for h in range(8)] == list(range(8))
        n_sink, n_dummy, _ = sizes
        assert sum(sizes) == 8
        assert all(types[h] == SINK for h in perm[:n_sink])
        assert all(types[h] == DUMMY for h in perm[n_sink : n_sink + n_dummy])


def test_plan_is_hashable_and_scores_are_provenance_only():
    scores = random_scores(np.random.default_rng(2), (2, 3), integer=False)
    plan = HeadPlan.from_scores(scores, 2, "release", standard_table(1))
    same_types = HeadPlan(plan.head_type_array(), standard_table(1))
    assert plan == same_types and hash(plan) == hash(same_types)
    assert plan != HeadPlan(plan.head_types, standard_table(2))
    assert plan != HeadPlan(plan.head_types, standard_table(1, packed_dummy=False))
    np.testing.assert_array_equal(plan.head_type_array(), solve_dhp(scores, 2, "release"))


def test_uniform_plan():
    plan = HeadPlan.uniform(3, 4)
    assert plan.group_sizes == ((0, 0, 4),) * 3 and plan.num_dummy == 0
    assert HeadPlan.uniform(3, 4, DUMMY).num_dummy == 12


def test_plan_validation_errors():
    with pytest.raises(ValueError, match="local_context_length must be >= 0"):
        HeadPlan.uniform(2, 3, table=standard_table(local_context_length=-1))
    with pytest.raises(ValueError, match=r"num_dummy must be in \[0, 6\]"):
        HeadPlan.from_scores(np.full((2, 3, 3), 0.3), 9)
    with pytest.raises(ValueError, match="codes"):
        HeadPlan(((0, 1, 3),))
    with pytest.raises(ValueError, match="num_layers, num_heads"):
        HeadPlan((0, 1, 2))


def test_profile_for_another_model_shape():
    plan = HeadPlan.uniform(2, 3)
    plan.validate(2, 3)
    with pytest.raises(ValueError, match="profile made for a model with 2 layers x 3 heads, this model has 30 layers x 12 heads"):
        plan.validate(30, 12)


def test_json_round_trip(tmp_path):
    scores = random_scores(np.random.default_rng(3), (4, 5), integer=False).astype(np.float32)
    plan = HeadPlan.from_scores(scores, 7, "none", standard_table(2, packed_dummy=False))
    path = tmp_path / "profile.json"
    plan.save(path)
    loaded = HeadPlan.load(path)
    assert loaded == plan
    assert (loaded.table, loaded.normalize, loaded.num_dummy) == (standard_table(2, False), "none", 7)
    np.testing.assert_array_equal(np.asarray(loaded.scores), scores.astype(np.float64))
    bare = HeadPlan.uniform(2, 3, SINK)
    assert HeadPlan.from_json(bare.to_json()) == bare and HeadPlan.from_json(bare.to_json()).scores is None


def _profile_dict():
    return json.loads(HeadPlan.from_scores(np.full((2, 3, 3), 0.3), 2).to_json())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format="something.else"), "not a head plan profile"),
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d.pop("scores"), "missing keys \\['scores'\\]"),
        (lambda d: d.update(num_layers=3), "declares 3 layers"),
        (lambda d: d.update(num_dummy=5), "with 5 dummy"),
        (lambda d: d["head_types"][0].append(1), "malformed"),
        (lambda d: d["head_table"][0].update(newest_frames=1), "the first or the newest"),
        (lambda d: d["head_table"][0].pop("score"), "head_table must be"),
        (lambda d: d["scores"].pop(), "scores must be"),
    ],
)
def test_malformed_profiles(tmp_path, edit, message):
    data = _profile_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        HeadPlan.load(path)


def test_version_1_profiles_still_load(tmp_path):
    """Profiles written before the head table (version 1) name a standard table by its two parameters."""
    plan = HeadPlan.from_scores(np.full((2, 3, 3), 0.3), 2, "release", standard_table(2, packed_dummy=False))
    data = {k: v for k, v in json.loads(plan.to_json()).items() if k != "head_table"}
    data.update(version=1, local_context_length=2, packed_dummy=False)
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    assert HeadPlan.load(path) == plan
    data["packed_dummy"] = "yes"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="packed_dummy"):
        HeadPlan.load(path)


def test_foreign_file_names_the_path(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("dim: 1536\n")
    with pytest.raises(ValueError, match="model.yaml.*invalid JSON"):
        HeadPlan.load(path)
    path.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="not a head plan profile"):
        HeadPlan.load(path)


def test_aggregate_profiles_and_overlap():
    a, b = np.full((2, 3, 3), 0.1), np.full((2, 3, 3), 0.3)
    np.testing.assert_allclose(aggregate_profiles([a, b]), 0.2)
    with pytest.raises(ValueError, match="same shape"):
        aggregate_profiles([a, np.zeros((3, 3, 3))])
    with pytest.raises(ValueError, match="at least one"):
        aggregate_profiles([])

    p = HeadPlan(((DUMMY, DUMMY, SINK), (DUMMY, NEIGHBOUR, SINK)))
    q = HeadPlan(((DUMMY, SINK, SINK), (DUMMY, NEIGHBOUR, DUMMY)))
    assert dummy_overlap(p, q) == pytest.approx(2 / 4)
    assert dummy_overlap(p, p) == 1.0
    assert dummy_overlap(HeadPlan.uniform(2, 3), HeadPlan.uniform(2, 3)) == 1.0
    with pytest.raises(ValueError, match="profile made for"):
        dummy_overlap(p, HeadPlan.uniform(3, 3))


# ---------------------------------------------------------------- frame attention scores

LQ, H, D, LK, KV_LEN, SINK_TOKENS = 12, 3, 8, 30, 25, 4


def _qk():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(2, LQ, H, D)).astype(np.float32) * 2
    k = rng.normal(size=(2, LK, H, D)).astype(np.float32) * 2
    k[0, KV_LEN:] = 50.0  # padding keys that would dominate the softmax if they were not ignored
    return q, k


def dense_scores(q, k, rows):
    """float64 reference: the full softmax matrix of batch element 0 over the valid keys."""
    q0, k0 = q[0].astype(np.float64), k[0, :KV_LEN].astype(np.float64)
    logits = np.einsum("qhd,khd->hqk", q0, k0) / np.sqrt(D)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    probs = probs[:, rows]
    current_start = KV_LEN - LQ
    groups = [probs[..., :SINK_TOKENS], probs[..., SINK_TOKENS:current_start], probs[..., current_start:]]
    return np.stack([g.sum(-1).mean(-1) for g in groups], axis=-1)


@pytest.mark.parametrize("block_rows", [1, 5, 12, 64])
def test_exact_scores_match_dense(block_rows):
    q, k = _qk()
    got = frame_attention_scores(q, k, KV_LEN, SINK_TOKENS, LQ, None, block_rows=block_rows)
    assert got.shape == (H, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), dense_scores(q, k, np.arange(LQ)), atol=1e-5)


def test_sampled_scores_match_dense_rows_with_traced_kv_len():
    q, k = _qk()
    rows = sample_query_rows(LQ, 9, seed=(0, 3))
    fn = jax.jit(frame_attention_scores, static_argnames=("sink_tokens", "current_tokens", "block_rows"))
    got = fn(q, k, jnp.int32(KV_LEN), sink_tokens=SINK_TOKENS, current_tokens=LQ, rows=rows, block_rows=4)
    np.testing.assert_allclose(np.asarray(got), dense_scores(q, k, rows), atol=1e-5)


def test_scores_reject_overlapping_groups():
    q, k = _qk()
    with pytest.raises(ValueError, match="kv_len must lie in"):
        frame_attention_scores(q, k, LQ + 1, SINK_TOKENS, LQ)


def test_sampler_is_seeded():
    a = sample_query_rows(4680, 520, seed=7)
    assert a.dtype == np.int32 and a.shape == (520,) and a.min() >= 0 and a.max() < 4680
    np.testing.assert_array_equal(a, sample_query_rows(4680, 520, seed=7))
    assert not np.array_equal(a, sample_query_rows(4680, 520, seed=8))
    assert not np.array_equal(sample_query_rows(4680, 520, (7, 0)), sample_query_rows(4680, 520, (7, 1)))


def test_query_row_sampling_presets():
    assert QueryRowSampling("release").num_rows(4680, 1560) == 520
    assert QueryRowSampling("paper").num_rows(4680, 1560) == 1170
    assert QueryRowSampling("fraction", 0.5).num_rows(4680, 1560) == 2340
    assert QueryRowSampling("exact").rows(4680, 1560, seed=0) is None
    np.testing.assert_array_equal(QueryRowSampling().rows(4680, 1560, seed=1), sample_query_rows(4680, 520, 1))
    with pytest.raises(ValueError, match="fraction in"):
        QueryRowSampling("fraction", 1.5)
    with pytest.raises(ValueError, match="only read in mode 'fraction'"):
        QueryRowSampling("paper", 0.3)
