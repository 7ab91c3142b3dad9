"""`dfjax convert`: every DiT source format round-trips to the same parameters; bad checkpoints fail
clearly and leave no model folder behind."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dfjax.convert.build import convert_model_folder  # noqa: E402
from dfjax.convert.common import ConversionError  # noqa: E402
from dfjax.config import WanConfig  # noqa: E402
from dfjax.model_io import ModelFolderError, read_config  # noqa: E402
from dfjax.params import flat_state  # noqa: E402
from dfjax.t2v import load_transformer  # noqa: E402
from tests.oracles import tiny_diffusers_transformer  # noqa: E402

CFG = WanConfig.tiny()
TO_WAN = [
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"^blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"\.attn1\.", ".self_attn."), (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^proj_out\.", "head.head."), (r"^scale_shift_table$", "head.modulation"),
]


def to_wan_names(sd):
    out = {}
    for k, v in sd.items():
        for pat, rep in TO_WAN:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def diffusers_model(tmp_path_factory):
    tm = tiny_diffusers_transformer(CFG, seed=3)
    folder = tmp_path_factory.mktemp("hf") / "transformer"
    tm.save_pretrained(folder)
    return tm, folder


def converted(folder, **kw):
    model = load_transformer(folder)
    return {k: np.asarray(v) for k, v in flat_state(model).items()}


def test_diffusers_folder_and_wan_files_give_the_same_params(diffusers_model, tmp_path):
    tm, hf_folder = diffusers_model
    ref = converted(convert_model_folder(hf_folder, tmp_path / "a", dtype="float32"))
    assert read_config(tmp_path / "a")["transformer"]["num_heads"] == CFG.num_heads  # from diffusers' config.json
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    wan = to_wan_names(sd)
    # a Self Forcing style .pt: EMA weights with wrapper prefixes, and different non-EMA weights
    noisy = {f"model.{k}": v + 1.0 for k, v in wan.items()}
    ema = {f"model._fsdp_wrapped_module.{k.replace('blocks.', 'blocks._checkpoint_wrapped_module.', 0)}": v
           for k, v in wan.items()}
    torch.save({"generator": noisy, "generator_ema": ema}, tmp_path / "sf.pt")
    got = converted(convert_model_folder(tmp_path / "sf.pt", tmp_path / "b", num_heads=CFG.num_heads, dtype="float32"))
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    got_noisy = converted(convert_model_folder(tmp_path / "sf.pt", tmp_path / "c", num_heads=CFG.num_heads,
                                               ema=False, dtype="float32"))
    np.testing.assert_array_equal(got_noisy["head.bias"], ref["head.bias"] + 1.0)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in wan.items()}, str(tmp_path / "wan.safetensors"))
    got = converted(convert_model_folder(tmp_path / "wan.safetensors", tmp_path / "d", num_heads=CFG.num_heads,
                                         dtype="float32"))
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])


def test_bf16_parameters_keep_norms_in_fp32(diffusers_model, tmp_path):
    _, hf_folder = diffusers_model
    model = load_transformer(convert_model_folder(hf_folder, tmp_path / "bf"))
    assert model.blocks[0].self_attn.q.kernel[...].dtype == np.dtype("bfloat16")
    assert model.blocks[0].modulation[...].dtype == np.float32
    assert model.time_embedding_1.kernel[...].dtype == np.float32


def test_lora_is_merged(diffusers_model, tmp_path):
    tm, hf_folder = diffusers_model
    wan = to_wan_names({k: v.clone() for k, v in tm.state_dict().items()})
    torch.save({"generator": {f"model.{k}": v for k, v in wan.items()}}, tmp_path / "base.pt")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, CFG.dim, generator=g), torch.randn(CFG.dim, 2, generator=g)
    torch.save({"generator_lora": {"model.blocks.1.self_attn.q.lora_A.weight": a,
                                   "model.blocks.1.self_attn.q.lora_B.weight": b}}, tmp_path / "lora.pt")
    got = converted(convert_model_folder(tmp_path / "base.pt", tmp_path / "m", num_heads=CFG.num_heads, ema=False,
                                         lora=tmp_path / "lora.pt", lora_alpha=4.0, dtype="float32"))
    want = (wan["blocks.1.self_attn.q.weight"] + 2.0 * (b @ a)).numpy().T  # alpha / r = 4 / 2
    np.testing.assert_allclose(got["blocks.1.self_attn.q.kernel"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("damage,message", [
    (lambda sd: sd.pop("blocks.1.ffn.0.weight"), "missing key"),
    (lambda sd: sd.__setitem__("blocks.0.extra.weight", torch.zeros(3)), "unexpected key"),
    (lambda sd: sd.__setitem__("blocks.0.self_attn.q.weight", torch.zeros(48, 40)), "blocks.0.self_attn.q.weight"),
])
def test_malformed_checkpoints_fail_clearly_and_leave_nothing(diffusers_model, tmp_path, damage, message):
    tm, _ = diffusers_model
    wan = to_wan_names({k: v.clone() for k, v in tm.state_dict().items()})
    damage(wan)
    torch.save(wan, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=message):
        convert_model_folder(tmp_path / "bad.pth", tmp_path / "out", num_heads=CFG.num_heads)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pth"]


def test_config_mismatch_and_wrong_format_are_refused(diffusers_model, tmp_path):
    _, hf_folder = diffusers_model
    with pytest.raises(ConversionError, match="does not match the given config"):
        convert_model_folder(hf_folder, tmp_path / "o", config="wan-1.3b")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(ConversionError, match="not a Wan2.1 transformer"):
        convert_model_folder(tmp_path / "x.pth", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_interrupted_conversion_leaves_no_folder(diffusers_model, tmp_path, monkeypatch):
    _, hf_folder = diffusers_model
    import shutil

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copytree", interrupted)  # dies after the checkpoints are written
    tok = tmp_path / "tok"
    from dfjax.text import make_tiny_tokenizer

    make_tiny_tokenizer(tok, ["a red square", "a blue circle"], vocab_size=20)
    with pytest.raises(KeyboardInterrupt):
        convert_model_folder(hf_folder, tmp_path / "out", tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_loading_a_foreign_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFolderError, match="not a dfjax model folder"):
        load_transformer(tmp_path)


# ---------------------------------------------------------------- host memory

_MEMORY_CHILD = r"""
import json, sys
import numpy as np
from dfjax.convert.build import convert_model_folder, transformer_part
from dfjax.model_io import write_model_folder

def high_water():  # peak resident set of this process so far, bytes
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

big, small, out, mode = sys.argv[1:5]
convert_model_folder(small, out + "-warm")  # imports, jax, flax and orbax set-up paid before the measurement
before = high_water()
if mode == "held":  # the converted model held whole, then saved (the writer before)
    cfg, items = transformer_part(big)
    params = dict(items)
    write_model_folder(out, {"transformer": cfg.__dict__}, {"transformer": params})
    output, largest = sum(v.nbytes for v in params.values()), max(v.nbytes for v in params.values())
else:
    convert_model_folder(big, out, flush_bytes=8 << 20)
    output = largest = None
print(json.dumps({"growth": high_water() - before, "output": output, "largest": largest}))
"""


def test_conversion_holds_a_few_tensors_never_the_model(diffusers_model, tmp_path):
    """Converting a bf16 safetensors checkpoint into a folder holds neither the source nor the output whole: the
    source is read tensor by tensor and the output written in batches (8 MB here) as it is converted, so host memory
    grows by a few tensors in flight (the largest is the fp32 time projection, read, widened and transposed) and a
    few batches inside Orbax's save, about half this model's output; holding the converted model before one save
    (the writer before) grows it by more than the whole output. Measured as the child's VmHWM growth (Linux), with
    glibc's mmap threshold fixed: its default rises as large blocks are freed, and then keeps freed tensors of up
    to 32 MB in the heap, slack that this small model would mistake for holding."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux's /proc to read the peak resident memory")
    cfg = WanConfig(dim=1024, num_layers=6, num_heads=8, ffn_dim=4096, freq_dim=256, text_dim=1024, in_channels=16,
                    out_channels=16)
    big = tmp_path / "big"
    tiny_diffusers_transformer(cfg, seed=0).to(torch.bfloat16).save_pretrained(big)  # ~200 MB, bf16 like releases
    _, small = diffusers_model
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), JAX_PLATFORMS="cpu",
               MALLOC_MMAP_THRESHOLD_="131072")
    out = {}
    for mode in ("held", "streamed"):
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(big), str(small), str(tmp_path / mode), mode],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    output, largest = out["held"]["output"], out["held"]["largest"]
    in_flight = 3 * largest + 4 * (8 << 20) + (16 << 20)  # what streaming may hold; about half the output here
    assert in_flight < 0.6 * output, (in_flight, output)
    assert out["held"]["growth"] > output, out  # measured: 594 MB for a 237 MB output (Orbax's save copies it)
    assert out["streamed"]["growth"] < in_flight, (in_flight, out)  # measured: 75 MB (bound 123 MB)
    held, streamed = converted(tmp_path / "held"), converted(tmp_path / "streamed")
    assert held.keys() == streamed.keys()
    for k, v in held.items():  # the same parameters either way
        np.testing.assert_array_equal(streamed[k], v)
