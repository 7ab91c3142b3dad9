"""Every released checkpoint family converts the way its authors run it: tiny checkpoints in each release's layout
(entries, wrapper prefixes, extra training state, LoRA files), converted and compared with the weights the
release's own loader would take (LoRA merged independently here, W + (alpha/r) B A in float64), with the family's
sampling, cache and Dummy Forcing settings recorded; and one forward against diffusers' WanTransformer3DModel."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dfjax.config import CacheConfig, DummyForcingConfig, SamplingConfig, WanConfig, config_from_dict  # noqa: E402
from dfjax.convert.build import convert_model_folder  # noqa: E402
from dfjax.convert.transformer import expected_params  # noqa: E402
from dfjax.model_io import load_params, read_config  # noqa: E402
from tests.oracles import tiny_diffusers_transformer  # noqa: E402
from tests.test_convert import to_wan_names  # noqa: E402

CFG = WanConfig.tiny()
RANK = 4
# Wan names of every nn.Linear in a block (LongLive puts its LoRA on all of them) -> dfjax kernels
LINEARS = {**{f"{a}.{p}": f"{'self_attn' if a == 'self_attn' else 'cross_attn'}.{p}"
              for a in ("self_attn", "cross_attn") for p in "qkvo"}, "ffn.0": "ffn_in", "ffn.2": "ffn_out"}


def _params(folder) -> dict[str, np.ndarray]:
    """The stored DiT parameters, by flat key, in their stored dtypes."""
    cfg = config_from_dict(WanConfig, read_config(folder)["transformer"])
    return {k: np.asarray(v) for k, v in load_params(folder, "transformer", expected_params(cfg)).items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model: its diffusers module, its tensors under Wan names, a LoRA on every block linear, and the
    reference conversion of its unmerged weights (a diffusers folder, its key map checked by test_transformer)."""
    tm = tiny_diffusers_transformer(CFG, seed=11)
    wan = to_wan_names({k: v.clone() for k, v in tm.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    lora = {}
    for i in range(CFG.num_layers):
        for name in LINEARS:
            w = wan[f"blocks.{i}.{name}.weight"]
            lora[f"blocks.{i}.{name}"] = (torch.randn(RANK, w.shape[1], generator=g) * 0.3,
                                          torch.randn(w.shape[0], RANK, generator=g) * 0.3)
    folder = tmp_path_factory.mktemp("ref") / "hf"
    tm.save_pretrained(folder)
    ref = _params(convert_model_folder(folder, folder.parent / "ref", dtype="float32"))
    return tm, wan, lora, ref


def merged(ref, wan, lora, scale):
    """ref with every LoRA target replaced by (W + scale B A)^T, computed in float64 here."""
    out = dict(ref)
    for module, (a, b) in lora.items():
        i, name = module.split(".", 2)[1:]
        w = wan[f"{module}.weight"].double().numpy()
        out[f"blocks.{i}.{LINEARS[name]}.kernel"] = (w + scale * (b.double().numpy() @ a.double().numpy())).T
    return out


def peft_names(lora, prefix="base_model.model.", default=""):
    sd = {}
    for module, (a, b) in lora.items():
        sd[f"{prefix}{module}.lora_A{default}.weight"] = a
        sd[f"{prefix}{module}.lora_B{default}.weight"] = b
    return sd


def training_state():  # what a full training save holds besides the generator: none of it is model weights
    return {"critic": {"model.blocks.0.x.weight": torch.zeros(2)}, "step": 1200,
            "generator_optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                                    "param_groups": [{"lr": 1e-5, "betas": (0.0, 0.999)}]}}


def write_case(case, wan, lora, d):
    """The release's files for `case` in folder d -> (source, convert_model_folder kwargs, expected scale or None,
    which weights: 'plain' or 'noisy')."""
    model = {f"model.{k}": v for k, v in wan.items()}
    noisy = {k: v + 1.0 for k, v in model.items()}  # the entry the family does not load
    fsdp = {f"model._fsdp_wrapped_module.{k.replace('blocks.', 'blocks._checkpoint_wrapped_module.', 0)}": v
            for k, v in wan.items()}  # EMA shadows of FSDP-wrapped modules
    kw = dict(num_heads=CFG.num_heads, dtype="float32")
    if case == "self-forcing":
        torch.save({"generator": noisy, "generator_ema": fsdp, **training_state()}, d / "self_forcing_dmd.pt")
        return d / "self_forcing_dmd.pt", kw, None
    if case == "longlive":  # LongLive's LoRA was trained on 'generator': its EMA entry must not be taken
        torch.save({"generator": model, "generator_ema": noisy, **training_state()}, d / "longlive_base.pt")
        torch.save({"generator_lora": peft_names(lora), "critic_lora": {}, "step": 1200}, d / "lora.pt")
        return d / "longlive_base.pt", dict(kw, lora=d / "lora.pt", lora_alpha=8.0), 8.0 / RANK
    if case == "longlive-model-entry":  # {"model": ...} base, bare peft LoRA dict, alpha from its adapter config
        torch.save({"model": model, "step": 5}, d / "base.pt")
        (d / "lora").mkdir()
        torch.save(peft_names(lora, default=".default"), d / "lora" / "adapter_model.bin")
        (d / "lora" / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 2}))
        return d / "base.pt", dict(kw, lora=d / "lora", family="longlive", dtype="bfloat16"), 2.0 / RANK
    if case == "causal-forcing":
        torch.save({"generator": model}, d / "causal_forcing.pt")
        return d / "causal_forcing.pt", kw, None
    if case in ("causal-forcing-framewise", "causal-forcing++"):
        name = "causal_forcing.pt" if case == "causal-forcing-framewise" else "framewise-2step.pt"
        torch.save({"generator_ema": fsdp}, d / name)
        return d / name, kw, None
    if case == "wan":  # a bare Wan2.1 file, its config.json beside it (heads from there)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in wan.items()}, str(d / "diffusion_pytorch_model.safetensors"))
        (d / "config.json").write_text(json.dumps({"dim": CFG.dim, "num_heads": CFG.num_heads, "num_layers": 2}))
        return d / "diffusion_pytorch_model.safetensors", dict(dtype="bfloat16", compute_dtype="float32"), None
    raise AssertionError(case)


EXPECTED = {  # case: (family, entry, chunk frames, steps, first-chunk steps, cache, Dummy Forcing)
    "self-forcing": ("self-forcing", "generator_ema", 3, (1000, 750, 500, 250), None, CacheConfig(), 1),
    "longlive": ("longlive", "generator", 3, (1000, 750, 500, 250), None, CacheConfig("local", 3, 9), 2),
    "longlive-model-entry": ("longlive", "model", 3, (1000, 750, 500, 250), None, CacheConfig("local", 3, 9), 2),
    "causal-forcing": ("causal-forcing", "generator", 3, (1000, 750, 500, 250), None, CacheConfig(), 1),
    "causal-forcing-framewise": ("causal-forcing-framewise", "generator_ema", 1, (1000, 750, 500, 250), None,
                                 CacheConfig(), None),
    "causal-forcing++": ("causal-forcing-framewise", "generator_ema", 1, (1000, 500), (1000, 750, 500, 250),
                         CacheConfig(), None),
    "wan": ("wan", None, None, None, None, None, None),
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_family_converts_to_the_weights_its_release_loads(tiny, tmp_path, case):
    tm, wan, lora, ref = tiny
    src, kw, scale = write_case(case, wan, lora, tmp_path)
    out = convert_model_folder(src, tmp_path / "out", **kw)
    meta = read_config(out)
    family, entry, chunk, steps, first, cache, ar_start = EXPECTED[case]
    conv = meta["conversion"]
    assert (meta["family"], conv["family"], conv["entry"]) == (family, family, entry)
    assert conv["family_from"].startswith("--family" if "family" in kw else "detected: ")

    want = merged(ref, wan, lora, scale) if scale else ref
    got = _params(out)
    assert got.keys() == want.keys()
    storage = kw.get("dtype", "bfloat16")
    t = meta["transformer"]
    assert (t["param_dtype"], t["dtype"]) == (storage, kw.get("compute_dtype", storage))
    assert (conv["storage_dtype"], conv["compute_dtype"]) == (t["param_dtype"], t["dtype"])
    assert {str(v.dtype) for v in got.values()} == {storage, "float32"}  # norms and modulation stay float32
    for k, v in want.items():
        # a float32 merge done in float64 and rounded once is within an ulp (~1e-7 relative) of ours; a bfloat16
        # weight is the float32 value rounded once more, which both sides do the same way
        v = np.asarray(v, np.float32).astype(got[k].dtype)
        np.testing.assert_allclose(got[k].astype(np.float32), v.astype(np.float32), rtol=1e-6, atol=1e-6, err_msg=k)
    if scale:
        assert conv["lora"]["rank"] == RANK and conv["lora"]["scale"] == pytest.approx(scale)
        assert conv["lora"]["pairs"] == len(lora)
        assert not np.allclose(got["blocks.1.ffn_in.kernel"], ref["blocks.1.ffn_in.kernel"], atol=1e-3)

    if chunk is None:  # Wan's base weights: no causal release to follow, nothing recorded
        assert not {"sampling", "cache", "dummy_forcing"} & set(meta)
        assert conv["num_heads_from"].endswith("config.json")
        return
    assert conv["num_heads_from"] == "--num-heads"
    s = config_from_dict(SamplingConfig, meta["sampling"])  # what the generation side builds
    assert (s.chunk_frames, s.denoising_steps, s.first_chunk_denoising_steps) == (chunk, steps, first)
    assert (s.shift, s.warp, s.context_noise) == (5.0, True, 0.0)
    assert config_from_dict(CacheConfig, meta["cache"]) == cache
    if ar_start is None:
        assert "dummy_forcing" not in meta
    else:
        d = config_from_dict(DummyForcingConfig, meta["dummy_forcing"])
        assert (d.ar_start, d.local_context_length) == (ar_start, 1)


def test_longlive_forward_matches_diffusers_with_the_lora_merged(tiny, tmp_path):
    """The converted LongLive folder computes what diffusers computes with the LoRA merged into its weights (peft's
    merge_and_unload, done here in float64 on the torch side): fp32 on both sides, tolerance as test_transformer."""
    import copy

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dfjax.cache import AttentionLayout, init_cache
    from dfjax.model.rope import rope_tables
    from dfjax.model.transformer import ChunkCall, ChunkStep, WanDiT
    from dfjax.params import assign_params
    from tests.oracles import diffusers_forward
    from tests.test_transformer import LATENT_HW, TOL, TPF, to_cfhw

    tm, wan, lora, _ = tiny
    src, kw, scale = write_case("longlive", wan, lora, tmp_path)
    out = convert_model_folder(src, tmp_path / "out", **kw)
    model = assign_params(WanDiT(CFG, nnx.Rngs(0)), load_params(out, "transformer", expected_params(CFG)))

    oracle = copy.deepcopy(tm)
    names = dict(zip(to_wan_names(dict.fromkeys(tm.state_dict())), tm.state_dict()))  # Wan name -> diffusers name
    with torch.no_grad():
        params = dict(oracle.named_parameters())
        for module, (a, b) in lora.items():
            p = params[names[f"{module}.weight"]]
            p.copy_((p.double() + scale * (b.double() @ a.double())).float())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, *LATENT_HW, CFG.in_channels)).astype(np.float32)
    t = np.array([[1000.0, 937.5, 833.3]], np.float32)
    context = rng.standard_normal((1, CFG.text_len, CFG.text_dim)).astype(np.float32)
    ref = diffusers_forward(oracle, to_cfhw(x), t, context, TPF)
    layout = AttentionLayout.uniform(CFG.num_layers, CFG.num_heads, 0, 3, TPF, 3)  # one chunk, nothing cached
    graph, state = nnx.split(model)

    @jax.jit  # one compile (eager op-by-op dispatch costs 5x the time here)
    def flow(state, x, t, context):
        m = nnx.merge(graph, state)
        cache = init_cache(layout, 1, CFG.head_dim, jnp.float32)
        return m(x, t, m.text_kv(context), cache, rope_tables(CFG.head_dim), ChunkStep.at(0), ChunkCall("xla"))[0]

    ours = to_cfhw(np.asarray(flow(state, x, t, context)))
    assert np.abs(ours - ref).max() < TOL
    unmerged = diffusers_forward(tm, to_cfhw(x), t, context, TPF)
    assert np.abs(unmerged - ref).max() > 100 * TOL  # the LoRA changes the output: the comparison can tell


def test_convert_prints_what_it_did_and_stores_it(tiny, tmp_path, capsys):
    """The summary: source entry, size and heads with their origin, both dtypes, LoRA rank / alpha / scale, the
    sampling recorded; the same facts in config.json "conversion"; no progress bar in captured output."""
    from dfjax.cli import main

    _, wan, lora, _ = tiny
    src, _, _ = write_case("longlive", wan, lora, tmp_path)
    out = tmp_path / "m"
    assert main(["convert", str(src), str(out), "--lora", str(tmp_path / "lora.pt"), "--lora-alpha", "2",
                 "--num-heads", "4", "--dtype", "float32", "--compute-dtype", "bfloat16"]) == 0
    stdout, stderr = capsys.readouterr()
    rows = dict(line.split(None, 1) for line in stdout.splitlines()[1:-1] if not line.startswith("  note"))
    assert rows["family"].startswith("longlive (detected: a LoRA was given")
    assert rows["weights"].startswith("'generator' of longlive_base.pt (LongLive's inference config sets "
                                      "use_ema: false")
    assert rows["transformer"].startswith("dim 48, 2 layers, 4 heads of 12 (heads: --num-heads)")
    assert rows["lora"].startswith(f"lora.pt: rank 4, alpha 2 (--lora-alpha), scale 0.5, {len(lora)} weights merged")
    assert rows["dtypes"].startswith("stored float32, computed bfloat16")
    assert rows["sampling"] == ("chunks of 3 latent frames, steps 1000/750/500/250, shift 5, cache local: sink 3 + "
                                "window 9 frames; Dummy Forcing ar_start 2, local_context_length 1")
    assert "took 'generator'; left out critic, generator_ema, generator_optimizer, step" in stdout
    assert stdout.splitlines()[-1] == f"wrote {out}"
    err = stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("done in"), err  # no progress bar: stderr is not a terminal
    conv = read_config(out)["conversion"]
    assert conv["lora"] == dict(file="lora.pt", rank=4, alpha=2.0, alpha_from="--lora-alpha", scale=0.5,
                                pairs=len(lora))
    assert (conv["entry"], conv["num_heads"], conv["storage_dtype"], conv["compute_dtype"]) == \
        ("generator", 4, "float32", "bfloat16")
    assert conv["sources"] == {"transformer": "longlive_base.pt", "lora": "lora.pt"}
