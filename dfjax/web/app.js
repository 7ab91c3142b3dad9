// dfjax live: one WebSocket session (docs/serve.md). The server paces the frames to the video's frame rate, so each
// frame is drawn as it arrives. Binary messages: an 8-byte header (frame index, chunk index; big-endian uint32)
// and the frame as a JPEG.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const view = $("view");
  const ctx = view.getContext("2d");
  const S = {
    ws: null, hello: null, state: "offline", session: false, sentAt: 0, firstAt: null, ttff: null,
    arrivals: [], received: 0, shown: 0, lastIndex: -1, pending: null, raf: 0,
    chunk: -1, behind: null, misses: 0, prompt: "", total: 0,
  };

  const log = (text, kind) => {
    const li = document.createElement("li");
    li.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
    if (kind) li.className = kind;
    $("log").prepend(li);
    while ($("log").children.length > 60) $("log").lastChild.remove();
  };

  const setState = (state, text) => {
    S.state = state;
    $("state").dataset.state = state;
    $("state").textContent = text || state;
    $("overlay").textContent = text || state;
    buttons();
  };

  const connected = () => S.ws && S.ws.readyState === WebSocket.OPEN;
  const buttons = () => {
    const canStart = connected() && !S.session && S.hello && S.state !== "failed";
    $("start").disabled = !canStart;
    $("stop").disabled = !(connected() && S.session);
    $("switch").disabled = !(connected() && S.state === "playing" && S.hello && S.hello.can_switch);
    $("switch").title = S.hello && !S.hello.can_switch
      ? "this server's sampler (stream batch) cannot change the prompt during a video" : "";
  };

  const send = (msg) => { if (connected()) S.ws.send(JSON.stringify(msg)); };

  const describe = (h) => {
    S.hello = h;
    if (h.width && h.height && (view.width !== h.width || view.height !== h.height)) {
      view.width = h.width; view.height = h.height;
    }
    view.classList.toggle("small", (h.width || 999) < 320);
    const df = h.dummy_forcing ? ", Dummy Forcing" : "";
    $("model").textContent = `${h.model}: ${h.width}x${h.height}, ${h.frames} frames at ${h.fps} fps ` +
      `(${h.chunks} chunks, ${h.sampler} sampler${df})`;
    const limit = h.limits && h.limits.max_prompt_chars;
    if (limit) { $("prompt").maxLength = limit; $("next-prompt").maxLength = limit; }
    const box = $("examples");
    box.replaceChildren();
    for (const p of h.examples || []) {
      const b = document.createElement("button");
      b.type = "button"; b.textContent = p;
      b.onclick = () => { (S.state === "playing" ? $("next-prompt") : $("prompt")).value = p; };
      box.append(b);
    }
    $("examples-box").hidden = !(h.examples && h.examples.length);
    if (!$("prompt").value && h.examples && h.examples.length) $("prompt").value = h.examples[0];
    $("seed").value = $("seed").value || h.default_seed;
  };

  const reset = () => {
    Object.assign(S, { firstAt: null, ttff: null, arrivals: [], received: 0, shown: 0, lastIndex: -1, chunk: -1,
                       behind: null, misses: 0, prompt: "", total: S.hello ? S.hello.frames : 0 });
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, view.width, view.height);
  };

  const onMessage = (m) => {
    switch (m.type) {
      case "hello":
      case "ready":
        describe(m);
        if (!S.session) setState(m.ready ? "ready" : "starting", m.ready ? "ready" : "warming up: compiling the model");
        if (m.type === "ready") log("the model is ready");
        break;
      case "queued":
        setState("queued", `queued: number ${m.position} in line`);
        break;
      case "started":
        S.total = m.frames;
        setState("playing", "generating");
        log(`session ${m.session.slice(0, 8)} started (seed ${m.seed}; waited ${m.queue_wait_s.toFixed(2)} s)`);
        break;
      case "chunk":
        S.chunk = m.index; S.behind = m.behind; S.prompt = m.prompt;
        if (m.late) S.misses += 1;
        break;
      case "switching":
        log(`switching to "${m.prompt}" from the next chunk`);
        break;
      case "switched":
        log(`the prompt changes from chunk ${m.from_chunk}`);
        break;
      case "done":
        S.session = false;
        setState("ready", m.reason === "finished" ? "done" : `done (${m.reason})`);
        log(`done (${m.reason}): ${m.frames} frames` + (m.fps ? `, ${m.fps.toFixed(1)} FPS` : "") +
            (m.ttff_s != null ? `, first frame after ${m.ttff_s.toFixed(2)} s` : "") +
            (m.deadline_misses != null ? `, ${m.deadline_misses} deadline misses` : ""));
        break;
      case "busy":
        S.session = false;
        setState("ready", "busy: try again in a while");
        log(m.message, "error");
        break;
      case "error":
        log(`${m.code}: ${m.message}`, "error");
        if (m.code === "too_many_clients" || m.code === "unavailable") setState("failed", m.message);
        break;
      case "note":
        log(m.message, "note");
        break;
      default:
        break;
    }
    buttons();
  };

  const draw = () => {
    S.raf = 0;
    const bmp = S.pending;
    S.pending = null;
    if (!bmp) return;
    ctx.drawImage(bmp, 0, 0, view.width, view.height);
    bmp.close();
    S.shown += 1;
    if (S.ttff === null) S.ttff = (performance.now() - S.sentAt) / 1000;
  };

  const onFrame = (buf) => {
    if (buf.byteLength < 9) return;
    const header = new DataView(buf, 0, 8);
    const index = header.getUint32(0);
    const now = performance.now();
    S.received += 1;
    S.arrivals.push(now);
    if (S.firstAt === null) S.firstAt = now;
    createImageBitmap(new Blob([new Uint8Array(buf, 8)], { type: "image/jpeg" })).then((bmp) => {
      if (index <= S.lastIndex) { bmp.close(); return; }  // decoded out of order: an older frame
      S.lastIndex = index;
      if (S.pending) S.pending.close();
      S.pending = bmp;
      if (!S.raf) S.raf = requestAnimationFrame(draw);
    }).catch((e) => log(`a frame did not decode: ${e}`, "error"));
  };

  const figures = () => {
    const now = performance.now();
    while (S.arrivals.length && S.arrivals[0] < now - 2000) S.arrivals.shift();
    const n = S.arrivals.length;  // frames of the last 2 s: (n - 1) intervals between the first and the last
    const fps = n >= 3 && S.arrivals[n - 1] > S.arrivals[0] ? (n - 1) / ((S.arrivals[n - 1] - S.arrivals[0]) / 1000)
      : null;
    $("f-ttff").textContent = S.ttff === null ? "–" : `${S.ttff.toFixed(2)} s`;
    $("f-fps").textContent = fps === null ? "–" : fps.toFixed(1);
    $("f-behind").textContent = S.behind === null ? "–" : String(S.behind);
    $("f-misses").textContent = S.firstAt === null ? "–" : String(S.misses);
    $("f-frame").textContent = S.lastIndex < 0 ? "–" : `${S.lastIndex + 1} / ${S.total}`;
    $("f-chunk").textContent = S.chunk < 0 ? "–" : `${S.chunk + 1} / ${S.hello ? S.hello.chunks : "?"}`;
    $("f-prompt").textContent = S.prompt || "–";
    window.dfjaxView.fps = fps;
  };

  const start = () => {
    const prompt = $("prompt").value.trim();
    if (!prompt) { log("write a prompt first", "error"); return; }
    if ($("random-seed").checked) $("seed").value = Math.floor(Math.random() * 2147483647);
    const seed = Math.max(0, parseInt($("seed").value || "0", 10) || 0);
    reset();
    S.session = true;
    S.sentAt = performance.now();
    send({ type: "start", prompt, seed });
    setState("waiting", "starting");
  };

  const connect = () => {
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
    ws.binaryType = "arraybuffer";
    S.ws = ws;
    ws.onopen = () => { log("connected"); buttons(); };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") onMessage(JSON.parse(ev.data));
      else onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      S.ws = null; S.session = false;
      setState("offline", `disconnected (${ev.code}${ev.reason ? ": " + ev.reason : ""}); reconnecting`);
      setTimeout(connect, 2000);
    };
  };

  $("start").onclick = start;
  $("stop").onclick = () => send({ type: "stop" });
  $("switch").onclick = () => {
    const prompt = $("next-prompt").value.trim();
    if (!prompt) { log("write the new prompt first", "error"); return; }
    send({ type: "switch", prompt });
  };
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("start").disabled) start();
  });
  $("next-prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("switch").disabled) $("switch").click();
  });

  // for tests and the curious: what the page has shown (sample() reads the canvas)
  window.dfjaxView = {
    get state() { return S.state; }, get shown() { return S.shown; }, get received() { return S.received; },
    get ttff() { return S.ttff; }, get misses() { return S.misses; }, get prompt() { return S.prompt; }, fps: null,
    sample() {
      const d = ctx.getImageData(0, 0, view.width, view.height).data;
      let sum = 0, sq = 0;
      const n = d.length / 4, grid = [];
      for (let i = 0; i < d.length; i += 4) { const v = (d[i] + d[i + 1] + d[i + 2]) / 3; sum += v; sq += v * v; }
      for (let i = 0; i < d.length; i += 4 * 37) grid.push(d[i], d[i + 1], d[i + 2]);
      const mean = sum / n;
      return { mean, std: Math.sqrt(Math.max(0, sq / n - mean * mean)), grid, shown: S.shown };
    },
  };
  reset();
  setInterval(figures, 250);
  connect();
})();
