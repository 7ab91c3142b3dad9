"""The released causal Wan2.1 checkpoint families, as their authors run them.

For each family: which entry of a training save its inference loads (the EMA weights or not), and the sampling,
KV-cache and Dummy Forcing settings of its inference config. `dfjax convert` records these in the model folder's
config.json ("family", "sampling", "cache", "dummy_forcing"), and generation uses them unless told otherwise.
docs/checkpoints.md lists where each value comes from.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from dfjax.config import CacheConfig, DummyForcingConfig, SamplingConfig
from dfjax.convert.common import ConversionError

FOUR_STEPS = (1000.0, 750.0, 500.0, 250.0)
# Causal Forcing's frame-wise releases by denoising steps: (schedule, first-chunk schedule or None). The 1- and
# 2-step models (Causal Forcing++) denoise the first chunk with the 4-step schedule.
FRAMEWISE_STEPS = {4: (FOUR_STEPS, None), 2: ((1000.0, 500.0), FOUR_STEPS), 1: ((1000.0,), FOUR_STEPS)}


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    entries: tuple[str, ...]  # the training-save entries its inference loads, in the order it tries them
    entry_why: str  # what its inference does, in words
    chunk_frames: int | None = 3  # None: no sampling settings recorded
    cache: tuple[int, int] | None = None  # (sink_frames, window_frames) of a local cache; None: global
    dummy_forcing: dict | None = None  # the Dummy Forcing release's settings for it; None: it ships none
    dummy_forcing_from: str = ""


FAMILIES = {f.name: f for f in (
    Family("self-forcing", "Self Forcing", ("generator_ema",),
           "Self Forcing's inference is run with --use_ema, which loads 'generator_ema'",
           dummy_forcing={"ar_start": 1, "local_context_length": 1},
           dummy_forcing_from="Dummy Forcing's configs/self_forcing_inference.yaml"),
    Family("longlive", "LongLive", ("generator", "model"),
           "LongLive's inference config sets use_ema: false, so it loads 'generator' (else 'model'), the weights "
           "its LoRA was trained on",
           cache=(3, 9),
           dummy_forcing={"ar_start": 2, "local_context_length": 1},
           dummy_forcing_from="Dummy Forcing's configs/longlive_inference.yaml"),
    Family("causal-forcing", "Causal Forcing (chunk-wise)", ("generator",),
           "Causal Forcing's chunk-wise inference is run without --use_ema, so it loads 'generator'",
           dummy_forcing={"ar_start": 1, "local_context_length": 1},
           dummy_forcing_from="Dummy Forcing's configs/causal_forcing_inference.yaml"),
    Family("causal-forcing-framewise", "Causal Forcing (frame-wise) and Causal Forcing++", ("generator_ema",),
           "Causal Forcing's frame-wise inference is run with --use_ema, which loads 'generator_ema'",
           chunk_frames=1),
    Family("wan", "Wan2.1 (bidirectional base weights)", (),
           "a Wan2.1 release is a bare state dict", chunk_frames=None),
)}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConversionError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def steps_from_name(path: str | Path) -> int | None:
    """'framewise-2step.pt' -> 2: the Causal Forcing++ releases name their step count."""
    m = re.search(r"(?<![0-9])([124])[-_]?steps?(?![0-9a-z])", Path(path).name.lower())
    return int(m.group(1)) if m else None


def detect_family(entries: tuple[str, ...], has_lora: bool, fsdp_keys: bool) -> tuple[str, str]:
    """(family, why) from what the base file holds: the releases differ in which entries they save."""
    if has_lora:
        return "longlive", "a LoRA was given, as LongLive's release ships one"
    have = set(entries)
    if {"generator", "generator_ema"} <= have:
        return "self-forcing", "the file has both 'generator' and 'generator_ema', as Self Forcing's release"
    if have == {"generator"}:
        return "causal-forcing", ("the file has only 'generator', as Causal Forcing's chunk-wise releases (Self "
                                  "Forcing's settings are the same)")
    if have == {"generator_ema"}:
        prefix = " with FSDP-wrapped names" if fsdp_keys else ""
        return "causal-forcing-framewise", (f"the file has only 'generator_ema'{prefix}, as Causal Forcing's "
                                            "frame-wise releases")
    if have == {"model"}:
        return "self-forcing", ("the file has only a 'model' entry, which no release is known to write; Self "
                                "Forcing's settings are assumed")
    return "wan", "the file is a bare state dict (no training entries), as a Wan2.1 release"


def _plain(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def records(fam: Family, steps: int | None = None) -> dict:
    """The model-folder config entries for the family: "sampling", "cache", "dummy_forcing" (those it has),
    each checked by building the dataclass the generation side builds from it."""
    if steps is not None and fam.name != "causal-forcing-framewise":
        raise ConversionError(f"--steps: only Causal Forcing's frame-wise releases come in several step counts "
                              f"(1, 2 or 4); {fam.title} runs 4 steps.")
    out: dict = {}
    if fam.chunk_frames is not None:
        schedule, first = FRAMEWISE_STEPS[steps or 4] if fam.name == "causal-forcing-framewise" else (FOUR_STEPS, None)
        # every family: the shifted 1000-step table (shift 5) indexed by the warped schedule, clean context at t=0
        sampling = SamplingConfig(denoising_steps=schedule, warp=True, shift=5.0, num_train_timesteps=1000,
                                  context_noise=0.0, chunk_frames=fam.chunk_frames, first_chunk_denoising_steps=first)
        out["sampling"] = _plain(sampling)
        cache = CacheConfig() if fam.cache is None else CacheConfig("local", *fam.cache)
        out["cache"] = _plain(cache)
    if fam.dummy_forcing is not None:
        DummyForcingConfig(**fam.dummy_forcing)  # valid for the dataclass
        out["dummy_forcing"] = dict(fam.dummy_forcing)
    return out


def describe(rec: dict) -> str:
    """One line of what `records` set."""
    s = rec.get("sampling")
    if s is None:
        return "none recorded (no causal release to follow: dfjax's defaults apply)"
    steps = "/".join(f"{t:g}" for t in s["denoising_steps"])
    first = s.get("first_chunk_denoising_steps")
    c = rec["cache"]
    cache = "global" if c["kind"] == "global" else \
        f"local: sink {c['sink_frames']} + window {c['window_frames']} frames"
    text = (f"chunks of {s['chunk_frames']} latent frame{'s' if s['chunk_frames'] > 1 else ''}, steps {steps}"
            + (f" (first chunk {'/'.join(f'{t:g}' for t in first)})" if first else "")
            + f", shift {s['shift']:g}, cache {cache}")
    d = rec.get("dummy_forcing")
    if d:
        text += "; Dummy Forcing " + ", ".join(f"{k} {v}" for k, v in d.items())
    return text
