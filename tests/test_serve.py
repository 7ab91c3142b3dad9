"""`dfjax serve` end to end: one server (the demo model, Dummy Forcing, 16 fps) in a subprocess for the module.

WebSocket sessions (frames decode to the video size, are not blank, change, arrive at the frame rate; a prompt
switch takes effect and compiles nothing; stop), bad and hostile input (each answered, the session and the server
go on), a client that vanishes (the device is free within a chunk), many clients (a bounded queue, then "busy"),
the HTTP batch API (a playable mp4), and a real browser (Debian's chromium through its driver) playing the page.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from dfjax.demo import DEMO_PROMPTS
from dfjax.serve import FRAME_HEADER, ProtocolError, ServeConfig, parse_message

FPS = 16
QUEUE = 3
# prompts of the demo's language whose shape stays in view all video (content checks: no blank frame)
IN_VIEW = ("a blue circle moves up, then bounces", "a yellow triangle moves left, then turns up",
           "a green triangle moves right, then a yellow circle appears")
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever the environment says


class Running:
    def __init__(self, proc, port, log):
        self.proc, self.port, self.log = proc, port, log
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/ws"

    def get(self, path, headers=None):
        req = urllib.request.Request(self.http + path, headers=headers or {})
        try:
            with HTTP.open(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, path, method="GET", body=None, headers=None):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.http + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with HTTP.open(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metric(self, name):
        text = self.get("/metrics")[2].decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def health(self):
        return self.json("/health")[1]

    def alive(self):
        assert self.proc.poll() is None, "the server exited:\n" + self.log.read_text()[-3000:]


def wait_for(condition, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dfjax.cli", "serve", "--port", "0", "--dummy-forcing",
                                 "--fps", str(FPS), "--queue-size", str(QUEUE)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError("the server exited:\n" + log.read_text())
            m = re.search(r"ready on http://127\.0\.0\.1:(\d+)/", log.read_text())
            return m and int(m.group(1))

        port = wait_for(ready, 180, "the server to be ready", interval=0.1)
        yield Running(proc, port, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def ws_connect(server):
    with connect(server.ws, proxy=None, open_timeout=10, max_size=None) as ws:
        hello = json.loads(ws.recv(10))
        assert hello["type"] == "hello" and hello["ready"]
        yield ws, hello


def recv_until(ws, kind, timeout=30, frames=None, seen=None):
    """Messages until one of type `kind` (returned); frames (header, jpeg bytes, arrival time) and other JSON
    messages are collected on the way."""
    deadline = time.monotonic() + timeout
    while True:
        m = ws.recv(max(0.01, deadline - time.monotonic()))
        if isinstance(m, bytes):
            if frames is not None:
                frames.append((FRAME_HEADER.unpack(m[:8]), m[8:], time.monotonic()))
            continue
        msg = json.loads(m)
        if seen is not None:
            seen.append(msg)
        if msg["type"] == kind:
            return msg


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def blank(picture: np.ndarray) -> bool:
    """One colour all over (JPEG noise apart); the demo's frames are shapes on a dark ground (std 5 to 40)."""
    return picture.std() < 2 or int(picture.max()) - int(picture.min()) < 40


def serving_compiles(server) -> int:
    return server.health()["compiles"]["serving"]


# ------------------------------------------------------------------------------------------------ protocol unit

def test_messages_are_checked_before_anything_runs():
    cfg = ServeConfig(max_prompt_chars=50, max_message_bytes=200)
    assert parse_message('{"type": "start", "prompt": "a red square"}', cfg) == \
        {"type": "start", "prompt": "a red square", "seed": 0, "pace": "realtime"}
    bad = {'{"type": "switch", "prompt": "x"}': "cannot_switch",  # the stream-batch sampler
           '{"type": "start", "prompt": "' + "x" * 60 + '"}': "prompt_too_long",
           '{"type": "start", "prompt": "' + "x" * 300 + '"}': "too_large",
           '{"type": "start", "prompt": "x", "seed": true}': "bad_field",
           '{"type": "ping", "id": [1]}': "bad_field", '"start"': "bad_json", "{": "bad_json",
           '{"prompt": "x"}': "unknown_type", "[" * 150: "bad_json"}
    for raw, code in bad.items():
        with pytest.raises(ProtocolError) as e:
            parse_message(raw, cfg, can_switch=False)
        assert e.value.code == code, raw
    with pytest.raises(ProtocolError, match="binary"):
        parse_message(None, cfg)


# ------------------------------------------------------------------------------------------------ the server

def test_page_health_and_metrics(server):
    h = server.health()
    assert h["status"] == "ok" and (h["width"], h["height"], h["frames"], h["fps"]) == (64, 64, 33, FPS)
    assert h["dummy_forcing"] and h["can_switch"] and h["chunk_frames"] == [9, 12, 12]
    status, headers, body = server.get("/")
    assert status == 200 and b"<canvas" in body and b'src="/app.js"' in body
    assert "default-src 'self'" in headers["content-security-policy"]
    status, headers, body = server.get("/app.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and b"WebSocket" in body
    text = server.get("/metrics")[2].decode()
    for name in ("dfjax_time_to_first_frame_seconds_bucket", "dfjax_delivered_fps", "dfjax_deadline_misses_total",
                 "dfjax_queue_length", 'dfjax_compiles_total{phase="startup"}', 'dfjax_compiles_total{phase="serving"}',
                 "dfjax_ready 1.0", "dfjax_model_info{"):
        assert name in text, name
    assert server.metric('dfjax_compiles_total{phase="startup"}') > 0
    assert server.get("/health", headers={"Host": "attacker.example"})[0] == 400  # DNS rebinding refused
    assert server.get("/etc/passwd")[0] == 404 and server.get("/../pyproject.toml")[0] == 404


def test_live_session_frames_prompt_switch_and_stop(server):
    before = serving_compiles(server)
    first, new = "a white square moves left", "a green circle moves down"  # neither seen at start-up
    frames, seen = [], []
    with ws_connect(server) as (ws, _):
        ws.send(json.dumps({"type": "start", "prompt": first, "seed": 11}))
        started = recv_until(ws, "started")
        assert started["prompt"] == first and started["frames"] == 33 and started["pace"] == "realtime"
        recv_until(ws, "chunk", frames=frames, seen=seen)
        m = ws.recv(10)  # the first frame
        frames.append((FRAME_HEADER.unpack(m[:8]), m[8:], time.monotonic()))
        ws.send(json.dumps({"type": "switch", "prompt": new}))
        assert recv_until(ws, "switching", frames=frames, seen=seen)["prompt"] == new
        switched = recv_until(ws, "switched", frames=frames, seen=seen)
        assert switched["prompt"] == new and switched["from_chunk"] >= 1
        c = recv_until(ws, "chunk", frames=frames, seen=seen)
        while c["prompt"] != new:
            c = recv_until(ws, "chunk", frames=frames, seen=seen)
        for _ in range(3):  # a few frames made under the new prompt, then stop
            m = ws.recv(10)
            frames.append((FRAME_HEADER.unpack(m[:8]), m[8:], time.monotonic()))
        ws.send(json.dumps({"type": "stop"}))
        done = recv_until(ws, "done", frames=frames, seen=seen)
    chunks = [m for m in seen if m["type"] == "chunk"]
    assert c["index"] == switched["from_chunk"]
    assert [m["prompt"] for m in chunks] == [first] * c["index"] + [new]
    assert done["reason"] == "stopped" and done["compiles"] == 0
    assert done["frames"] == len(frames) < 33  # stopped early; every frame sent arrived before "done"
    assert [f[0][0] for f in frames] == list(range(len(frames)))  # frame indices in order, none lost
    pictures = [decode(j) for _, j, _ in frames]
    assert all(p.shape == (64, 64, 3) for p in pictures)
    assert not any(blank(p) for p in pictures), "blank frames"
    assert np.abs(pictures[0].astype(int) - pictures[8].astype(int)).mean() > 1, "the video does not move"
    # real-time pacing: chunk 0's 9 frames are spread over about 8 / FPS seconds, not sent at once
    chunk0 = [t for (i, k), _, t in frames if k == 0]
    assert len(chunk0) == 9 and chunk0[-1] - chunk0[0] > 0.7 * 8 / FPS
    assert serving_compiles(server) == before  # new prompts and a switch compile nothing
    server.alive()


def test_bad_and_hostile_input_is_answered_and_the_session_goes_on(server):
    with ws_connect(server) as (ws, _):
        def answer(raw):
            ws.send(raw)
            m = json.loads(ws.recv(10))
            assert m["type"] == "error", m
            return m["code"]

        assert answer("{not json") == "bad_json"
        assert answer("[1, 2]") == "bad_json"
        assert answer(json.dumps({"type": "dance"})) == "unknown_type"
        assert answer(json.dumps({"type": "start"})) == "bad_field"
        assert answer(json.dumps({"type": "start", "prompt": "   "})) == "bad_field"
        assert answer(json.dumps({"type": "start", "prompt": "x" * 3000})) == "prompt_too_long"
        assert answer(json.dumps({"type": "start", "prompt": "a" * 1_000_000})) == "too_large"  # a 1 MB prompt
        assert answer(json.dumps({"type": "start", "prompt": "a red square", "seed": -1})) == "bad_field"
        assert answer(json.dumps({"type": "start", "prompt": "a red square", "pace": "warp"})) == "bad_field"
        assert answer(json.dumps({"type": "start", "prompt": "a red square", "out": "/etc/passwd"})) == "bad_field"
        assert answer(b"\x00\x01binary") == "binary_not_accepted"
        assert answer(json.dumps({"type": "switch", "prompt": "a red square"})) == "not_started"
        assert answer(json.dumps({"type": "stop"})) == "not_started"
        # after all that the same connection still makes a whole video
        ws.send(json.dumps({"type": "start", "prompt": IN_VIEW[1], "seed": 1, "pace": "fast"}))
        recv_until(ws, "started")
        assert answer(json.dumps({"type": "start", "prompt": "a red square"})) == "already_started"
        assert answer("{") == "bad_json"  # mid-stream too
        frames = []
        done = recv_until(ws, "done", frames=frames)
        assert done["reason"] == "finished" and done["frames"] == len(frames) == 33
        assert not blank(decode(frames[-1][1]))
    # past the transport's limit (4 MiB) the server closes the connection (code 1009, unless the client, still
    # sending, sees the reset first); the server goes on
    with ws_connect(server) as (ws, _), pytest.raises(ConnectionClosed) as e:
        ws.send("x" * (5 * 2**20))
        ws.recv(10)
    assert e.value.rcvd is None or e.value.rcvd.code == 1009
    # a page of another site may not open sessions from a visitor's browser
    with pytest.raises(InvalidStatus) as e, connect(server.ws, proxy=None, origin="http://attacker.example"):
        pass
    assert e.value.response.status_code == 403
    assert server.health()["status"] == "ok"
    server.alive()


def test_a_flood_of_messages_is_rate_limited_and_answered(server):
    with ws_connect(server) as (ws, hello):
        burst = hello["limits"]["message_burst"]
        n = 300
        for i in range(n):
            ws.send(json.dumps({"type": "ping", "id": i}))
        answers = [json.loads(ws.recv(10)) for _ in range(n)]  # each one answered
        pongs = [m for m in answers if m["type"] == "pong"]
        limited = [m for m in answers if m["type"] == "error" and m["code"] == "rate_limited"]
        assert len(pongs) + len(limited) == n
        assert burst <= len(pongs) < burst + 20 and len(limited) > n - burst - 20

        def pong():  # the bucket refills: the connection works again
            ws.send(json.dumps({"type": "ping", "id": "again"}))
            return json.loads(ws.recv(10))["type"] == "pong"

        wait_for(pong, 5, "a pong after the flood", interval=0.2)
    assert server.metric('dfjax_rejected_total{reason="rate_limited"}') >= len(limited)
    server.alive()


def test_a_client_that_vanishes_frees_the_device_within_a_chunk(server):
    released = (server.metric("dfjax_release_seconds_sum"), server.metric("dfjax_release_seconds_count"))
    with ws_connect(server) as (ws, _):
        ws.send(json.dumps({"type": "start", "prompt": DEMO_PROMPTS[2], "seed": 5}))
        recv_until(ws, "chunk")
        assert isinstance(ws.recv(10), bytes)
        ws.socket.shutdown(socket.SHUT_RDWR)  # gone mid-stream, without a close handshake
        ws.socket.close()
    wait_for(lambda: not server.health()["busy"], 10, "the device to be free")
    wait_for(lambda: server.metric("dfjax_release_seconds_count") > released[1], 5, "the release to be recorded")
    release = server.metric("dfjax_release_seconds_sum") - released[0]
    chunk = server.metric("dfjax_chunk_seconds_sum") / server.metric("dfjax_chunk_seconds_count")
    assert release < 2 * chunk + 0.25, (release, chunk)  # the chunk being made finishes, no more
    assert server.metric('dfjax_sessions_total{kind="live",outcome="disconnected"}') >= 1
    wait_for(lambda: server.health()["clients"] == 0, 5, "the connection to be gone")
    with ws_connect(server) as (ws2, _):  # and the next session runs at once
        ws2.send(json.dumps({"type": "start", "prompt": DEMO_PROMPTS[0], "pace": "fast"}))
        assert recv_until(ws2, "started")["queue_wait_s"] < 1
        assert recv_until(ws2, "done")["reason"] == "finished"
    server.alive()


def test_many_clients_wait_in_a_bounded_queue_or_get_busy(server):
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws_connect(server))[0] for _ in range(QUEUE + 7)]
        running, waiting, rest = clients[0], clients[1:QUEUE + 1], clients[QUEUE + 1:]
        running.send(json.dumps({"type": "start", "prompt": DEMO_PROMPTS[1], "seed": 2}))
        recv_until(running, "started")
        for ws in waiting + rest:
            ws.send(json.dumps({"type": "start", "prompt": DEMO_PROMPTS[4], "pace": "fast"}))
        positions = [recv_until(ws, "queued")["position"] for ws in waiting]
        assert positions == list(range(1, QUEUE + 1))
        for ws in rest:
            m = recv_until(ws, "busy")
            assert "busy" in m["message"] and m["queue"] == QUEUE
        assert server.health()["queue"] == QUEUE
        waiting[0].close()  # the first in line leaves: the others move up
        assert recv_until(waiting[1], "queued")["position"] == 1
        assert recv_until(waiting[2], "queued")["position"] == 2
    wait_for(lambda: (lambda h: not h["busy"] and h["queue"] == 0 and h["clients"] == 0)(server.health()), 15,
             "every session and connection to be gone")
    assert server.metric("dfjax_queue_length") == 0 and server.metric("dfjax_device_busy") == 0
    assert server.metric('dfjax_rejected_total{reason="busy"}') >= 6
    server.alive()


def test_batch_api_makes_a_playable_mp4(server, tmp_path):
    from dfjax.video import read_mp4_frames, read_mp4_info

    status, job = server.json("/api/jobs", "POST", {"prompt": IN_VIEW[2], "seed": 4})
    assert status == 202 and re.fullmatch(r"[0-9a-f]{32}", job["id"]) and job["status"] in ("queued", "running")
    url = job["status_url"]

    def finished():
        s, view = server.json(url)
        assert s == 200 and view["status"] not in ("failed", "cancelled"), view
        return view["status"] == "done" and view

    view = wait_for(finished, 60, "the job to finish", interval=0.1)
    assert view["chunks_done"] == view["chunks"] == 3
    status, headers, body = server.get(job["video_url"])
    assert status == 200 and headers["content-type"] == "video/mp4"
    out = tmp_path / "job.mp4"
    out.write_bytes(body)
    info = read_mp4_info(out)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (33, 64, 64, FPS)
    assert not any(blank(f) for f in read_mp4_frames(out))
    # what it refuses
    assert server.json("/api/jobs", "POST", b"{not json")[0] == 400
    assert server.json("/api/jobs", "POST", {"seed": 1})[1]["error"] == "bad_field"
    assert server.json("/api/jobs", "POST", {"prompt": "a red square", "out": "/tmp/x.mp4"})[1]["error"] == "bad_field"
    assert server.json("/api/jobs", "POST", {"prompt": "x" * 100_000})[0] == 413
    assert server.json("/api/jobs/" + "0" * 32)[0] == 404
    assert server.get("/api/jobs/..%2F..%2Fetc%2Fpasswd/video")[0] == 404
    # a finished job's video can be deleted; then it is gone
    assert server.json(url, "DELETE")[1]["status"] == "deleted"
    assert server.get(job["video_url"])[0] == 404
    server.alive()


# ------------------------------------------------------------------------------------------------ a real browser

def _chromium():
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        if os.environ.get("CI"):
            raise AssertionError("chromium and chromedriver are missing; .ci/run installs them")
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver)")
    return found


def test_a_browser_plays_the_video_as_it_is_made(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    binary, driver_path = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000"):
        opts.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium never looks for a driver or browser online
    driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    try:
        driver.get(server.http + "/")
        view = lambda expr: driver.execute_script(f"return window.dfjaxView && window.dfjaxView.{expr};")
        wait_for(lambda: view("state") == "ready", 15, "the page to connect")
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(IN_VIEW[0])
        driver.find_element(By.ID, "start").click()
        first = wait_for(lambda: (lambda s: s and s["shown"] >= 2 and s["std"] > 5 and s)(view("sample()")), 20,
                         "non-blank frames on the page")
        driver.find_element(By.ID, "next-prompt").send_keys(IN_VIEW[1])
        driver.find_element(By.ID, "switch").click()
        later = wait_for(lambda: (lambda s: s["shown"] >= first["shown"] + 6 and s)(view("sample()")), 10,
                         "more frames")
        assert later["std"] > 5 and later["grid"] != first["grid"], "the frames do not change"
        shot = tmp_path / "serve.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("DFJAX_SCREENSHOT"):
            shutil.copy(shot, os.environ["DFJAX_SCREENSHOT"])
        assert Image.open(shot).size[0] >= 1000
        wait_for(lambda: view("state") == "ready", 15, "the video to end")
        assert view("shown") >= 8 and view("received") == 33
        assert driver.find_element(By.ID, "f-ttff").text.endswith(" s")
        log = driver.find_element(By.ID, "log").text
        assert "switching to" in log and "done" in log and "error" not in log.lower()
    finally:
        driver.quit()
    server.alive()
