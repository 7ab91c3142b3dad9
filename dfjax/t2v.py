"""Text in, mp4 out: a model folder's text encoder, DiT and VAE around the AR loop.

Each chunk's latents are decoded by the streaming VAE as soon as the chunk is clean, while the next
chunk is denoised (decode_chunks), and its frames go to a background mp4 writer, so the first frames
exist long before the video is done. Compiles (DiT steps, VAE decode) are timed apart from the run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from dfjax.config import WanConfig, config_from_dict
from dfjax.dummy import HeadPlan
from dfjax.model.fp8 import quantize_params
from dfjax.model.transformer import WanDiT
from dfjax.model.vae import WanVAE, WanVAEConfig, decode_chunk, init_decoder_cache
from dfjax.model_io import ModelFolderError, load_params, read_config
from dfjax.params import abstract_params, assign_params
from dfjax.pipeline import Generator, RunConfig
from dfjax.text import TextEncoder
from dfjax.video import Mp4Writer, to_uint8_on_device

PARTS = ("transformer", "text_encoder", "vae", "tokenizer")


def load_transformer(folder, dtype: str | None = None, fp8: bool | None = None) -> WanDiT:
    """The folder's DiT; dtype: the compute dtype, fp8: the blocks' linears in fp8 (None: the folder's choice for
    both). The checkpoint holds the unquantised weights (bf16 or fp32); fp8 quantises them as they load."""
    cfg = config_from_dict(WanConfig, read_config(folder)["transformer"])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("dtype", dtype or None), ("fp8", fp8)) if v is not None})
    stored = lambda: WanDiT(dataclasses.replace(cfg, fp8=False), nnx.Rngs(0))
    flat = load_params(folder, "transformer", abstract_params(stored))
    make = lambda: WanDiT(cfg, nnx.Rngs(0))
    if cfg.fp8:
        flat = quantize_params(flat, abstract_params(make))
    return assign_params(nnx.eval_shape(make), flat)


def load_vae(folder) -> WanVAE:
    cfg = config_from_dict(WanVAEConfig, read_config(folder)["vae"])
    cfg = WanVAEConfig(**{**cfg.__dict__, "with_encoder": False})  # generation only decodes
    make = lambda: WanVAE(cfg, rngs=nnx.Rngs(0))
    flat = load_params(folder, "vae", {k: v for k, v in abstract_params(make).items()})
    return assign_params(nnx.eval_shape(make), flat)


def check_model_folder(folder) -> dict:
    """Every part that text-to-video needs is there, and the parts fit together; no weights are read."""
    folder = Path(folder)
    meta = read_config(folder)
    missing = [p for p in PARTS if not (folder / p).is_dir() or (p != "tokenizer" and p not in meta)]
    if missing:
        raise ModelFolderError(f"{folder} lacks {missing}; convert them into it with `dfjax convert` "
                               "(--text-encoder, --vae, --tokenizer).")
    dit, te, vae = meta["transformer"], meta["text_encoder"], meta["vae"]
    if dit["text_dim"] != te["d_model"]:
        raise ModelFolderError(f"{folder}: the text encoder gives {te['d_model']}-wide embeddings, the DiT expects "
                               f"{dit['text_dim']}.")
    if dit["in_channels"] != vae["z_dim"]:
        raise ModelFolderError(f"{folder}: the VAE has {vae['z_dim']} latent channels, the DiT {dit['in_channels']}.")
    return meta


@dataclass
class VideoModel:
    dit: WanDiT
    text: TextEncoder
    vae: WanVAE

    @classmethod
    def load(cls, folder, dtype: str | None = None, fp8: bool | None = None) -> "VideoModel":
        check_model_folder(folder)
        return cls(load_transformer(folder, dtype, fp8), TextEncoder.from_model_folder(folder), load_vae(folder))


@dataclass
class Timing:
    """One video's timings in seconds, compiles apart. The stages overlap on the device (see VideoStream), so there
    is no diffusion / VAE split here; `dfjax bench` times each stage alone."""

    frames: int
    text_s: float = 0.0
    first_chunk_s: float = 0.0  # from the start of the run to the first decoded frames on the host
    e2e_s: float = 0.0
    write_s: float = 0.0  # the mp4 writer's own time (its thread), for make_video
    compile_s: float = 0.0
    chunk_s: list = field(default_factory=list)  # from one chunk on the host to the next

    def as_dict(self) -> dict:
        return {**self.__dict__, "e2e_fps": self.frames / self.e2e_s if self.e2e_s else None}


@dataclass
class VideoChunk:
    index: int  # the chunk's index in the video
    frames: np.ndarray  # uint8 [t, height, width, 3]
    prompt: str  # the prompt it was made under


class VideoStream:
    """The decoded chunks of one video, as they are made (an iterator of VideoChunk).

    set_prompt() changes the prompt from the next chunk asked for on (the cross-attention uses the new text; the
    frames already made stay in the self-attention cache). one_late (see decode_chunks): chunk k >= 1 is handed out
    once chunk k + 1 is being made (the fastest, for files), so a new prompt shows from chunk k + 2; otherwise as soon
    as it is on the host (for live viewing: a new prompt shows from chunk k + 1). `timing` fills in as chunks
    come; close() stops early.
    """

    def __init__(self, pipeline: "VideoPipeline", prompt: str, seed: int, progress: bool = False,
                 timeline: list[tuple[float, str]] | None = None, recache: bool = True, one_late: bool = True):
        self.pipeline, self.prompt, self.seed, self.recache = pipeline, check_prompt(prompt), seed, recache
        self.one_late = one_late
        self.timing = Timing(frames=pipeline.run.video.frames)
        self._pending = None
        self._switches = switch_chunks(timeline or [], pipeline.run, pipeline.fps)  # chunk -> prompt
        if self._switches and pipeline.run.stream:
            self.set_prompt(prompt)  # refused, with the reason
        self._progress = progress
        self._chunks = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> VideoChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def set_prompt(self, prompt: str) -> None:
        if self.pipeline.run.stream:
            raise ValueError("the stream-batch sampler cannot change the prompt during a video (its pipeline holds "
                             "several chunks at once); use the sequential sampler (no --stream).")
        self._pending = check_prompt(prompt)

    def _text_kv(self, prompt):
        context = self.pipeline.model.text([prompt])
        return self.pipeline.generator.text_kv(context)

    def _switch(self, chunk: int):
        """The generator asks before each chunk: the new prompt's text K/V, or None."""
        if chunk in self._switches:
            self._pending = self._switches[chunk]
        if self._pending is None:
            return None
        self.prompt, self._pending = self._pending, None
        return self._text_kv(self.prompt)

    def _run(self):
        p, gen, t = self.pipeline, self.pipeline.generator, self.timing
        t_start = self.started_at = time.perf_counter()
        text_kv = jax.block_until_ready(self._text_kv(self.prompt))
        t.text_s = time.perf_counter() - t_start
        h, w = p.run.video.latent_hw
        compile_before = gen.stats.compile_s + p.compile_s
        compiled = lambda: gen.stats.compile_s + p.compile_s - compile_before
        chunks = gen.chunks(text_kv, self.seed, switch=None if p.run.stream else self._switch, recache=self.recache)
        made = ((r.latents, (r.index, self.prompt)) for r in chunks)  # the prompt a chunk was made under
        decode = lambda z, cache: p._decoder(z, cache)(p.vae_state, z, cache)
        bar = _progress(p.run.num_chunks, self._progress)
        last, compiled_then = time.perf_counter(), 0.0
        cache = init_decoder_cache(p.model.vae.cfg, 1, h, w)
        try:
            for (index, prompt), frames in decode_chunks(made, decode, cache, self.one_late):
                now = time.perf_counter()
                if index == 0:
                    t.first_chunk_s = now - t_start - compiled()
                t.chunk_s.append(now - last - (compiled() - compiled_then))
                last, compiled_then = now, compiled()
                bar.update(1)
                yield VideoChunk(index, frames, prompt)
        finally:
            bar.close()
            chunks.close()
        t.compile_s = compiled()
        t.e2e_s = time.perf_counter() - t_start - t.compile_s


def decode_chunks(made, decode, cache, one_late: bool = True):
    """(tag, uint8 frames [t, H, W, 3] on the host) for each (latents, tag) of `made`.

    one_late: chunk k's decode, uint8 conversion and host copy are queued on the device, then chunk k + 1 is asked
    for (which queues chunk k's cache refresh and chunk k + 1's denoising: Generator.chunks yields a chunk before its
    refresh), and only then are chunk k's frames handed out, so that the device never
    waits for the host's copy, the caller's mp4 encoding or the next dispatch. Otherwise, and always for the
    first chunk (time to first frame), a chunk is handed out as soon as it is on the host.
    decode(latents, cache) -> (pixels, cache).
    """
    queued = None
    for n, (latents, tag) in enumerate(made):
        pixels, cache = decode(latents, cache)
        frames = to_uint8_on_device(pixels[0])
        frames.copy_to_host_async()
        if queued is not None:
            yield queued[0], np.asarray(queued[1])
        queued = (tag, frames)
        if not one_late or n == 0:
            yield tag, np.asarray(frames)
            queued = None
    if queued is not None:
        yield queued[0], np.asarray(queued[1])


def chunk_start_seconds(chunk: int, run: RunConfig, fps: float) -> float:
    """When a chunk's first frame plays: latent frame k >= 1 decodes to pixel frames 4k-3 .. 4k."""
    latent = chunk * run.sampling.chunk_frames
    return 0.0 if latent == 0 else (4 * latent - 3) / fps


def switch_chunks(timeline: list[tuple[float, str]], run: RunConfig, fps: float,
                  names: list[str] | None = None) -> dict[int, str]:
    """{chunk: prompt} of prompt switches [(start seconds, prompt), ...] (after the first prompt, which starts at
    0): each takes effect from the first chunk that starts at or after its time. names: how errors call each
    switch (default "switch N")."""
    out, last = {}, 0.0
    length = run.video.frames / fps
    names = names or [f"switch {n}" for n in range(1, len(timeline) + 1)]
    for n, (name, (start, prompt)) in enumerate(zip(names, timeline)):
        try:
            check_prompt(prompt)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if not start > last:
            raise ValueError(f"{name}: the switch at {start} s is not after the one before ({last} s); sort the "
                             "switches and give each its own time.")
        chunk = next((c for c in range(1, run.num_chunks) if chunk_start_seconds(c, run, fps) >= start - 1e-9), None)
        if chunk is None or start >= length:
            raise ValueError(f"{name}: the switch at {start} s is past the last chunk of this {length:.2f} s video; "
                             "make the video longer or switch earlier.")
        if chunk in out:
            raise ValueError(f"{name}: the switch at {start} s falls in the same chunk as the one before (it starts at "
                             f"{chunk_start_seconds(chunk, run, fps):.2f} s); a prompt lasts at least one chunk.")
        out[chunk], last = prompt, start
    return out


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty; describe the video to make.")
    return prompt


class VideoPipeline:
    """Compiles once per (run config, model) and makes any number of videos (the Python API: dfjax.load)."""

    def __init__(self, model: VideoModel, run: RunConfig, plan: HeadPlan | None = None, mesh=None,
                 fps: float = 16.0):
        """mesh: a (data, tensor) jax Mesh this pipeline runs on (dfjax.sharding); None: one device."""
        self.model, self.run, self.fps = model, run, fps
        self.generator = Generator(model.dit, run, plan=plan, mesh=mesh)
        self.vae_graphdef, self.vae_state = nnx.split(model.vae)
        if mesh is not None:
            from dfjax.sharding import put_replicated

            self.vae_state = put_replicated(self.vae_state, mesh)
        h, w = run.video.latent_hw
        f = model.vae.cfg
        want = (run.video.height // f.spatial_factor, run.video.width // f.spatial_factor)
        if want != (h, w):
            raise ValueError(f"the VAE's {f.spatial_factor}x spatial factor does not match the video's latent size.")
        self.compile_s = 0.0
        self._decode = {}

    def _decoder(self, z, cache):
        """The AOT-compiled decode for the cache's variant (first chunk, later chunks); compile is timed."""
        if cache.started not in self._decode:
            t0 = time.perf_counter()
            self._decode[cache.started] = decode_chunk.lower(self.vae_graphdef, self.vae_state, z, cache).compile()
            self.compile_s += time.perf_counter() - t0
        return self._decode[cache.started]

    def stream(self, prompt: str, seed: int = 0, progress: bool = False,
               timeline: list[tuple[float, str]] | None = None, recache: bool = True,
               one_late: bool = True) -> VideoStream:
        """The video's decoded chunks as they are made (see VideoStream). timeline: prompt switches [(start
        seconds, prompt), ...] after `prompt`; recache: recompute the KV cache under each new prompt; one_late:
        overlap each chunk's decode and copy with the next chunk (False: the least latency, for live viewing)."""
        return VideoStream(self, prompt, seed, progress, timeline, recache, one_late)

    def generate(self, prompt: str, seed: int = 0, timeline: list[tuple[float, str]] | None = None,
                 recache: bool = True) -> np.ndarray:
        """The whole video, uint8 [frames, height, width, 3]."""
        return np.concatenate([c.frames for c in self.stream(prompt, seed, timeline=timeline, recache=recache)])

    def make_video(self, prompt: str, seed: int, out: str | Path, fps: float | None = None,
                   progress: bool = False, timeline: list[tuple[float, str]] | None = None,
                   recache: bool = True) -> Timing:
        """Writes an H.264 mp4 as the chunks come (it appears under `out` only when complete); returns the timings."""
        writer = Mp4Writer(out, fps or self.fps)
        try:
            stream = self.stream(prompt, seed, progress, timeline, recache)
            for chunk in stream:
                writer.write(chunk.frames)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        t = stream.timing
        t.write_s = writer.write_s
        t.e2e_s = time.perf_counter() - stream.started_at - t.compile_s  # the mp4 complete
        return t


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="chunk", disable=not enabled, leave=False)
