"""`dfjax serve`: watch a video being made in a browser, and steer it.

One model, loaded and compiled once at start-up, serves one session at a time on its device (or mesh):

    GET  /                    the live page (dfjax/web/: plain HTML and JavaScript, no build step)
    WS   /ws                  a live session: JSON control messages in; JPEG frames and JSON status out
    POST /api/jobs            batch: {"prompt", "seed"?} -> 202 {"id", ...}; the mp4 is made in turn
    GET  /api/jobs/ID         the job's status;  GET /api/jobs/ID/video: the mp4 once done;  DELETE: cancel
    GET  /health              200 when ready (503 while loading and compiling), with the queue and the model
    GET  /metrics             Prometheus text: time to first frame, delivered FPS, deadline misses, queue
                              length, compile events, ...

Live sessions and batch jobs wait in one bounded queue (their position is sent to them); past its size a client
gets a "busy" answer. Frames go out as soon as each chunk is decoded, paced to the video's frame rate
("realtime", the default: frame n is sent at t0 + n / fps, so the browser draws each as it arrives) or as fast as
the client reads them ("fast"). The model runs at most `lead_chunks` chunks ahead of what has been sent, so a new
prompt shows within that many chunks and a client that goes away frees the device within one chunk.

The protocol (docs/serve.md has it whole): the client sends {"type": "start", "prompt", "seed"?, "pace"?},
{"type": "switch", "prompt"}, {"type": "stop"} and {"type": "ping"}; the server sends "hello", "queued", "started",
"chunk", "switched", "done", "error", "busy", "pong" and "ready" JSON messages, and one binary message per frame: an
8-byte header (frame index, chunk index: big-endian uint32) followed by the frame as a JPEG.

Compiles: everything compiles in the warm-up video at start-up. With online Dummy Forcing the warm-up video's plan
is then fixed for every session (a new prompt would otherwise give a new plan, so a new compile), and the warm-up
layout's steps without the score probe are compiled by part of a second warm-up video. Every XLA compile of the
process is counted (jax.monitoring) in /metrics as dfjax_compiles_total{phase="startup"|"serving"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import math
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

PACES = ("realtime", "fast")
FRAME_HEADER = struct.Struct(">II")  # frame index in the video, chunk index
SEED_MAX = 2**31 - 1
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ------------------------------------------------------------------------------------------------ settings

@dataclass(frozen=True)
class ServeConfig:
    """What a server allows its clients, and how it runs (the defaults are `dfjax serve`'s)."""

    host: str = "127.0.0.1"
    port: int = 8000
    queue_size: int = 4  # sessions and jobs waiting for the device (the running one apart)
    max_prompt_chars: int = 2000
    max_message_bytes: int = 64 * 1024  # larger messages are answered with an error; the session goes on
    transport_max_bytes: int = 4 * 2**20  # larger WebSocket messages close the connection (code 1009)
    messages_per_second: float = 10.0  # per connection, a token bucket of `message_burst`
    message_burst: int = 30
    jobs_per_second: float = 1.0  # POST /api/jobs per client address, a bucket of `jobs_burst`
    jobs_burst: int = 10
    max_clients: int = 32  # open WebSocket connections
    max_jobs: int = 32  # finished batch jobs kept (their mp4s); the oldest go first
    job_ttl_s: float = 3600.0
    lead_chunks: int = 2  # chunks the model may be ahead of what has been sent
    jpeg_quality: int = 90
    send_timeout_s: float = 30.0  # a client that reads nothing for this long is disconnected
    allow_origins: tuple[str, ...] = ()  # browser origins allowed besides the page's own
    warmup_prompt: str = "a cat walking through a garden"
    default_seed: int = 0
    examples: tuple[str, ...] = ()  # prompts the page offers
    model_name: str = "model"

    def __post_init__(self):
        for name in ("queue_size", "max_prompt_chars", "max_message_bytes", "message_burst", "jobs_burst",
                     "max_clients", "max_jobs", "lead_chunks"):
            if getattr(self, name) < (0 if name == "queue_size" else 1):
                raise ValueError(f"{name.replace('_', '-')} must be >= {0 if name == 'queue_size' else 1}, "
                                 f"got {getattr(self, name)}.")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}.")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg quality must be in 1..100, got {self.jpeg_quality}.")
        if not self.warmup_prompt.strip():
            raise ValueError("the warm-up prompt is empty.")


# ------------------------------------------------------------------------------------------------ protocol

class ProtocolError(ValueError):
    """A client message the server refuses: sent back as {"type": "error", "code", "message"}."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


MESSAGE_FIELDS = {"start": {"prompt", "seed", "pace"}, "switch": {"prompt"}, "stop": set(), "ping": {"id"}}


def check_prompt(value, limit: int) -> str:
    if not isinstance(value, str):
        raise ProtocolError("bad_field", "prompt must be a string.")
    if not value.strip():
        raise ProtocolError("bad_field", "the prompt is empty; describe the video to make.")
    if len(value) > limit:
        raise ProtocolError("prompt_too_long", f"the prompt is {len(value)} characters; the most is {limit}.")
    return value


def check_seed(value, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ProtocolError("bad_field", f"seed must be an integer in 0..{SEED_MAX}.")
    return value


def parse_message(raw, cfg: ServeConfig, can_switch: bool = True) -> dict:
    """A client's text message -> a checked dict with its "type"; ProtocolError for anything else."""
    if raw is None:
        raise ProtocolError("binary_not_accepted", "send JSON text messages; binary messages are not accepted.")
    if len(raw) > cfg.max_message_bytes or len(raw.encode("utf-8", "surrogatepass")) > cfg.max_message_bytes:
        raise ProtocolError("too_large", f"a message may be at most {cfg.max_message_bytes} bytes; this one has "
                                         f"{len(raw.encode('utf-8', 'surrogatepass'))}.")
    try:
        msg = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError("bad_json", f"not JSON ({getattr(e, 'msg', e)}); send one JSON object per message.")
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", "send a JSON object such as {\"type\": \"start\", \"prompt\": \"...\"}.")
    kind = msg.get("type")
    if kind not in MESSAGE_FIELDS:
        raise ProtocolError("unknown_type", f"unknown message type {str(kind)[:40]!r}; the types are "
                                            f"{sorted(MESSAGE_FIELDS)}.")
    unknown = sorted(set(msg) - MESSAGE_FIELDS[kind] - {"type"})
    if unknown:
        raise ProtocolError("bad_field", f"{kind} takes {sorted(MESSAGE_FIELDS[kind]) or 'no fields'}; unknown: "
                                         f"{[str(u)[:40] for u in unknown[:5]]}.")
    out = {"type": kind}
    if kind == "start":
        out["prompt"] = check_prompt(msg.get("prompt"), cfg.max_prompt_chars)
        out["seed"] = check_seed(msg.get("seed"), cfg.default_seed)
        pace = msg.get("pace", "realtime")
        if pace not in PACES:
            raise ProtocolError("bad_field", f"pace must be one of {list(PACES)}.")
        out["pace"] = pace
    elif kind == "switch":
        if not can_switch:
            raise ProtocolError("cannot_switch", "this server runs the stream-batch sampler, which cannot change "
                                                 "the prompt during a video (its pipeline holds several chunks at "
                                                 "once); stop and start with the new prompt.")
        out["prompt"] = check_prompt(msg.get("prompt"), cfg.max_prompt_chars)
    elif kind == "ping":
        ident = msg.get("id")
        if ident is not None and not (isinstance(ident, (int, float)) and not isinstance(ident, bool)
                                      or isinstance(ident, str) and len(ident) <= 64):
            raise ProtocolError("bad_field", "ping id must be a number or a string of at most 64 characters.")
        out["id"] = ident
    return out


class TokenBucket:
    """`rate` events a second on average, `burst` at once."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.t = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Pacer:
    """The real-time playback clock of a session: frame n is due at t0 + (n - n0) / fps. A frame that is not ready
    half a frame after it was due is late (playback would stall there): the clock restarts from it."""

    def __init__(self, fps: float, realtime: bool):
        self.fps, self.realtime = fps, realtime
        self.t0, self.n0 = None, 0

    def wait(self, n: int, now: float) -> tuple[float, bool]:
        """(seconds to wait before sending frame n, whether it is late)."""
        if not self.realtime:
            return 0.0, False
        if self.t0 is None:
            self.t0, self.n0 = now, n
            return 0.0, False
        due = self.t0 + (n - self.n0) / self.fps
        if now > due + 0.5 / self.fps:
            self.t0, self.n0 = now, n
            return 0.0, True
        return max(0.0, due - now), False


def encode_jpegs(frames: np.ndarray, quality: int) -> list[bytes]:
    from PIL import Image

    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------------------ metrics

class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers may live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        r = self.registry = CollectorRegistry()
        seconds = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
        self.ttff = Histogram("dfjax_time_to_first_frame_seconds", "From a session's start message to its first "
                              "frame handed to the socket (queue wait included)", buckets=seconds, registry=r)
        self.queue_wait = Histogram("dfjax_queue_wait_seconds", "From a session's or job's submission to the device",
                                    buckets=seconds, registry=r)
        self.chunk_s = Histogram("dfjax_chunk_seconds", "Time to make one chunk on the device (diffusion and VAE "
                                 "decode; the first chunk includes text encoding)",
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4), registry=r)
        self.release_s = Histogram("dfjax_release_seconds", "From a stop, a disconnect or a cancel to the device "
                                   "free", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8), registry=r)
        self.fps = Gauge("dfjax_delivered_fps", "Frames per second delivered to the client of the current or last "
                         "live session", registry=r)
        self.frames = Counter("dfjax_frames_sent", "Frames sent to live clients", registry=r)
        self.chunks = Counter("dfjax_chunks", "Chunks made", ["kind"], registry=r)
        self.misses = Counter("dfjax_deadline_misses", "Chunks of real-time sessions whose frames were not ready "
                              "when playback reached them", registry=r)
        self.queue = Gauge("dfjax_queue_length", "Sessions and jobs waiting for the device", registry=r)
        self.busy = Gauge("dfjax_device_busy", "1 while a session or job runs on the device", registry=r)
        self.clients = Gauge("dfjax_connected_clients", "Open WebSocket connections", registry=r)
        self.sessions = Counter("dfjax_sessions", "Sessions and jobs run, by outcome", ["kind", "outcome"],
                                registry=r)
        self.rejected = Counter("dfjax_rejected", "Messages and requests refused, by reason", ["reason"], registry=r)
        self.compiles = Counter("dfjax_compiles", "XLA compiles in this process (jax.monitoring); serving: after the "
                                "start-up warm-up", ["phase"], registry=r)
        self.compile_s = Counter("dfjax_compile_seconds", "Seconds of XLA compiles", ["phase"], registry=r)
        self.ready = Gauge("dfjax_ready", "1 once the model is loaded and compiled", registry=r)
        self.model = Info("dfjax_model", "The model and run this server serves", registry=r)
        for phase in ("startup", "serving"):
            self.compiles.labels(phase)
            self.compile_s.labels(phase)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ------------------------------------------------------------------------------------------------ work on the device

class Busy(Exception):
    """The queue is full."""


class Work:
    """A live session or a batch job: what the device worker runs, one at a time."""

    kind = "work"

    def __init__(self, prompt: str, seed: int):
        self.id = uuid.uuid4().hex
        self.prompt, self.seed = prompt, seed
        self.cancelled = threading.Event()
        self.cancel_reason: str | None = None
        self.cancelled_at: float | None = None
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason, self.cancelled_at = reason, time.perf_counter()
            self.cancelled.set()

    def position(self, n: int) -> None:
        """Called (by the worker) when the number of works ahead of this one changes; 0: it runs now."""


class LiveSession(Work):
    """A browser's session: the worker posts events to the connection's event loop, chunk by chunk."""

    kind = "live"

    def __init__(self, prompt, seed, pace, loop: asyncio.AbstractEventLoop, lead: int, encode: Callable):
        super().__init__(prompt, seed)
        self.pace, self.loop, self.encode = pace, loop, encode
        self.events: asyncio.Queue = asyncio.Queue()
        self.permits = threading.Semaphore(lead)  # chunks the model may be ahead of the socket
        self.unsent = 0  # chunks made and not yet sent (the loop's thread only)
        self.requested_at = time.perf_counter()  # the start message
        self._position = 0
        self._switch_lock = threading.Lock()
        self._switch: str | None = None

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self._arrive, event)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def _arrive(self, event) -> None:  # on the loop's thread
        if event[0] == "chunk":  # start encoding at once, while earlier frames are being paced out
            self.unsent += 1
            event = (*event, self.encode(event[1].frames))
        self.events.put_nowait(event)

    def position(self, n: int) -> None:
        if n > 0 and n != self._position:
            self._position = n
            self.post("position", n)

    def request_switch(self, prompt: str) -> None:
        with self._switch_lock:
            self._switch = prompt

    def take_switch(self) -> str | None:
        with self._switch_lock:
            prompt, self._switch = self._switch, None
            return prompt

    def wait_permit(self) -> bool:
        """Blocks until the model may make the next chunk; False once the session is cancelled."""
        while not self.cancelled.is_set():
            if self.permits.acquire(timeout=0.05):
                if self.cancelled.is_set():
                    return False
                return True
        return False


class BatchJob(Work):
    """A prompt -> an mp4 in the server's own folder (its name is the job's random id)."""

    kind = "batch"

    def __init__(self, prompt, seed, path: Path):
        super().__init__(prompt, seed)
        self.path = path
        self.status = "queued"  # queued, running, done, failed, cancelled
        self.queue_position = 0
        self.chunks_done = 0
        self.error: str | None = None
        self.finished_at: float | None = None
        self.timing: dict | None = None

    def position(self, n: int) -> None:
        self.queue_position = n


class Engine:
    """Owns the pipeline and the one thread that uses the device: it loads and compiles the model, then runs the
    queued sessions and jobs one at a time."""

    def __init__(self, make_pipeline: Callable[[], object], cfg: ServeConfig, metrics: Metrics,
                 log: Callable[[str], None] = lambda s: None):
        self.make_pipeline, self.cfg, self.metrics, self.log = make_pipeline, cfg, metrics, log
        self.pipe = None
        self.state, self.error = "starting", None
        self.ready_event = threading.Event()
        self.on_ready: Callable[[], None] = lambda: None
        self.on_failed: Callable[[], None] = lambda: None
        self._cond = threading.Condition()
        self._waiting: deque[Work] = deque()
        self._current: Work | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.phase = "startup"
        self.compile_events = 0  # every XLA compile of the process while this engine runs
        self.compiles = {"startup": 0, "serving": 0}
        self.startup_s = 0.0
        self._listener = self._on_jax_event
        self.run_info: dict = {}

    # -- compiles ---------------------------------------------------------------------------------
    def _on_jax_event(self, event: str, duration: float, **kwargs) -> None:
        # a program compiled by XLA, or read back from JAX's persistent compilation cache (a compile all the same)
        if event.endswith(("backend_compile_duration", "compilation_cache/cache_retrieval_time_sec")):
            self.compile_events += 1
            self.compiles[self.phase] += 1
            self.metrics.compiles.labels(self.phase).inc()
            self.metrics.compile_s.labels(self.phase).inc(duration)

    # -- life -------------------------------------------------------------------------------------
    def start(self) -> None:
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listener)
        self._thread = threading.Thread(target=self._main, name="dfjax-device", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        import jax

        with self._cond:
            self._stopping = True
            for w in self._waiting:
                w.cancel("shutdown")
            if self._current is not None:
                self._current.cancel("shutdown")
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with contextlib.suppress(Exception):
            jax.monitoring.unregister_event_duration_listener(self._listener)

    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            self.pipe = self.make_pipeline()
            self.describe()
            load_s = time.perf_counter() - t0
            fp8 = "; DiT linears in fp8 e4m3 (docs/fp8.md)" if self.pipe.model.dit.cfg.fp8 else ""
            self.log(f"loaded in {load_s:.1f} s{fp8}; compiling (a warm-up video)")
            self.warm_up()
        except BaseException as e:  # reported by serve(); the server stops
            self.state, self.error = "failed", " ".join(str(e).split()) or type(e).__name__
            self.ready_event.set()
            self.on_failed()
            return
        self.startup_s = time.perf_counter() - t0
        self.phase, self.state = "serving", "ready"
        self.metrics.ready.set(1)
        self.ready_event.set()
        self.on_ready()
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                work = self._current = self._waiting.popleft()
                self._announce()
            self.metrics.busy.set(1)
            work.started_at = time.perf_counter()
            self.metrics.queue_wait.observe(work.started_at - work.submitted_at)
            outcome = "error"
            try:
                outcome = self._run_live(work) if isinstance(work, LiveSession) else self._run_job(work)
            except Exception as e:  # one session's failure never stops the server
                msg = " ".join(str(e).split()) or type(e).__name__
                self.log(f"{work.kind} {work.id[:8]} failed: {msg}")
                if isinstance(work, BatchJob):
                    work.status, work.error, work.finished_at = "failed", msg, time.time()
            finally:
                if work.cancelled_at is not None:
                    self.metrics.release_s.observe(time.perf_counter() - work.cancelled_at)
                self.metrics.sessions.labels(work.kind, outcome).inc()
                with self._cond:
                    self._current = None
                self.metrics.busy.set(0)

    def describe(self, run=None, fps: float | None = None) -> None:
        """What clients are told about the video (known from the run config before the weights load)."""
        run = run or self.pipe.run
        fps = fps or self.pipe.fps
        v, cf = run.video, run.sampling.chunk_frames
        chunk_frames = [(cf - 1) * 4 + 1] + [cf * 4] * (run.num_chunks - 1)  # the causal VAE: 4k+1, then 4k
        self.run_info = {
            "model": self.cfg.model_name, "width": v.width, "height": v.height, "frames": v.frames,
            "fps": fps, "chunks": run.num_chunks, "chunk_frames": chunk_frames,
            "dummy_forcing": run.dummy is not None, "sampler": "stream batch" if run.stream else "sequential",
            "can_switch": not run.stream,
        }
        self.metrics.model.info({k: str(val) for k, val in self.run_info.items() if k != "chunk_frames"})

    def warm_up(self) -> None:
        """Compiles everything with one whole video. With online Dummy Forcing its plan is then fixed for every
        session (a new prompt would give a new plan, so new compiles), and a second video up to the plan's first
        chunk compiles the warm-up layout's steps without the score probe. The last of these videos switches its
        prompt (before chunk 1, and before the plan's first chunk), so a switch compiles nothing later either."""
        gen, run = self.pipe.generator, self.pipe.run
        t0 = time.perf_counter()
        online = gen.dummy is not None and gen.dummy.plan is None
        self._warm_video(run.num_chunks, switch=not online)
        if online and gen.stats.last_plan is not None:
            gen.use_plan(gen.stats.last_plan)
            self._warm_video(run.num_chunks if run.stream else min(run.num_chunks, gen.dummy.cfg.ar_start + 2),
                             switch=True)
            self.log(f"Dummy Forcing plan fixed from the warm-up prompt ({gen.stats.last_plan.num_dummy} dummy "
                     "heads) for every session; for a calibrated one pass --profile (dfjax calibrate)")
        self.log(f"warm-up done in {time.perf_counter() - t0:.1f} s ({self.compile_events} compiles)")

    def _warm_video(self, chunks: int, switch: bool) -> None:
        pipe, cfg = self.pipe, self.cfg
        other = next((p for p in cfg.examples if p != cfg.warmup_prompt), f"{cfg.warmup_prompt}, seen closer")
        at = {1} if pipe.generator.dummy is None else {1, pipe.generator.dummy.cfg.ar_start + 1}
        stream = pipe.stream(cfg.warmup_prompt, cfg.default_seed)
        try:
            for i, _chunk in zip(range(chunks), stream):
                if switch and not pipe.run.stream and i + 1 in at and i + 1 < chunks:
                    stream.set_prompt(other if i == 0 else cfg.warmup_prompt)
        finally:
            stream.close()

    # -- the queue --------------------------------------------------------------------------------
    def submit(self, work: Work) -> int:
        """Queues work; returns its place in the queue (0: it runs at once). Busy when the queue is full."""
        with self._cond:
            if self._stopping:
                raise Busy("the server is shutting down.")
            idle = self._current is None and not self._waiting and self.state == "ready"
            if not idle and len(self._waiting) >= self.cfg.queue_size:
                raise Busy(f"one session is running and {len(self._waiting)} are waiting, the most this server "
                           "queues; try again in a while.")
            self._waiting.append(work)
            if not idle:
                self._announce()
            self._cond.notify_all()
            return 0 if idle else len(self._waiting)  # its place in the queue, 1: next

    def cancel(self, work: Work, reason: str) -> bool:
        """Stops work: removed from the queue (True) or, running, stopped at its next chunk (False)."""
        with self._cond:
            work.cancel(reason)
            if work in self._waiting:
                self._waiting.remove(work)
                self._announce()
                self.metrics.sessions.labels(work.kind, reason).inc()
                if isinstance(work, LiveSession):
                    work.post("generated", 0)
                return True
            return False

    def _announce(self) -> None:  # under the lock
        self.metrics.queue.set(len(self._waiting))
        for i, w in enumerate(self._waiting):
            w.position(i + 1)

    def status(self) -> dict:
        with self._cond:
            return {"busy": self._current is not None, "queue": len(self._waiting)}

    # -- running ----------------------------------------------------------------------------------
    def _run_live(self, s: LiveSession) -> str:
        if s.cancelled.is_set():
            s.post("generated", 0)
            return s.cancel_reason or "stopped"
        pipe = self.pipe
        compiles = self.compile_events
        s.prompt = s.take_switch() or s.prompt  # switched while it waited: it starts with the new prompt
        stream = pipe.stream(s.prompt, s.seed, one_late=False)  # paced to playback: the least latency
        s.post("started", time.perf_counter() - s.submitted_at)
        made = 0
        try:
            chunks = iter(stream)
            while s.wait_permit():
                new = s.take_switch()
                if new is not None:
                    stream.set_prompt(new)
                    s.post("switched", new, max(made, 1))
                t0 = time.perf_counter()
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                self.metrics.chunk_s.observe(time.perf_counter() - t0)
                self.metrics.chunks.labels("live").inc()
                s.post("chunk", chunk, time.perf_counter() - t0)
                made += 1
        except Exception as e:
            s.post("error", "generation_failed", " ".join(str(e).split()) or type(e).__name__)
            raise
        finally:
            stream.close()
            s.post("generated", made, self.compile_events - compiles)
        return s.cancel_reason or "finished"

    def _run_job(self, job: BatchJob) -> str:
        from dfjax.video import Mp4Writer

        if job.cancelled.is_set():
            return job.cancel_reason or "cancelled"
        job.status = "running"
        writer = Mp4Writer(job.path, self.pipe.fps)
        stream = self.pipe.stream(job.prompt, job.seed)
        try:
            for chunk in stream:
                writer.write(chunk.frames)
                job.chunks_done += 1
                self.metrics.chunks.labels("batch").inc()
                if job.cancelled.is_set():
                    break
            if job.cancelled.is_set():
                writer.abort()
                job.status, job.finished_at = "cancelled", time.time()
                return job.cancel_reason or "cancelled"
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            stream.close()
        job.timing = {k: round(v, 4) for k, v in stream.timing.as_dict().items()
                      if isinstance(v, float) and not math.isnan(v)}
        job.status, job.finished_at = "done", time.time()
        return "finished"


# ------------------------------------------------------------------------------------------------ the web side

class Connection:
    """One WebSocket client: its messages, its live session, every send through one lock."""

    def __init__(self, server: "Server", ws):
        self.server, self.ws = server, ws
        self.lock = asyncio.Lock()
        self.bucket = TokenBucket(server.cfg.messages_per_second, server.cfg.message_burst)
        self.session: LiveSession | None = None
        self.task: asyncio.Task | None = None
        self.closed = False

    async def send(self, obj: dict | bytes) -> None:
        if self.closed:
            raise ConnectionError("closed")
        async with self.lock:
            if isinstance(obj, bytes):
                coro = self.ws.send_bytes(obj)
            else:
                coro = self.ws.send_text(json.dumps(obj))
            try:
                await asyncio.wait_for(coro, self.server.cfg.send_timeout_s)
            except asyncio.TimeoutError:
                self.closed = True
                raise ConnectionError("the client reads nothing") from None
            except Exception as e:  # the connection went away under us
                self.closed = True
                raise ConnectionError(str(e)) from None

    async def error(self, code: str, message: str, **extra) -> None:
        self.server.metrics.rejected.labels(code).inc()
        await self.send({"type": "error", "code": code, "message": message, **extra})

    async def handle(self, event: dict) -> None:
        srv = self.server
        if not self.bucket.take():
            await self.error("rate_limited", f"more than {srv.cfg.message_burst} messages at once or "
                                             f"{srv.cfg.messages_per_second:g} a second; this one was dropped.")
            return
        try:
            msg = parse_message(event.get("text"), srv.cfg, srv.can_switch)
        except ProtocolError as e:
            await self.error(e.code, e.message)
            return
        kind = msg["type"]
        if kind == "ping":
            await self.send({"type": "pong", "id": msg["id"], "t": time.time()})
        elif kind == "start":
            await self.start(msg)
        elif kind == "switch":
            s = self.session
            if s is None:
                await self.error("not_started", "no session is running; send start first.")
                return
            s.request_switch(msg["prompt"])
            await self.send({"type": "switching", "prompt": msg["prompt"]})
            await self.notes(msg["prompt"])
        elif kind == "stop":
            if self.session is None:
                await self.error("not_started", "no session is running.")
                return
            srv.engine.cancel(self.session, "stopped")

    async def notes(self, prompt: str) -> None:
        for text in self.server.notes(prompt):
            await self.send({"type": "note", "message": text})

    async def start(self, msg: dict) -> None:
        srv = self.server
        if self.session is not None:
            await self.error("already_started", "a session is running on this connection; send stop first.")
            return
        if srv.engine.state == "failed":
            await self.error("unavailable", f"the model failed to load: {srv.engine.error}")
            return
        s = LiveSession(msg["prompt"], msg["seed"], msg["pace"], asyncio.get_running_loop(), srv.cfg.lead_chunks,
                        srv.encode)
        try:
            srv.engine.submit(s)
        except Busy as e:
            srv.metrics.rejected.labels("busy").inc()
            await self.send({"type": "busy", "message": f"the server is busy: {e}",
                             "queue": srv.engine.status()["queue"]})
            return
        self.session = s
        self.task = asyncio.create_task(self.run_session(s))  # also sends "queued" while it waits
        await self.notes(msg["prompt"])

    async def run_session(self, s: LiveSession) -> None:
        """Sends what the device worker posts: status, then each chunk's frames (paced), then "done"."""
        srv, info = self.server, self.server.engine.run_info
        pacer = Pacer(info["fps"], s.pace == "realtime")
        sent, misses, first_at, last_at, compiles, made = 0, 0, None, None, 0, 0
        frame_index, reason = 0, None
        try:
            while True:
                event = await s.events.get()
                kind = event[0]
                if kind == "position":
                    await self.send({"type": "queued", "position": event[1]})
                elif kind == "started":
                    await self.send({"type": "started", "session": s.id, "prompt": s.prompt, "seed": s.seed,
                                     "pace": s.pace, "queue_wait_s": round(event[1], 4), **info})
                elif kind == "switched":
                    await self.send({"type": "switched", "prompt": event[1], "from_chunk": event[2]})
                elif kind == "error":
                    await self.send({"type": "error", "code": event[1], "message": event[2]})
                elif kind == "generated":
                    made = event[1]
                    compiles = event[2] if len(event) > 2 else 0
                    break
                elif kind == "chunk":
                    chunk, made_s, encoded = event[1], event[2], event[3]
                    try:
                        jpegs = await encoded
                        if s.cancelled.is_set():
                            continue
                        late = False
                        for j, jpeg in enumerate(jpegs):
                            if s.cancelled.is_set():
                                break
                            loop_now = time.perf_counter()
                            delay, frame_late = pacer.wait(frame_index, loop_now)
                            late |= frame_late
                            if delay:
                                await asyncio.sleep(delay)
                            if j == 0:
                                await self.send({"type": "chunk", "index": chunk.index, "first_frame": frame_index,
                                                 "frames": len(jpegs), "prompt": chunk.prompt,
                                                 "made_s": round(made_s, 4), "behind": s.unsent - 1, "late": late})
                            await self.send(FRAME_HEADER.pack(frame_index, chunk.index) + jpeg)
                            last_at = time.perf_counter()
                            if first_at is None:
                                first_at = last_at
                                srv.metrics.ttff.observe(first_at - s.requested_at)
                            frame_index += 1
                            sent += 1
                            srv.metrics.frames.inc()
                        if late:
                            misses += 1
                            srv.metrics.misses.inc()
                        if first_at is not None and last_at > first_at:
                            srv.metrics.fps.set((sent - 1) / (last_at - first_at))
                    finally:
                        s.unsent -= 1
                        s.permits.release()
            reason = s.cancel_reason or "finished"
            fps = (sent - 1) / (last_at - first_at) if first_at is not None and last_at > first_at else None
            await self.send({
                "type": "done", "session": s.id, "reason": reason, "frames": sent, "chunks": made,
                "ttff_s": None if first_at is None else round(first_at - s.requested_at, 4),
                "fps": None if fps is None else round(fps, 3), "deadline_misses": misses if s.pace == "realtime"
                else None, "compiles": compiles, "seconds": round(time.perf_counter() - s.requested_at, 3)})
        except ConnectionError:  # gone, or reads nothing: the session stops, and so does the connection
            srv.engine.cancel(s, "disconnected")
            with contextlib.suppress(Exception):
                await self.ws.close(code=1008)
        finally:
            if self.session is s:
                self.session = None

    async def end(self) -> None:
        """The client went away: its session stops (queued: at once; running: before the next chunk)."""
        self.closed = True
        s = self.session
        if s is not None:
            self.server.engine.cancel(s, "disconnected")
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


def _origin_host(origin: str) -> str | None:
    m = re.match(r"^[a-z][a-z0-9+.-]*://([^/]+)$", origin.strip().lower())
    return m.group(1) if m else None


class Server:
    """The Starlette app around an Engine (build with make_app; serve() runs it with uvicorn)."""

    def __init__(self, make_pipeline: Callable[[], object], cfg: ServeConfig,
                 notes: Callable[[str], list[str]] | None = None, log: Callable[[str], None] | None = None,
                 run=None, fps: float | None = None):
        """run, fps: the RunConfig and frame rate make_pipeline will give, to describe the video to clients
        while it loads (None: described once loaded)."""
        self.cfg = cfg
        self.metrics = Metrics()
        self.log = log or (lambda text: print(f"dfjax serve: {text}", file=sys.stderr, flush=True))
        self.engine = Engine(make_pipeline, cfg, self.metrics, self.log)
        if run is not None:
            self.engine.describe(run, fps)
        self.notes = notes or (lambda prompt: [])
        self.connections: set[Connection] = set()
        self.jobs: dict[str, BatchJob] = {}
        self.job_buckets: dict[str, TokenBucket] = {}
        self.jobs_dir: Path | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = time.time()
        self.uvicorn = None  # set by serve(): stopped when the model fails to load
        self._page = {name: (Path(__file__).parent / "web" / name).read_bytes() for name in ("index.html", "app.js")}

    @property
    def can_switch(self) -> bool:
        return self.engine.run_info.get("can_switch", True)

    def encode(self, frames: np.ndarray) -> asyncio.Future:
        return self.loop.run_in_executor(self._pool, encode_jpegs, frames, self.cfg.jpeg_quality)

    # -- life -------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.loop = asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="dfjax-jpeg")
        self.jobs_dir = Path(tempfile.mkdtemp(prefix="dfjax-serve-"))
        self.engine.on_ready = lambda: self.loop.call_soon_threadsafe(self._ready)
        self.engine.on_failed = lambda: self.loop.call_soon_threadsafe(self._failed)
        self.engine.start()
        try:
            yield
        finally:
            await self.loop.run_in_executor(None, self.engine.shutdown)
            self._pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(self.jobs_dir, ignore_errors=True)

    def _ready(self) -> None:
        e = self.engine
        self.log(f"ready on {self.url} ({e.run_info['width']}x{e.run_info['height']}, {e.run_info['frames']} frames "
                 f"at {e.run_info['fps']:g} fps; start-up {e.startup_s:.1f} s, {e.compile_events} compiles)")
        for conn in list(self.connections):
            asyncio.ensure_future(self._quiet(conn.send({"type": "ready", **self.hello()})))

    def _failed(self) -> None:
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True

    @staticmethod
    async def _quiet(coro) -> None:
        with contextlib.suppress(Exception):
            await coro

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        return f"http://{host}:{self.cfg.port}/"

    def hello(self) -> dict:
        c = self.cfg
        return {"type": "hello", "ready": self.engine.state == "ready", "state": self.engine.state,
                **self.engine.run_info, "paces": list(PACES), "default_seed": c.default_seed,
                "examples": list(c.examples),
                "limits": {"max_prompt_chars": c.max_prompt_chars, "max_message_bytes": c.max_message_bytes,
                           "messages_per_second": c.messages_per_second, "message_burst": c.message_burst,
                           "queue_size": c.queue_size, "lead_chunks": c.lead_chunks}}

    def origin_allowed(self, headers) -> bool:
        """Browsers send Origin; a page of another site must not drive this server from a visitor's browser."""
        origin = headers.get("origin")
        if origin is None:  # not a browser
            return True
        if origin in self.cfg.allow_origins or "*" in self.cfg.allow_origins:
            return True
        return _origin_host(origin) is not None and _origin_host(origin) == headers.get("host", "").lower()

    # -- routes -----------------------------------------------------------------------------------
    def make_app(self):
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        from starlette.routing import Route, WebSocketRoute

        middleware = []
        if self.cfg.host in LOOPBACK:  # DNS rebinding: a page on another name must not reach a local server
            middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK)))
        routes = [Route("/", self.page), Route("/app.js", self.script), Route("/favicon.ico", self.favicon),
                  Route("/health", self.health), Route("/metrics", self.metrics_page),
                  Route("/api/jobs", self.submit_job, methods=["POST"]),
                  Route("/api/jobs/{job_id}", self.job_status, methods=["GET", "DELETE"]),
                  Route("/api/jobs/{job_id}/video", self.job_video), WebSocketRoute("/ws", self.websocket)]
        return Starlette(routes=routes, middleware=middleware, lifespan=self.lifespan)

    SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                        "Cache-Control": "no-cache"}

    async def page(self, request):
        from starlette.responses import Response

        csp = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self' ws: wss:; style-src 'self' "
               "'unsafe-inline'; script-src 'self'; frame-ancestors 'none'")
        return Response(self._page["index.html"], media_type="text/html; charset=utf-8",
                        headers={**self.SECURITY_HEADERS, "Content-Security-Policy": csp})

    async def script(self, request):
        from starlette.responses import Response

        return Response(self._page["app.js"], media_type="text/javascript; charset=utf-8",
                        headers=self.SECURITY_HEADERS)

    async def favicon(self, request):
        from starlette.responses import Response

        return Response(status_code=204)

    async def health(self, request):
        from starlette.responses import JSONResponse

        e = self.engine
        body = {"status": {"ready": "ok"}.get(e.state, e.state), "ready": e.state == "ready", **e.status(),
                "clients": len(self.connections), "compiles": dict(e.compiles),
                "uptime_s": round(time.time() - self.started, 1), **e.run_info}
        if e.error:
            body["error"] = e.error
        return JSONResponse(body, status_code=200 if e.state == "ready" else 503)

    async def metrics_page(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST
        from starlette.responses import Response

        return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    # -- batch jobs -------------------------------------------------------------------------------
    @staticmethod
    def _problem(status: int, code: str, message: str, headers=None):
        from starlette.responses import JSONResponse

        return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)

    def _job_view(self, job: BatchJob) -> dict:
        view = {"id": job.id, "status": job.status, "prompt": job.prompt, "seed": job.seed,
                "chunks_done": job.chunks_done, "chunks": self.engine.run_info.get("chunks"),
                "status_url": f"/api/jobs/{job.id}", "video_url": f"/api/jobs/{job.id}/video"}
        if job.status == "queued":
            view["position"] = job.queue_position
        if job.error:
            view["error"] = job.error
        if job.timing:
            view["timing"] = job.timing
        return view

    def _expire_jobs(self) -> None:
        now = time.time()
        finished = sorted((j for j in self.jobs.values() if j.finished_at is not None), key=lambda j: j.finished_at)
        drop = [j for j in finished if now - j.finished_at > self.cfg.job_ttl_s]
        drop += [j for j in finished if j not in drop][:max(0, len(finished) - len(drop) - self.cfg.max_jobs)]
        for j in drop:
            self.jobs.pop(j.id, None)
            j.path.unlink(missing_ok=True)

    async def submit_job(self, request):
        from starlette.responses import JSONResponse

        client = request.client.host if request.client else "?"
        bucket = self.job_buckets.get(client)
        if bucket is None:
            if len(self.job_buckets) > 1024:
                self.job_buckets.clear()
            bucket = self.job_buckets[client] = TokenBucket(self.cfg.jobs_per_second, self.cfg.jobs_burst)
        if not bucket.take():
            self.metrics.rejected.labels("rate_limited").inc()
            return self._problem(429, "rate_limited", f"more than {self.cfg.jobs_burst} jobs at once or "
                                 f"{self.cfg.jobs_per_second:g} a second from one client.", {"Retry-After": "2"})
        limit = self.cfg.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.metrics.rejected.labels("too_large").inc()
            return self._problem(413, "too_large", f"a request body may be at most {limit} bytes.")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                self.metrics.rejected.labels("too_large").inc()
                return self._problem(413, "too_large", f"a request body may be at most {limit} bytes.")
        try:
            text = body.decode("utf-8")
            msg = json.loads(text)
            if not isinstance(msg, dict):
                raise ProtocolError("bad_json", "send a JSON object {\"prompt\": ..., \"seed\": ...}.")
            unknown = sorted(set(msg) - {"prompt", "seed"})
            if unknown:
                raise ProtocolError("bad_field", f"a job takes prompt and seed; unknown: {unknown[:5]}.")
            prompt = check_prompt(msg.get("prompt"), self.cfg.max_prompt_chars)
            seed = check_seed(msg.get("seed"), self.cfg.default_seed)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            self.metrics.rejected.labels("bad_json").inc()
            return self._problem(400, "bad_json", "the body must be a JSON object {\"prompt\": ..., \"seed\": ...}.")
        except ProtocolError as e:
            self.metrics.rejected.labels(e.code).inc()
            return self._problem(400, e.code, e.message)
        if self.engine.state == "failed":
            return self._problem(503, "unavailable", f"the model failed to load: {self.engine.error}")
        self._expire_jobs()
        job = BatchJob(prompt, seed, self.jobs_dir / f"{uuid.uuid4().hex}.mp4")
        try:
            job.queue_position = self.engine.submit(job)
        except Busy as e:
            self.metrics.rejected.labels("busy").inc()
            return self._problem(503, "busy", f"the server is busy: {e}", {"Retry-After": "10"})
        self.jobs[job.id] = job
        return JSONResponse(self._job_view(job), status_code=202, headers={"Location": f"/api/jobs/{job.id}"})

    def _job(self, request) -> BatchJob | None:
        job_id = request.path_params["job_id"]
        return self.jobs.get(job_id) if re.fullmatch(r"[0-9a-f]{32}", job_id) else None

    async def job_status(self, request):
        from starlette.responses import JSONResponse

        self._expire_jobs()
        job = self._job(request)
        if job is None:
            return self._problem(404, "unknown_job", "no such job (finished jobs are kept for a while, then removed).")
        if request.method == "DELETE":
            if job.status in ("queued", "running"):
                if self.engine.cancel(job, "cancelled"):
                    job.status, job.finished_at = "cancelled", time.time()
            else:
                self.jobs.pop(job.id, None)
                job.path.unlink(missing_ok=True)
                return JSONResponse({"id": job.id, "status": "deleted"})
        return JSONResponse(self._job_view(job))

    async def job_video(self, request):
        from starlette.responses import FileResponse

        job = self._job(request)
        if job is None:
            return self._problem(404, "unknown_job", "no such job (finished jobs are kept for a while, then removed).")
        if job.status != "done" or not job.path.is_file():
            return self._problem(409, "not_done", f"the job is {job.status}; its video is there once it is done.")
        return FileResponse(job.path, media_type="video/mp4", filename=f"dfjax-{job.id[:8]}.mp4")

    # -- the live session -------------------------------------------------------------------------
    async def websocket(self, ws):
        from starlette.websockets import WebSocketDisconnect

        if not self.origin_allowed(ws.headers):
            self.metrics.rejected.labels("origin").inc()
            await ws.close(code=1008)  # before accept: the handshake is refused (HTTP 403)
            return
        await ws.accept()
        if len(self.connections) >= self.cfg.max_clients:
            self.metrics.rejected.labels("too_many_clients").inc()
            with contextlib.suppress(Exception):
                await ws.send_text(json.dumps({"type": "error", "code": "too_many_clients", "message":
                                               f"{self.cfg.max_clients} clients are connected, the most this server "
                                               "takes; try again later."}))
                await ws.close(code=1013)
            return
        conn = Connection(self, ws)
        self.connections.add(conn)
        self.metrics.clients.set(len(self.connections))
        gone = False
        try:
            await conn.send(self.hello())
            while True:
                event = await ws.receive()
                if event["type"] == "websocket.disconnect":
                    gone = True
                    break
                await conn.handle(event)
        except (WebSocketDisconnect, ConnectionError, RuntimeError):
            gone = True
        finally:
            self.connections.discard(conn)
            self.metrics.clients.set(len(self.connections))
            await conn.end()
            if not gone:
                with contextlib.suppress(Exception):
                    await ws.close(code=1008)


# ------------------------------------------------------------------------------------------------ running it

def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (a taken port fails at once, not after the compile)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host.")
    sock.listen(128)
    return sock


def uvicorn_config(app, cfg: ServeConfig):
    import uvicorn

    # no permessage-deflate: JPEG frames do not compress, and a small compressed message could inflate to a large one
    return uvicorn.Config(app, ws="websockets-sansio", ws_max_size=cfg.transport_max_bytes,
                          ws_per_message_deflate=False, ws_ping_interval=20, ws_ping_timeout=20, log_level="warning",
                          access_log=False, lifespan="on", timeout_graceful_shutdown=5)


def serve(make_pipeline: Callable[[], object], cfg: ServeConfig, notes=None, run=None, fps=None) -> None:
    """Runs the server until Ctrl-C or SIGTERM (the `dfjax serve` command)."""
    import uvicorn

    sock = bind(cfg.host, cfg.port)
    cfg = dataclasses.replace(cfg, port=sock.getsockname()[1])
    server = Server(make_pipeline, cfg, notes, run=run, fps=fps)
    if cfg.host not in LOOPBACK:
        server.log(f"listening on {cfg.host}, reachable from other machines: anyone who reaches it can use the "
                   "model (no authentication); put it behind a proxy that authenticates for that")
    server.log(f"listening on {server.url} (loading {cfg.model_name}; /health answers 503 until ready)")
    u = server.uvicorn = uvicorn.Server(uvicorn_config(server.make_app(), cfg))
    try:
        u.run(sockets=[sock])
    finally:
        sock.close()
    if server.engine.state == "failed":
        raise ValueError(server.engine.error)


class ServerThread:
    """A server on loopback in a thread of this process (benchmarks): `with ServerThread(make, cfg) as srv:`
    srv.url, srv.server. Waits until the model is ready."""

    def __init__(self, make_pipeline, cfg: ServeConfig, ready_timeout: float = 3600):
        self.sock = bind(cfg.host, cfg.port)
        self.cfg = dataclasses.replace(cfg, port=self.sock.getsockname()[1])
        self.server = Server(make_pipeline, self.cfg)
        self.ready_timeout = ready_timeout
        self.url = self.server.url

    def __enter__(self):
        # transformers 5 (5.17 on the GPU machine) fails to resolve its lazy AutoTokenizer from a thread other than
        # the main one ("Could not import module 'AutoTokenizer'"); this server's start-up runs in one: resolve it here
        from transformers import AutoTokenizer, T5Tokenizer  # noqa: F401


        import uvicorn

        self.uv = self.server.uvicorn = uvicorn.Server(uvicorn_config(self.server.make_app(), self.cfg))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while not self.server.engine.ready_event.wait(0.1):
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__(None, None, None)
                raise TimeoutError("the server did not get ready.")
        if self.server.engine.state == "failed":
            self.__exit__(None, None, None)
            raise RuntimeError(self.server.engine.error)
        return self

    def __exit__(self, *exc):
        self.uv.should_exit = True
        self.thread.join(60)
        self.sock.close()
