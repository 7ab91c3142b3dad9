"""Streaming H.264 mp4 writing (PyAV), to a temporary name renamed into place only when complete."""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def to_uint8(frames):
    """[..., H, W, 3] in [-1, 1] (device or host) -> uint8 numpy."""
    x = np.asarray(frames, dtype=np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


@jax.jit
def to_uint8_on_device(frames):
    """to_uint8 on the device (the same fp32 arithmetic and round-half-even): a quarter of the bytes to copy."""
    x = frames.astype(jnp.float32)
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def check_writable(path: str | Path) -> Path:
    """Fails early, before any heavy work, if `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"output {path} must end in .mp4.")
    if not parent.is_dir():
        raise ValueError(f"output folder {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output folder {parent} is not writable; choose another --out.")
    return path


class Mp4Writer:
    """Writes frames as they come, in a background thread; `close()` renames the file into place.

    Frame sizes must be even (H.264 4:2:0). On `abort()` or an exception in the context, the
    partial file is removed and nothing appears under the final name.
    """

    def __init__(self, path: str | Path, fps: float, crf: int = 18, preset: str = "veryfast"):
        # "veryfast": libx264's default ("medium") took ~1.9 s more for 81 noisy 480P frames than the
        # whole diffusion on an H100 host; veryfast encodes ~3x faster at about the same size (crf 18).
        self.path = check_writable(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial.mp4")
        self.fps, self.crf, self.preset = fps, crf, preset
        self.frames_written = 0
        self.write_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._container = None
        self._thread.start()

    def _open(self, h, w):
        import av

        self._container = av.open(str(self.tmp), mode="w")
        stream = self._container.add_stream("libx264", rate=int(round(self.fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(self.crf), "preset": self.preset}
        self._stream = stream

    def _run(self):
        import av

        try:
            while (frames := self._queue.get()) is not None:
                t0 = time.perf_counter()
                if self._container is None:
                    self._open(*frames.shape[1:3])
                for f in frames:
                    for packet in self._stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                        self._container.mux(packet)
                self.frames_written += len(frames)
                self.write_s += time.perf_counter() - t0
        except BaseException as e:  # reported to the caller on the next write/close
            self._error = e
            while self._queue.get() is not None:
                pass

    def write(self, frames_uint8: np.ndarray) -> None:
        """frames [T, H, W, 3] uint8."""
        if self._error:
            raise self._error
        if frames_uint8.shape[1] % 2 or frames_uint8.shape[2] % 2:
            raise ValueError(f"frame size {frames_uint8.shape[2]}x{frames_uint8.shape[1]} must be even for H.264.")
        self._queue.put(frames_uint8)

    def close(self) -> Path:
        self._queue.put(None)
        self._thread.join()
        if self._error:
            self._cleanup()
            raise self._error
        t0 = time.perf_counter()
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
        self.write_s += time.perf_counter() - t0
        if self.frames_written == 0:
            self._cleanup()
            raise ValueError("no frames were written.")
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
        self._cleanup()

    def _cleanup(self):
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_mp4_info(path: str | Path) -> dict:
    """Frame count, size and fps of an mp4, decoded back with PyAV (used by tests and users)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return {"frames": n, "width": s.width, "height": s.height, "fps": float(s.average_rate)}


def read_mp4_frames(path: str | Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])
