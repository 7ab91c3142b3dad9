"""`dfjax convert`: every DiT source format round-trips to the same parameters; bad checkpoints fail
clearly and leave no model folder behind."""

from __future__ import annotations

import re
import shutil

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


# ---------------------------------------------------------------- bad input: one line, nothing left behind

def _tree(root):
    """Every path under root (hidden ones included) with its size: what a failed command must leave as it was."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def files(diffusers_model, tmp_path_factory):
    """Tiny source files in the releases' layouts, and a damaged copy of each kind."""
    tm, hf = diffusers_model
    d = tmp_path_factory.mktemp("files")
    wan = to_wan_names({k: v.clone() for k, v in tm.state_dict().items()})
    torch.save({"generator": {f"model.{k}": v for k, v in wan.items()}, "step": 3}, d / "base.pt")
    g = torch.Generator().manual_seed(0)
    w = wan["blocks.0.ffn.0.weight"]
    lora = {"base_model.model.blocks.0.ffn.0.lora_A.weight": torch.randn(4, w.shape[1], generator=g),
            "base_model.model.blocks.0.ffn.0.lora_B.weight": torch.randn(w.shape[0], 4, generator=g)}
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 3}, d / "lora.pt")
    data = (d / "base.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "garbage.safetensors").write_bytes(b"\x7f" * 64)
    shutil.copytree(hf, d / "hf-bad-config")
    cfg = (hf / "config.json").read_text()
    (d / "hf-bad-config" / "config.json").write_text(cfg[: len(cfg) // 2])
    return d


def _run(argv, tmp_path, capsys):
    """dfjax ARGV from tmp_path: exit status 2, one line naming the problem, and tmp_path exactly as before."""
    from dfjax.cli import main

    before = _tree(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dfjax: error:"), err
    assert _tree(tmp_path) == before
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["{f}/lora.pt", "out"], "is a LoRA file (a generator_lora entry), not a base model; give it as --lora"),
    (["{f}/base.pt", "out", "--lora", "{f}/base.pt"], "is a full checkpoint (entries generator), not a LoRA; give it "
                                                      "as the source"),
    (["{f}/base.pt", "out", "--lora", "{f}/lora.pt", "--num-heads", "4"], "has rank 4, and its file does not store "
                                                                          "alpha"),
    (["{f}/truncated.pt", "out"], "truncated.pt: the file is truncated or damaged (PytorchStreamReader failed"),
    (["{f}/garbage.safetensors", "out"], "garbage.safetensors: not a valid .safetensors file"),
    (["{f}/base.pt", "out", "--num-heads", "4", "--text-encoder", "{f}/garbage.safetensors"],
     "garbage.safetensors: not a valid .safetensors file"),
    (["{f}/hf-bad-config", "out"], "hf-bad-config/config.json is damaged: not valid JSON"),
    (["{f}/base.pt", "out"], "cannot tell how many attention heads this 48-wide model has"),
    (["{f}/base.pt", "out", "--config", "wan-1.3b"], "the sizes disagree (weights vs config: dim 48 vs 1536, "
                                                     "num_layers 2 vs 30"),
    (["{f}/base.pt", "out", "--num-heads", "5"], "5 heads (--num-heads) do not divide the model width 48"),
    (["{f}/base.pt", "out", "--steps", "2", "--num-heads", "4"], "--steps: only Causal Forcing's frame-wise releases"),
    (["{f}/base.pt", "out", "--entry", "generator_ema"], "--entry generator_ema: "),
    (["{f}/missing.pt", "out"], "the source "),
    (["{f}/base.pt", "out", "--vae", "{f}/nothing"], "--vae "),
])
def test_bad_convert_input_is_one_line_before_any_work(files, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    line = _run(["convert", *[a.format(f=files) for a in args]], tmp_path, capsys)
    assert message in line, line


def test_a_torch_file_without_torch_says_which_extra_installs_it(files, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as on a machine without it
    line = _run(["convert", str(files / "base.pt"), str(tmp_path / "out")], tmp_path, capsys)
    assert "base.pt is a PyTorch file, and reading it needs torch" in line and "pip install 'dfjax[torch]'" in line


def test_an_output_on_a_read_only_filesystem_fails_before_any_work(files, tmp_path, capsys, monkeypatch):
    import errno
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *a, **k):  # the kernel's answer for anything made under a read-only mount
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    line = _run(["convert", str(files / "base.pt"), str(ro / "models" / "m"), "--num-heads", "4"], tmp_path, capsys)
    assert f"cannot write {ro}/models/m: {ro} is not writable (Read-only file system)" in line


@pytest.mark.parametrize("target", ["cwd", "foreign", "file", "model-with-extra-file"])
def test_overwrite_replaces_only_what_dfjax_wrote(files, diffusers_model, tmp_path, capsys, monkeypatch, target):
    """`dfjax convert x.pth . --overwrite` once deleted the current directory with the source in it."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(files / "base.pt", tmp_path / "x.pth")
    if target == "cwd":
        out, message = ".", "holds the current directory; --overwrite will not replace it"
    elif target == "foreign":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.tex").write_text("years of work")
        out, message = "mine", "mine is not a folder dfjax wrote (it holds thesis.tex); dfjax replaces only its own"
    elif target == "file":
        (tmp_path / "notes.txt").write_text("keep")
        out, message = "notes.txt", "notes.txt exists and is not a folder"
    else:
        convert_model_folder(diffusers_model[1], tmp_path / "model")
        (tmp_path / "model" / "profile.json").write_text("{}")
        out, message = "model", "model is not a folder dfjax wrote (it holds config.json, profile.json, transformer)"
    line = _run(["convert", "x.pth", out, "--overwrite", "--num-heads", "4"], tmp_path, capsys)
    assert message in line, line


def test_overwrite_replaces_a_model_folder_atomically_with_the_users_umask(diffusers_model, tmp_path, monkeypatch):
    import os
    import stat

    _, hf = diffusers_model
    old = convert_model_folder(hf, tmp_path / "m", dtype="float32")
    before = _tree(tmp_path)
    import dfjax.convert.transformer as tr

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # dies while the new transformer is being converted
        m.setattr(tr, "patch_embedding", interrupted)
        with pytest.raises(KeyboardInterrupt):
            convert_model_folder(hf, old, overwrite=True)
    assert _tree(tmp_path) == before  # the old folder whole, nothing beside it
    prev = os.umask(0o027)
    try:
        convert_model_folder(hf, old, overwrite=True)  # bfloat16 this time
    finally:
        os.umask(prev)
    assert read_config(old)["transformer"]["param_dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    for p in (old, old / "config.json", old / "transformer"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o750 if p.is_dir() else 0o640), (p, oct(mode))


@pytest.mark.parametrize("damage,message", [
    ("config", "config.json is damaged: not valid JSON"),
    ("data", "its transformer part is damaged or incomplete ("),
    ("part", "its transformer part is damaged (no Orbax checkpoint in"),
])
def test_a_damaged_model_folder_is_one_line(tmp_path, capfd, damage, message):
    """generate on a model folder with a truncated config.json, a cut data file or a lost metadata file: one line
    (a failed Orbax read once printed 541, its other reads failing later as unraisable exceptions)."""
    import gc
    import time

    from dfjax.cli import main
    from dfjax.demo import demo_model_folder

    folder = tmp_path / "m"
    shutil.copytree(demo_model_folder(), folder)
    if damage == "config":
        text = (folder / "config.json").read_text()
        (folder / "config.json").write_text(text[: len(text) // 2])
    else:
        files = [p for p in (folder / "transformer").rglob("*") if p.is_file()]
        if damage == "data":  # the largest file holds weights: cut it short
            big = max(files, key=lambda p: p.stat().st_size)
            big.write_bytes(big.read_bytes()[:100])
        else:
            for p in files:
                if p.name == "_METADATA":
                    p.unlink()
    before = _tree(tmp_path)
    assert main(["generate", "--model", str(folder), "--prompt", "a red square", "--out", str(tmp_path / "o.mp4"),
                 "--quiet"]) == 2
    gc.collect()
    time.sleep(0.5)  # the reads still in flight finish and fail
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfjax: error:") and message in err[0], err[:5]
    assert "convert the model again" in err[0]
    if damage == "data":  # TensorStore's own status line, not Orbax's wrapper
        assert re.search(r"\(([A-Z_]+): Error reading \"[\w.]+/0\.0\" in OCDBT database", err[0]), err[0]
    assert _tree(tmp_path) == before  # no video, nothing else


def test_train_demo_refuses_an_out_it_did_not_write_before_training(tmp_path, capsys):
    from dfjax.cli import main

    (tmp_path / "data.csv").write_text("1,2")
    before = _tree(tmp_path)
    assert main(["train-demo", "--out", str(tmp_path), "--size", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder dfjax wrote (it holds data.csv)" in err[0], err
    assert _tree(tmp_path) == before


def test_progress_shows_on_a_terminal_or_for_a_large_part(diffusers_model, tmp_path, monkeypatch):
    import io
    import sys

    from dfjax.convert.build import LARGE_PART, _progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    items = [("a", 1), ("b", 2)]
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert _progress(items, "x", 2, LARGE_PART - 1, None) is items  # small, and not a terminal
    assert list(_progress(iter(items), "x", 2, LARGE_PART, None)) == items  # large: a bar even in a log file
    assert "converting x" in log.getvalue()
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    convert_model_folder(diffusers_model[1], tmp_path / "m")
    assert "converting transformer" in term.getvalue() and "tensor" in term.getvalue()
