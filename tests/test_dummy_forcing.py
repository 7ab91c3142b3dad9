"""Dummy Forcing end to end: head permutation, the AR loop against a per-head masked PyTorch oracle
(diffusers' Wan transformer, full-prefix forwards), online scores against the oracle's dense
attention, and planted dummy heads found by DHP.

Tolerances: fp32 on both sides, tiny model; a whole 4-chunk loop of 4 steps compounds rounding of
~1e-6 per forward, so 2e-4 absolute on latents of order 1; scores are probabilities (1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dfjax.cache import AttentionLayout, init_cache  # noqa: E402
from dfjax.config import DummyForcingConfig, SamplingConfig, VideoShape, WanConfig  # noqa: E402
from dfjax.convert.transformer import convert_transformer  # noqa: E402
from dfjax.dummy import DUMMY, NEIGHBOUR, SINK, HeadPlan, HeadType, standard_table  # noqa: E402
from dfjax.dummy import hma  # noqa: E402
from dfjax.model.rope import rope_tables  # noqa: E402
from dfjax.model.transformer import ChunkCall, ChunkStep, WanDiT  # noqa: E402
from dfjax.params import assign_params  # noqa: E402
from dfjax.pipeline import Generator, RunConfig  # noqa: E402
from dfjax.sampling import schedule  # noqa: E402
from tests.oracles import MaskedSelfAttention, diffusers_forward, tiny_diffusers_transformer  # noqa: E402

CFG = WanConfig.tiny(num_layers=3)
TPF, CF = 6, 2
VIDEO = VideoShape(height=32, width=48, frames=29)  # 8 latent frames = 4 chunks of 2
SAMPLING = SamplingConfig(chunk_frames=CF)
N_FRAMES = VIDEO.latent_frames


@pytest.fixture(scope="module")
def models():
    tm = tiny_diffusers_transformer(CFG, seed=1)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    return tm, assign_params(WanDiT(CFG, nnx.Rngs(0)), convert_transformer(sd, CFG))


def context(batch=1):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(7), (batch, CFG.text_len, CFG.text_dim)))


def a_plan(packed=True, L=1):
    types = ((SINK, DUMMY, NEIGHBOUR, DUMMY), (DUMMY, DUMMY, SINK, SINK), (NEIGHBOUR, NEIGHBOUR, DUMMY, NEIGHBOUR))
    return HeadPlan(types, standard_table(L, packed_dummy=packed))


def test_permuted_model_gives_the_same_output(models):
    _, model = models
    plan = a_plan()
    permuted = nnx.merge(*nnx.split(model), copy=True)
    hma.permute_heads(permuted, plan.permutation)
    layout = AttentionLayout.uniform(CFG.num_layers, CFG.num_heads, 0, 4, TPF, 4)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 6, CFG.in_channels))
    t = jnp.full((1, 4), 500.0)
    outs = []
    for m in (model, permuted):
        kv = m.text_kv(jnp.asarray(context()))
        cache = init_cache(layout, 1, CFG.head_dim, jnp.float32)
        outs.append(np.asarray(m(x, t, kv, cache, rope_tables(CFG.head_dim), ChunkStep.at(0), ChunkCall("xla"))[0]))
    assert not np.array_equal(np.asarray(model.blocks[0].self_attn.q.kernel[...]),
                              np.asarray(permuted.blocks[0].self_attn.q.kernel[...]))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=0)


def test_permuted_params_copy_only_the_self_attention(models):
    _, model = models
    graphdef, params = nnx.split(model)
    plan = a_plan()
    got = jax.jit(lambda p, perm: hma.permuted_params(graphdef, p, perm))(params, jnp.asarray(plan.permutation))
    permuted = nnx.merge(graphdef, params, copy=True)
    hma.permute_heads(permuted, plan.permutation)
    want = nnx.state(permuted)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the generator's way: jitted, only the self-attention comes out; the rest stays the model's own arrays
    moved = jax.jit(lambda p, perm: hma.permuted_attention(graphdef, p, perm))(params, jnp.asarray(plan.permutation))
    merged = nnx.merge_state(params, moved)
    assert merged["blocks"][0]["ffn_in"]["kernel"][...] is params["blocks"][0]["ffn_in"]["kernel"][...]
    assert merged["blocks"][0]["self_attn"]["q"]["kernel"][...] is not params["blocks"][0]["self_attn"]["q"]["kernel"][...]
    assert len(jax.tree_util.tree_leaves(moved)) < len(jax.tree_util.tree_leaves(params)) / 2


def head_masks(plan: HeadPlan, layer: int, num_chunks: int, ar_start: int, L: int):
    """[H, N*T, N*T] bool key masks of the full-prefix oracle: row chunk j uses the rule in force at j."""
    n = num_chunks * CF
    masks = np.zeros((CFG.num_heads, n, n), bool)
    for j in range(num_chunks):
        rows = slice(j * CF, (j + 1) * CF)
        end = (j + 1) * CF
        fk = np.arange(n)
        own = (fk >= j * CF) & (fk < end)
        for h in range(CFG.num_heads):
            if j <= ar_start:  # warm-up: frame 0, the last L chunks, the chunk
                ok = (fk == 0) | ((fk >= end - (L + 1) * CF) & (fk < end))
            else:  # the row of the head's type: its first frames, newest clean frames, last history chunks
                t = plan.table[plan.head_types[layer][h]]
                ok = own | (fk < t.first_frames) | ((fk >= j * CF - t.newest_frames) & (fk < j * CF))
                ok |= (fk >= max(j * CF - t.history_chunks * CF, t.history_from)) & (fk < end)
            masks[h, rows] = ok[None, :]
    return np.repeat(np.repeat(masks, TPF, 1), TPF, 2)


def oracle_loop(tm, plan, ar_start, L, seed, ctx, switch=None):
    """The AR loop in PyTorch: each step is one full-prefix forward [clean chunks ; noisy chunk]. switch: (chunk,
    context) from which every forward uses another prompt, so the clean chunks are seen under it too (what a
    re-cache computes)."""
    ts, sig = schedule(SAMPLING)
    nxt = np.append(sig[1:], 0.0)
    h, w = VIDEO.latent_hw
    shape = (1, CF, h, w, CFG.in_channels)
    clean = []
    for c in range(N_FRAMES // CF):
        for layer, blk in enumerate(tm.blocks):
            m = torch.from_numpy(head_masks(plan, layer, c + 1, ar_start, L))[None]
            blk.attn1.set_processor(MaskedSelfAttention(blk.attn1.processor.inner
                                                        if isinstance(blk.attn1.processor, MaskedSelfAttention)
                                                        else blk.attn1.processor, m))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), c)
        x = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), shape))
        for i in range(len(ts)):
            full = np.concatenate(clean + [x], axis=1)
            t = np.concatenate([np.zeros((1, c * CF)), np.full((1, CF), ts[i])], axis=1).astype(np.float32)
            now = ctx if switch is None or c < switch[0] else switch[1]
            flow = diffusers_forward(tm, np.ascontiguousarray(full.transpose(0, 4, 1, 2, 3)), t, now, TPF)
            flow = flow[:, :, c * CF:].transpose(0, 2, 3, 4, 1)
            x0 = (x - np.float32(sig[i]) * flow).astype(np.float32)
            noise = np.asarray(jax.random.normal(jax.random.fold_in(key, i + 1), shape))
            x = ((1 - np.float32(nxt[i])) * x0 + np.float32(nxt[i]) * noise).astype(np.float32)
        clean.append(x0)
    for blk in tm.blocks:
        blk.attn1.set_processor(blk.attn1.processor.inner)
    return np.concatenate(clean, axis=1)


@pytest.mark.parametrize("packed,L", [(True, 1), (False, 1), (True, 3)],
                         ids=["release", "paper", "release-window-reaching-frame-0"])
def test_dummy_forcing_loop_matches_per_head_masked_oracle(models, packed, L):
    """L=3: the neighbour heads' window reaches back to frame 0, which they do not see (as in the release)."""
    tm, model = models
    plan = a_plan(packed=packed, L=L)
    run = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla",
                    dummy=DummyForcingConfig(ar_start=1, local_context_length=L, packed_dummy=packed))
    gen = Generator(model, run, plan=plan)
    ours = np.asarray(gen.generate(jnp.asarray(context()), seed=5))
    ref = oracle_loop(tm, plan, ar_start=1, L=L, seed=5, ctx=context())
    assert np.abs(ours - ref).max() < 2e-4
    assert gen.stats.trace_counts == {"step0": 1, "step1": 1}  # warm-up step, then one plan step for chunks 2, 3


def test_a_new_head_type_is_one_table_row(models):
    """A third history type (a window of 2 chunks) added as one row of the head table: it gets its own cache group
    and the Dummy Forcing loop still equals the per-head masked oracle, which reads the same row."""
    tm, model = models
    table = standard_table(1).with_type(HeadType("window2", 3, history_chunks=2, score=1))
    plan = HeadPlan(((SINK, 3, NEIGHBOUR, DUMMY), (3, DUMMY, SINK, 3), (NEIGHBOUR, 3, DUMMY, NEIGHBOUR)), table)
    layout = hma.plan_layout(plan, TPF, CF)
    assert [[(g.num_heads, g.capacity_frames) for g in layer] for layer in layout.layers] == [
        [(2, 1 + CF), (1, 2 * CF), (1, 3 * CF)], [(2, 1 + CF), (2, 3 * CF)], [(1, 1 + CF), (2, 2 * CF), (1, 3 * CF)]]
    run = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla",
                    dummy=DummyForcingConfig(ar_start=1, local_context_length=1))
    ours = np.asarray(Generator(model, run, plan=plan).generate(jnp.asarray(context()), seed=5))
    ref = oracle_loop(tm, plan, ar_start=1, L=1, seed=5, ctx=context())
    assert np.abs(ours - ref).max() < 2e-4


def test_a_prompt_switch_recaches_the_kv_cache_as_if_made_under_the_new_prompt(models):
    """Switching at chunk 3 (the plan applies from chunk 2): the re-cache replays chunks 0-2's refresh forwards under
    the new prompt (warm-up, transition, plan), so chunk 3 on equal the oracle whose prefix forwards use the new
    prompt; nothing compiles anew, and without the re-cache the video differs."""
    tm, model = models
    plan = a_plan()
    run = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla", dummy=DummyForcingConfig(ar_start=1))
    gen = Generator(model, run, plan=plan)
    other = np.asarray(jax.random.normal(jax.random.PRNGKey(8), context().shape))
    new_kv = gen.text_kv(jnp.asarray(other))
    switch = lambda c: new_kv if c == 3 else None
    kv = gen.text_kv(jnp.asarray(context()))
    ours = np.concatenate([np.asarray(r.latents) for r in gen.chunks(kv, 5, switch=switch)], axis=1)
    ref = oracle_loop(tm, plan, ar_start=1, L=1, seed=5, ctx=context(), switch=(3, other))
    assert np.abs(ours - ref).max() < 2e-4
    assert gen.stats.trace_counts == {"step0": 1, "step1": 1}
    stale = np.concatenate([np.asarray(r.latents) for r in gen.chunks(kv, 5, switch=switch, recache=False)], axis=1)
    assert np.array_equal(stale[:, :3 * CF], ours[:, :3 * CF]) and np.abs(stale - ref).max() > 1e-2


class RecordQK:
    """A processor that records q and k after RoPE (diffusers' math) before running the real one."""

    def __init__(self, inner, store):
        self.inner, self.store = inner, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        cos, sin = rotary_emb

        def rot(x):
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            c, s = cos[..., 0::2], sin[..., 1::2]
            return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)

        self.store.append((rot(q).detach().numpy(), rot(k).detach().numpy()))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def test_exact_online_scores_match_dense_attention_of_the_oracle(models):
    tm, model = models
    ar_start = 1
    run = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla",
                    dummy=DummyForcingConfig(ar_start=ar_start, num_dummy=4, query_rows="exact"))
    gen = Generator(model, run)
    lat = np.asarray(gen.generate(jnp.asarray(context()), seed=2))
    # oracle: the refresh forward of chunk ar_start = clean prefix at t=0 (warm-up keys: all frames here)
    n = (ar_start + 1) * CF
    store = []
    for blk in tm.blocks:
        blk.attn1.set_processor(RecordQK(blk.attn1.processor, store))
    m = np.tril(np.ones((ar_start + 1, ar_start + 1), bool))
    mask = np.repeat(np.repeat(np.repeat(np.repeat(m, CF, 0), CF, 1), TPF, 0), TPF, 1)
    for blk, rec in zip(tm.blocks, [b.attn1.processor for b in tm.blocks]):
        blk.attn1.set_processor(RecordQK(MaskedSelfAttention(rec.inner, torch.from_numpy(mask)[None, None]), store))
    store.clear()
    diffusers_forward(tm, np.ascontiguousarray(lat[:, :n].transpose(0, 4, 1, 2, 3)), np.zeros((1, n), np.float32),
                      context(), TPF)
    for blk in tm.blocks:
        blk.attn1.set_processor(blk.attn1.processor.inner.inner)
    ref = []
    for q, k in store:
        q = q[0, -CF * TPF:].astype(np.float64)  # the chunk's queries
        k = k[0].astype(np.float64)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(CFG.head_dim)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        sink = p[:, :, :TPF].sum(-1).mean(-1)
        cur = p[:, :, -CF * TPF:].sum(-1).mean(-1)
        ref.append(np.stack([sink, 1 - sink - cur, cur], -1))
    np.testing.assert_allclose(gen.stats.scores, np.stack(ref), atol=1e-4)
    assert gen.stats.last_plan.num_dummy == 4


def test_planted_current_frame_heads_are_classified_dummy():
    """Heads whose q/k carry only a strong time-RoPE component attend to their own frame: DHP finds them."""
    cfg = WanConfig.tiny(num_layers=3)
    model = WanDiT(cfg, nnx.Rngs(3))
    planted = {(0, 1), (1, 3), (2, 0), (2, 2)}
    d = cfg.head_dim
    for layer, head in planted:
        attn = model.blocks[layer].self_attn
        cols = np.arange(head * d, (head + 1) * d)
        for lin, norm in ((attn.q, attn.norm_q), (attn.k, attn.norm_k)):
            lin.kernel.set_value(lin.kernel[...].at[:, cols].set(0.0))
            bias = np.zeros(d, np.float32)
            bias[0] = 1.0  # the highest-frequency time pair: q.k peaks when query and key share a frame
            lin.bias.set_value(lin.bias[...].at[cols].set(bias))
            norm.set_value(norm[...].at[cols].set(40.0))
    run = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla",
                    dummy=DummyForcingConfig(ar_start=1, num_dummy=len(planted), query_rows="exact"))
    gen = Generator(model, run)
    gen.generate(jnp.asarray(context()))
    assert gen.stats.last_plan.dummy_heads() == frozenset(planted)
    for layer, head in planted:
        assert gen.stats.scores[layer, head, 2] > 0.8  # over 80% of the mass on the current chunk


def test_the_compiled_plan_step_gathers_no_heads(models):
    """Heads are contiguous per type after the weight permutation: the plan's step has no gather at all."""
    _, model = models
    run = RunConfig(video=VIDEO, sampling=SAMPLING, attn_impl="xla", dummy=DummyForcingConfig(ar_start=1))
    gen = Generator(model, run, plan=a_plan())
    gen.generate(jnp.asarray(context()))
    plan_layout = hma.plan_layout(a_plan(), TPF, CF)
    hlo = gen.step(plan_layout).compiled.as_text()
    assert "gather(" not in hlo and "scatter(" not in hlo
    warmup_hlo = gen.step(gen.first_layout).compiled.as_text()
    assert "dynamic-update-slice(" in warmup_hlo  # the check reads real HLO text
