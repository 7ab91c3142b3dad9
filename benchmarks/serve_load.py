"""`dfjax serve` measured: one live session through the server to a local client, on the real model shapes.

Builds the 1.3B DiT, UMT5-XXL and the Wan2.1 VAE with random weights in this process (as dfjax.bench does: nothing
to download), serves them on loopback (dfjax.serve.ServerThread: the same server `dfjax serve` runs, with its
warm-up at start-up, Dummy Forcing's plan fixed there), and drives WebSocket sessions from a client in this process:

  realtime         the default pace: frames sent at the video's frame rate as they are made
  realtime+switch  the same with a prompt switch halfway through
  fast             frames sent as fast as they are made (the throughput through the server)

Per session, measured on the client: time from the start message to the first frame, delivered FPS (frames after
the first / time from the first to the last), per-chunk jitter (a chunk's first frame against when it was due:
the interval from the chunk before, minus that chunk's frames / fps), deadline misses (as a player would stall:
frame n due at t0 + (n - n0) / fps from the first frame, a chunk late by more than half a frame restarts the clock
at it, counted once per chunk), the server's own count, the switch's latency, and the compiles while serving.
Writes JSON (device, versions, date) to benchmarks/results/serve-<device>-<date>.json and prints a table.

    python benchmarks/serve_load.py                       # 480P, 60 s, Dummy Forcing (GPU; under 8 minutes)
    python benchmarks/serve_load.py --tiny                # tiny models, 3 s (a CPU check, under a minute)
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

_T0 = time.perf_counter()


def progress(*msg) -> None:
    print(f"[serve_load {time.perf_counter() - _T0:7.1f}s]", *msg, file=sys.stderr, flush=True)


def build_pipeline(tiny: bool, resolution: str, seconds: float, dummy: bool, fps: float, attn_impl: str):
    import jax

    jax.config.update("jax_default_prng_impl", "unsafe_rbg")  # fast random weights (and noise); this process only
    from dfjax.api import Options, run_config
    from dfjax.bench import _random_models
    from dfjax.synthetic import prompt_corpus
    from dfjax.t2v import VideoModel, VideoPipeline
    from dfjax.text import TextEncoder, load_tokenizer, make_tiny_tokenizer

    dit, t5, vae = _random_models(tiny)
    with tempfile.TemporaryDirectory() as tmp:  # a small sentencepiece tokenizer: ids fit any vocabulary
        tokenizer = load_tokenizer(make_tiny_tokenizer(Path(tmp) / "tok", prompt_corpus(200), vocab_size=64))
    size = dict(height=64, width=96) if tiny else dict(resolution=resolution)
    run, fps = run_config({}, Options(**size, seconds=seconds, fps=fps, dummy_forcing=dummy, attn_impl=attn_impl))
    return VideoPipeline(VideoModel(dit, TextEncoder(tokenizer, t5), vae), run, fps=fps)


def session(url: str, prompt: str, seed: int, pace: str, fps: float, switch_at: float | None = None,
            switch_prompt: str | None = None, timeout: float = 600) -> dict:
    from PIL import Image
    from websockets.sync.client import connect

    from dfjax.serve import FRAME_HEADER

    arrivals, headers, first_jpeg = [], {}, None
    switch_sent = switch_seen = None
    with connect(url.replace("http", "ws") + "ws", proxy=None, max_size=None, open_timeout=30) as ws:
        hello = json.loads(ws.recv(30))
        t_start = time.perf_counter()
        ws.send(json.dumps({"type": "start", "prompt": prompt, "seed": seed, "pace": pace}))
        deadline = t_start + timeout
        while True:
            m = ws.recv(max(0.1, deadline - time.perf_counter()))
            now = time.perf_counter()
            if isinstance(m, bytes):
                frame, chunk = FRAME_HEADER.unpack(m[:8])
                arrivals.append((frame, chunk, now))
                if first_jpeg is None:
                    first_jpeg = m[8:]
                if switch_at is not None and switch_sent is None and now - arrivals[0][2] >= switch_at:
                    ws.send(json.dumps({"type": "switch", "prompt": switch_prompt}))
                    switch_sent = now
                continue
            msg = json.loads(m)
            if msg["type"] == "chunk":
                headers[msg["index"]] = msg
                if switch_sent is not None and switch_seen is None and msg["prompt"] == switch_prompt:
                    switch_seen = (now, msg["index"])
            elif msg["type"] in ("error", "busy"):
                raise RuntimeError(f"the server answered {msg}")
            elif msg["type"] == "done":
                done = msg
                break
    picture = Image.open(io.BytesIO(first_jpeg))
    assert picture.size == (hello["width"], hello["height"]), picture.size
    first, last = arrivals[0][2], arrivals[-1][2]
    chunk_first = {}
    for frame, chunk, t in arrivals:
        chunk_first.setdefault(chunk, (frame, t))
    order = sorted(chunk_first)
    jitter = []  # a chunk's first frame against when it was due after the chunk before (realtime pace only)
    for a, b in zip(order, order[1:]):
        (fa, ta), (fb, tb) = chunk_first[a], chunk_first[b]
        jitter.append((tb - ta) - (fb - fa) / fps)
    misses, t0, n0, late_chunks = 0, first, 0, set()
    for frame, chunk, t in arrivals:
        due = t0 + (frame - n0) / fps
        if t > due + 0.5 / fps:
            late_chunks.add(chunk)
            t0, n0 = t, frame
    misses = len(late_chunks)
    made = [h["made_s"] for h in headers.values()]
    out = {
        "pace": pace, "switch": switch_at is not None, "frames": len(arrivals), "chunks": len(order),
        "reason": done["reason"], "ttff_s": first - t_start, "delivered_fps": (len(arrivals) - 1) / (last - first),
        "video_s": len(arrivals) / fps, "session_s": last - t_start,
        "jitter_ms": {"mean": 1e3 * statistics.fmean(jitter), "std": 1e3 * statistics.pstdev(jitter),
                      "max_abs": 1e3 * max(abs(j) for j in jitter)} if jitter and pace == "realtime" else None,
        "deadline_misses_client": misses if pace == "realtime" else None,
        "deadline_misses_server": done["deadline_misses"],
        "chunk_made_s": {"median": statistics.median(made), "max": max(made), "first": headers[0]["made_s"]},
        "compiles_in_session": done["compiles"], "server_ttff_s": done["ttff_s"],
    }
    if switch_sent is not None:
        out["switch_sent_at_s"] = switch_sent - first
        out["switch_latency_s"] = None if switch_seen is None else switch_seen[0] - switch_sent
        out["switch_first_chunk"] = None if switch_seen is None else switch_seen[1]
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'session':16s} {'frames':>6s} {'1st frame s':>11s} {'FPS':>6s} {'jitter ms (std/max)':>20s} "
          f"{'misses c/s':>10s} {'switch s':>8s} {'compiles':>8s}")
    for r in rows:
        name = r["pace"] + ("+switch" if r["switch"] else "")
        j = r["jitter_ms"]
        jit = f"{j['std']:.1f} / {j['max_abs']:.1f}" if j else "-"
        miss = f"{r['deadline_misses_client']}/{r['deadline_misses_server']}" if r["pace"] == "realtime" else "-"
        sw = f"{r['switch_latency_s']:.2f}" if r.get("switch_latency_s") is not None else "-"
        print(f"{name:16s} {r['frames']:6d} {r['ttff_s']:11.3f} {r['delivered_fps']:6.1f} {jit:>20s} {miss:>10s} "
              f"{sw:>8s} {r['compiles_in_session']:8d}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models at 64x96 for 3 s (a CPU check)")
    p.add_argument("--resolution", default="480p")
    p.add_argument("--seconds", type=float, help="video length (default 60; --tiny: 3)")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--switch-at", type=float,
                   help="seconds of playback before the switch (default: half the video; --tiny: 0.25, while "
                        "chunks are still to be made)")
    p.add_argument("--no-dummy-forcing", action="store_true", help="the Self Forcing baseline instead")
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--sessions", default="realtime,realtime+switch,fast",
                   help="comma-separated: realtime, realtime+switch, fast")
    p.add_argument("--out", help="JSON path (default benchmarks/results/serve-<device>-<date>.json)")
    a = p.parse_args(argv)
    seconds = a.seconds or (3.0 if a.tiny else 60.0)
    switch_at = a.switch_at if a.switch_at is not None else (0.25 if a.tiny else seconds / 2)
    from dfjax.bench import environment
    from dfjax.serve import ServeConfig, ServerThread

    env = environment()
    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / (
        f"serve-{env['device'].replace(' ', '_')}-{env['date']}" + ("-tiny" if a.tiny else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = not a.no_dummy_forcing
    prompts = ("a red fox running through fresh snow at dawn", "the fox stops and looks at a hot air balloon")
    cfg = ServeConfig(host="127.0.0.1", port=0, warmup_prompt="a cat walking through a garden",
                      model_name="random-weights Wan2.1 1.3B" if not a.tiny else "random-weights tiny")
    record = {**env, "benchmark": "serve_load", "tiny": a.tiny, "resolution": "64x96" if a.tiny else a.resolution,
              "seconds": seconds, "fps": a.fps, "dummy_forcing": dummy, "attn_impl": a.attn_impl,
              "client": "websockets (sync) in the server's process, over loopback", "runs": []}
    progress("building the random-weight models")
    t0 = time.perf_counter()
    holder = {}

    def make():
        pipe = build_pipeline(a.tiny, a.resolution, seconds, dummy, a.fps, a.attn_impl)
        holder["build_s"] = time.perf_counter() - t0
        progress(f"models built in {holder['build_s']:.1f} s; {pipe.run.video.frames} frames, "
                 f"{pipe.run.num_chunks} chunks at {pipe.run.video.width}x{pipe.run.video.height}; warming up")
        return pipe

    with ServerThread(make, cfg) as srv:
        e = srv.server.engine
        record.update(frames=e.run_info["frames"], chunks=e.run_info["chunks"], width=e.run_info["width"],
                      height=e.run_info["height"], build_s=holder["build_s"],
                      startup_s=time.perf_counter() - t0, compiles_startup=e.compiles["startup"])
        progress(f"ready on {srv.url} after {record['startup_s']:.1f} s ({e.compiles['startup']} compiles)")
        for i, name in enumerate(s.strip() for s in a.sessions.split(",")):
            pace, _, sw = name.partition("+")
            if pace not in ("realtime", "fast") or sw not in ("", "switch"):
                raise SystemExit(f"unknown session {name!r}")
            progress(f"session {name}")
            r = session(srv.url, prompts[0], seed=i, pace=pace, fps=e.run_info["fps"],
                        switch_at=switch_at if sw else None, switch_prompt=prompts[1] if sw else None)
            r["name"] = name
            record["runs"].append(r)
            record["compiles_serving"] = e.compiles["serving"]
            out.write_text(json.dumps(record, indent=2))  # kept if a later session is cut off
            print_table([r])
    print()
    print(f"{env['device']}, jax {env['jax_version']}, {env['date']}, commit {env['git_commit']}: "
          f"{record['resolution']}, {record['frames']} frames ({seconds:g} s at {a.fps:g} fps), "
          f"{'Dummy Forcing' if dummy else 'baseline'}; start-up {record['startup_s']:.1f} s, "
          f"{record['compiles_serving']} compiles while serving")
    print_table(record["runs"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
