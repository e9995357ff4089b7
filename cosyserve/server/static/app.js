// cosyserve playground: plain JavaScript, no build step, no dependencies.
//
// Speech is requested as raw PCM (s16le mono, rate in X-Sample-Rate) and every piece that
// arrives is scheduled on the Web Audio clock right after the previous one, so playback starts
// with the first chunk instead of after the whole file. The samples are kept so the result can
// be replayed and downloaded (any format: the server re-encodes exactly what was heard).
//
// "Speak as I type" opens a WebSocket session (/v1/audio/speech/stream-input) and sends what is
// typed as it is typed: the server speaks each sentence as soon as it is complete, and its audio
// (binary PCM frames) is scheduled the same way.
"use strict";

(() => {
  const KEY_STORAGE = "cosyserve.apiKey";
  const VOICE_STORAGE = "cosyserve.voice";
  // Scheduling headroom: enough to absorb main-thread jitter, small enough not to add latency.
  const LEAD_S = 0.05;
  // Network reads can be tiny; scheduling a few samples at a time makes clicks and stalls.
  const MIN_CHUNK_S = 0.02;
  const EXTENSIONS = { wav: "wav", mp3: "mp3", opus: "opus", flac: "flac", aac: "aac", pcm: "pcm" };

  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("speak-form"), text: $("text"), chars: $("char-count"), voice: $("voice"),
    speed: $("speed"), speedValue: $("speed-value"), format: $("format"), endpoint: $("endpoint"),
    speak: $("speak"), stop: $("stop"), status: $("status"), info: $("server-info"),
    firstAudio: $("first-audio-ms"), rtf: $("rtf"), speedX: $("speed-x"), audioS: $("audio-s"),
    elapsed: $("elapsed-s"), stalls: $("stalls"), played: $("played-s"), progress: $("progress"),
    progressPlayed: $("progress-played"), replay: $("replay"), player: $("player"),
    download: $("download"), cloneForm: $("clone-form"), cloneFieldset: $("clone-fieldset"),
    cloneNote: $("clone-note"), cloneStatus: $("clone-status"), cloneName: $("clone-name"),
    cloneAudio: $("clone-audio"), cloneTranscript: $("clone-transcript"),
    keyForm: $("key-form"), key: $("api-key"), keyClear: $("api-key-clear"), live: $("live"), hint: $("hint"),
  };
  const HINT = el.hint.textContent;
  const LIVE_HINT = "Each sentence is spoken when you finish it · Speak says the rest now · Stop cancels";

  const app = { ctx: null, run: null, maxChars: 0, downloadUrl: null, playerUrl: null, ticker: 0 };
  // The "speak as I type" session: its socket and the text already sent.
  const live = { ws: null, sent: "", run: null };

  // ---------------------------------------------------------------------------------------
  // HTTP
  // ---------------------------------------------------------------------------------------

  function authHeaders(extra) {
    const headers = new Headers(extra || {});
    const key = localStorage.getItem(KEY_STORAGE);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    return headers;
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // Paths are relative so the page also works behind a reverse proxy under a prefix.
  async function api(path, options = {}) {
    const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        const body = await response.json();
        message = (body.error && body.error.message) || body.detail || message;
      } catch (_) { /* not JSON: keep the status line */ }
      if (response.status === 401) message = `${message}. Enter the server's API key under Connection.`;
      throw new ApiError(response.status, message);
    }
    return response;
  }

  // ---------------------------------------------------------------------------------------
  // Status and metrics
  // ---------------------------------------------------------------------------------------

  function setStatus(kind, message) {
    el.status.dataset.kind = kind;
    el.status.textContent = message;
  }

  function setState(state) {
    document.body.dataset.state = state;
    const busy = state === "synthesising";
    el.speak.disabled = busy || el.voice.disabled;
    el.stop.disabled = !(busy || document.body.dataset.playback === "playing");
  }

  function fmt(value, digits) {
    return Number.isFinite(value) ? value.toFixed(digits) : "–";
  }

  function resetMetrics() {
    for (const node of [el.firstAudio, el.rtf, el.speedX, el.audioS, el.elapsed, el.stalls]) {
      node.textContent = "–";
    }
    el.played.textContent = "0.00";
    el.progressPlayed.style.width = "0%";
    el.progress.setAttribute("aria-valuenow", "0");
    el.replay.hidden = true;
    document.body.dataset.playback = "idle";
  }

  function updateCharCount() {
    const n = el.text.value.length;
    el.chars.textContent = app.maxChars ? `${n} / ${app.maxChars} characters` : `${n} characters`;
    el.chars.classList.toggle("over", app.maxChars > 0 && n > app.maxChars);
  }

  // ---------------------------------------------------------------------------------------
  // Connecting: voices, server capabilities
  // ---------------------------------------------------------------------------------------

  async function connect() {
    if (live.ws) stopLive();
    el.live.checked = false;
    setState("loading");
    setStatus("busy", "Connecting to the server…");
    el.voice.disabled = true;
    el.speak.disabled = true;
    const [voices, info] = await Promise.allSettled([
      api("list_voices").then((r) => r.json()),
      api("performance_info").then((r) => r.json()),
    ]);
    if (info.status === "fulfilled") showServerInfo(info.value);
    else el.info.textContent = "Server details unavailable.";
    showCloning(info.status === "fulfilled" ? info.value : null);
    if (voices.status === "rejected") {
      const error = voices.reason;
      el.voice.replaceChildren(new Option("No voices", ""));
      setState(error.status === 401 ? "needs-key" : "error");
      setStatus("error", `Cannot list voices: ${error.message}`);
      if (error.status === 401) el.key.focus();
      return;
    }
    fillVoices(voices.value.voices || []);
    setState("ready");
    setStatus("ok", "Ready. Type some text and press Speak.");
  }

  function fillVoices(voices, select) {
    const wanted = select || el.voice.value || localStorage.getItem(VOICE_STORAGE);
    el.voice.replaceChildren();
    for (const voice of voices) {
      const option = new Option(voice.kind === "saved" ? `${voice.id} (saved)` : voice.id, voice.id);
      option.title = voice.description || "";
      el.voice.append(option);
    }
    if (!voices.length) el.voice.append(new Option("No voices: save one below", ""));
    if (wanted && voices.some((v) => v.id === wanted)) el.voice.value = wanted;
    el.voice.disabled = voices.length === 0;
    el.speak.disabled = voices.length === 0;
    el.live.disabled = voices.length === 0;
  }

  function showServerInfo(info) {
    const backend = info.backend || {};
    const parts = [`cosyserve ${info.version || ""}`.trim(), `${backend.backend || "unknown"} backend`];
    if (backend.model) parts.push(String(backend.model));
    else if (backend.voice) parts.push(String(backend.voice));
    if (backend.device) parts.push(String(backend.device));
    if (Array.isArray(info.accelerated) && info.accelerated.length) parts.push(info.accelerated.join(" + "));
    el.info.textContent = parts.join(" · ");
    const settings = info.settings || {};
    app.maxChars = Number(settings.max_text_chars) || 0;
    if (app.maxChars) el.text.maxLength = app.maxChars;
    updateCharCount();
  }

  function showCloning(info) {
    const modes = (info && info.backend && info.backend.modes) || [];
    const canClone = modes.includes("zero_shot") || modes.includes("cross_lingual");
    el.cloneFieldset.disabled = !canClone;
    el.cloneNote.hidden = canClone;
    if (canClone) return;
    el.cloneNote.textContent = info
      ? `Voice cloning needs a CosyVoice model: the loaded backend (${info.backend.backend || "unknown"}) `
        + "speaks only its built-in voice. Start the server with --model_dir to save cloned voices."
      : "Cloning is unavailable: the server's capabilities could not be read.";
  }

  // ---------------------------------------------------------------------------------------
  // Speaking: stream PCM, schedule it back to back
  // ---------------------------------------------------------------------------------------

  function audioContext() {
    if (!app.ctx) app.ctx = new AudioContext({ latencyHint: "interactive" });
    return app.ctx;
  }

  function buildRequest(text) {
    const voice = el.voice.value;
    const speed = Number(el.speed.value);
    if (el.endpoint.value === "seed") {
      const body = new URLSearchParams({ tts_text: text, spk_id: voice, format: "stream", speed: String(speed) });
      return ["inference_sft", { method: "POST", body }];
    }
    const body = JSON.stringify({
      model: "tts-1", input: text, voice, response_format: "pcm", speed, stream: true,
    });
    return ["v1/audio/speech", { method: "POST", body, headers: { "Content-Type": "application/json" } }];
  }

  async function speak() {
    const text = el.text.value;
    if (!text.trim()) {
      setStatus("error", "Type some text first.");
      el.text.focus();
      return;
    }
    if (app.maxChars && text.length > app.maxChars) {
      setStatus("error", `The text is ${text.length} characters; this server accepts ${app.maxChars}.`);
      return;
    }
    stopPlayback();
    const ctx = audioContext();
    await ctx.resume();
    localStorage.setItem(VOICE_STORAGE, el.voice.value);
    const run = newRun();
    app.run = run;
    resetMetrics();
    setState("synthesising");
    setStatus("busy", "Synthesising…");
    startTicker();
    try {
      const [path, init] = buildRequest(text);
      const response = await api(path, { ...init, signal: run.abort.signal });
      run.sampleRate = parseInt(response.headers.get("X-Sample-Rate") || "", 10) || 22050;
      const reader = response.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        receive(run, value);
      }
      flushPending(run);
      run.doneAt = performance.now();
      run.done = true;
      finish(run);
    } catch (error) {
      if (app.run !== run) return; // superseded by a newer request
      run.done = true;
      if (run.abort.signal.aborted) {
        setState("stopped");
        setStatus("info", "Stopped.");
        return;
      }
      setState("error");
      if (error instanceof ApiError) {
        setStatus("error", error.message);
      } else {
        setStatus("error", `The stream broke off: ${error.message || error}`);
      }
    }
  }

  function newRun() {
    return {
      abort: new AbortController(), voice: el.voice.value, started: performance.now(), firstAt: null,
      doneAt: null, sampleRate: 0, chunks: [], samples: 0, pending: [], pendingSamples: 0, odd: null,
      nextTime: 0, scheduled: [], sources: [], stalls: 0, done: false, segmentStart: false,
    };
  }

  function receive(run, bytes) {
    if (run.odd !== null) { // a sample split across two reads
      const joined = new Uint8Array(bytes.length + 1);
      joined[0] = run.odd;
      joined.set(bytes, 1);
      bytes = joined;
      run.odd = null;
    }
    if (bytes.length % 2) {
      run.odd = bytes[bytes.length - 1];
      bytes = bytes.subarray(0, bytes.length - 1);
    }
    if (!bytes.length) return;
    // Copy to an aligned buffer; PCM is little-endian like every platform browsers run on.
    const samples = new Int16Array(bytes.slice().buffer);
    run.chunks.push(samples);
    run.samples += samples.length;
    run.pending.push(samples);
    run.pendingSamples += samples.length;
    if (run.pendingSamples >= MIN_CHUNK_S * run.sampleRate) flushPending(run);
  }

  function flushPending(run) {
    if (!run.pendingSamples) return;
    const data = new Float32Array(run.pendingSamples);
    let offset = 0;
    for (const part of run.pending) {
      for (let i = 0; i < part.length; i++) data[offset + i] = part[i] / 32768;
      offset += part.length;
    }
    run.pending = [];
    run.pendingSamples = 0;
    schedule(run, data);
  }

  function schedule(run, data) {
    const ctx = app.ctx;
    const buffer = ctx.createBuffer(1, data.length, run.sampleRate); // the context resamples
    buffer.copyToChannel(data, 0);
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    const now = ctx.currentTime;
    if (run.firstAt === null) {
      run.firstAt = performance.now();
      run.nextTime = now + LEAD_S;
      el.firstAudio.textContent = String(Math.round(run.firstAt - run.started));
      document.body.dataset.playback = "playing";
      setStatus("busy", "Playing while synthesising…");
    } else if (run.nextTime < now) {
      // The stream fell behind playback: restart from now. Live, a new sentence after a pause in
      // typing starts late by design: that is not a stall.
      if (!run.segmentStart) run.stalls += 1;
      run.nextTime = now + LEAD_S;
    }
    run.segmentStart = false;
    source.start(run.nextTime);
    run.scheduled.push([run.nextTime, buffer.duration]);
    run.sources.push(source);
    run.nextTime += buffer.duration;
  }

  function playedSeconds(run) {
    if (!app.ctx) return 0;
    const now = app.ctx.currentTime;
    let played = 0;
    for (const [start, duration] of run.scheduled) played += Math.min(Math.max(now - start, 0), duration);
    return played;
  }

  function startTicker() {
    clearInterval(app.ticker);
    app.ticker = setInterval(tick, 100);
  }

  function tick() {
    const run = app.run;
    if (!run) return;
    const total = run.samples / (run.sampleRate || 1);
    const played = playedSeconds(run);
    el.played.textContent = played.toFixed(2);
    const percent = total > 0 ? Math.min(100, (100 * played) / total) : 0;
    el.progressPlayed.style.width = `${percent.toFixed(1)}%`;
    el.progress.setAttribute("aria-valuenow", String(Math.round(percent)));
    if (run.done && total > 0 && played >= total - 1e-3) {
      clearInterval(app.ticker);
      document.body.dataset.playback = "ended";
      el.stop.disabled = true;
      if (document.body.dataset.state === "done") {
        setStatus("ok", `Done: played ${total.toFixed(2)} s of audio. Replay or download it below.`);
      }
    }
  }

  function finish(run) {
    const audio = run.samples / run.sampleRate;
    const elapsed = (run.doneAt - run.started) / 1000;
    el.audioS.textContent = fmt(audio, 2);
    el.elapsed.textContent = fmt(elapsed, 2);
    el.rtf.textContent = audio > 0 ? fmt(elapsed / audio, 3) : "–";
    el.speedX.textContent = audio > 0 && elapsed > 0 ? fmt(audio / elapsed, 1) : "–";
    el.stalls.textContent = String(run.stalls);
    if (!run.samples) {
      setState("error");
      setStatus("error", "The server sent no audio for this text.");
      return;
    }
    setState("done");
    setStatus("ok", `Synthesised ${fmt(audio, 2)} s of audio in ${fmt(elapsed, 2)} s; playing…`);
    prepareResult(run);
    tick();
  }

  function stopPlayback() {
    const run = app.run;
    if (!run) return;
    run.abort.abort();
    for (const source of run.sources) {
      try { source.stop(); } catch (_) { /* not started yet */ }
    }
    run.scheduled = run.scheduled.filter(([start]) => start < (app.ctx ? app.ctx.currentTime : 0));
    clearInterval(app.ticker);
    if (document.body.dataset.playback === "playing") document.body.dataset.playback = "stopped";
  }

  // ---------------------------------------------------------------------------------------
  // Speak as I type: a WebSocket session fed with what is typed
  // ---------------------------------------------------------------------------------------

  function liveUrl() {
    const url = new URL("v1/audio/speech/stream-input", document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const key = localStorage.getItem(KEY_STORAGE);
    if (key) url.searchParams.set("api_key", key); // browsers cannot set headers on a WebSocket
    return url.toString();
  }

  function setLive(state) {
    document.body.dataset.live = state;
    el.hint.textContent = state === "off" ? HINT : LIVE_HINT;
    el.speak.innerHTML = state === "off"
      ? '<span aria-hidden="true">▶</span> Speak' : '<span aria-hidden="true">▶</span> Speak the rest';
    el.stop.disabled = state === "off" && document.body.dataset.playback !== "playing";
  }

  async function startLive() {
    stopLive();
    stopPlayback();
    const ctx = audioContext();
    await ctx.resume();
    const run = newRun();
    run.live = true;
    app.run = run;
    live.run = run;
    live.sent = el.text.value; // what is already there is not spoken: only what is typed next
    resetMetrics();
    setLive("connecting");
    setStatus("busy", "Opening a live session…");
    const ws = new WebSocket(liveUrl());
    ws.binaryType = "arraybuffer";
    live.ws = ws;
    ws.onopen = () => {
      ws.send(JSON.stringify({
        type: "config", voice: el.voice.value, speed: Number(el.speed.value), response_format: "pcm",
      }));
    };
    ws.onmessage = (message) => {
      if (live.ws !== ws) return;
      if (typeof message.data === "string") onLiveEvent(run, JSON.parse(message.data));
      else receive(run, new Uint8Array(message.data));
    };
    ws.onclose = (event) => {
      if (live.ws !== ws) return;
      live.ws = null;
      el.live.checked = false;
      setLive("off");
      if (event.code !== 1000 && event.code !== 1005) {
        setStatus("error", `The live session closed (${event.code})${event.reason ? `: ${event.reason}` : ""}.`);
      } else {
        setStatus("info", "Live session closed.");
      }
    };
    startTicker();
  }

  function stopLive() {
    const ws = live.ws;
    live.ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
    setLive("off");
  }

  function liveSend(message) {
    if (live.ws && live.ws.readyState === WebSocket.OPEN) live.ws.send(JSON.stringify(message));
  }

  // Only appended text can be streamed; after an edit elsewhere, what is there becomes the new start.
  function sendTyped() {
    if (document.body.dataset.live !== "open") return;
    const text = el.text.value;
    if (text.startsWith(live.sent) && text.length > live.sent.length) {
      liveSend({ type: "text", text: text.slice(live.sent.length) });
    }
    live.sent = text;
  }

  function onLiveEvent(run, event) {
    switch (event.type) {
      case "session.started":
        run.sampleRate = event.sample_rate;
        setLive("open");
        setStatus("ok", "Live: type, and each sentence is spoken as soon as you finish it.");
        sendTyped();
        break;
      case "segment.started":
        flushPending(run);
        run.segmentStart = true;
        document.body.dataset.playback = "playing";
        setStatus("busy", `Speaking: “${event.text}”`);
        break;
      case "segment.done":
        flushPending(run);
        // From the sentence being complete to its first audio, measured by the server.
        if (event.first_audio_s !== null) el.firstAudio.textContent = String(Math.round(event.first_audio_s * 1000));
        el.audioS.textContent = fmt(run.samples / run.sampleRate, 2);
        el.stalls.textContent = String(run.stalls);
        break;
      case "utterance.done":
        flushPending(run);
        if (event.status === "cancelled") setStatus("info", "Stopped. Keep typing to speak again.");
        else setStatus("ok", "Live: spoken. Keep typing.");
        break;
      case "error":
        setStatus("error", event.error.message);
        break;
      default:
        break;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Result: replay and download
  // ---------------------------------------------------------------------------------------

  function joinedPcm(run) {
    const all = new Int16Array(run.samples);
    let offset = 0;
    for (const part of run.chunks) {
      all.set(part, offset);
      offset += part.length;
    }
    return all;
  }

  function wavBlob(pcm, sampleRate) {
    const header = new DataView(new ArrayBuffer(44));
    const text = (offset, s) => { for (let i = 0; i < s.length; i++) header.setUint8(offset + i, s.charCodeAt(i)); };
    text(0, "RIFF");
    header.setUint32(4, 36 + pcm.byteLength, true);
    text(8, "WAVE");
    text(12, "fmt ");
    header.setUint32(16, 16, true);
    header.setUint16(20, 1, true); // PCM
    header.setUint16(22, 1, true); // mono
    header.setUint32(24, sampleRate, true);
    header.setUint32(28, sampleRate * 2, true);
    header.setUint16(32, 2, true);
    header.setUint16(34, 16, true);
    text(36, "data");
    header.setUint32(40, pcm.byteLength, true);
    return new Blob([header, pcm], { type: "audio/wav" });
  }

  function prepareResult(run) {
    const pcm = joinedPcm(run);
    if (app.playerUrl) URL.revokeObjectURL(app.playerUrl);
    app.playerUrl = URL.createObjectURL(wavBlob(pcm, run.sampleRate));
    el.player.src = app.playerUrl;
    el.replay.hidden = false;
    prepareDownload(run, pcm);
  }

  async function prepareDownload(run, pcm) {
    const format = el.format.value;
    const link = el.download;
    link.setAttribute("aria-disabled", "true");
    link.dataset.format = "";
    link.textContent = `Preparing ${format.toUpperCase()}…`;
    let blob;
    try {
      if (format === "wav") {
        blob = wavBlob(pcm, run.sampleRate);
      } else {
        const response = await api(`playground/encode?format=${format}&sample_rate=${run.sampleRate}`, {
          method: "POST", body: pcm, headers: { "Content-Type": "audio/pcm" },
        });
        blob = await response.blob();
      }
    } catch (error) {
      link.textContent = "Download failed";
      setStatus("error", `Cannot encode ${format}: ${error.message}`);
      return;
    }
    if (app.run !== run || el.format.value !== format) return; // a newer result or format won
    if (app.downloadUrl) URL.revokeObjectURL(app.downloadUrl);
    app.downloadUrl = URL.createObjectURL(blob);
    const stamp = new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);
    link.href = app.downloadUrl;
    link.download = `cosyserve-${run.voice}-${stamp}.${EXTENSIONS[format] || format}`;
    link.dataset.format = format;
    link.dataset.bytes = String(blob.size);
    link.removeAttribute("aria-disabled");
    link.textContent = `Download ${format.toUpperCase()} (${formatBytes(blob.size)})`;
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  // ---------------------------------------------------------------------------------------
  // Cloning
  // ---------------------------------------------------------------------------------------

  async function saveVoice() {
    const name = el.cloneName.value.trim();
    const file = el.cloneAudio.files && el.cloneAudio.files[0];
    const show = (kind, message) => {
      el.cloneStatus.hidden = false;
      el.cloneStatus.dataset.kind = kind;
      el.cloneStatus.textContent = message;
    };
    if (!name) { show("error", "Give the voice a name."); el.cloneName.focus(); return; }
    if (!file) { show("error", "Choose a prompt recording."); el.cloneAudio.focus(); return; }
    const body = new FormData();
    body.append("name", name);
    body.append("audio", file, file.name);
    const transcript = el.cloneTranscript.value.trim();
    if (transcript) body.append("transcript", transcript);
    show("busy", `Saving ${name}…`);
    el.cloneFieldset.disabled = true;
    try {
      const saved = await (await api("v1/voices", { method: "POST", body })).json();
      const voices = await (await api("list_voices")).json();
      fillVoices(voices.voices || [], saved.id);
      show("ok", `Saved “${saved.id}”. It is selected as the voice above.`);
      el.cloneForm.reset();
    } catch (error) {
      show("error", error.message);
    } finally {
      el.cloneFieldset.disabled = false;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Wiring
  // ---------------------------------------------------------------------------------------

  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (live.ws) liveSend({ type: "end" }); // speak the unfinished sentence now
    else speak();
  });
  el.text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      if (!el.speak.disabled) speak();
    }
  });
  el.text.addEventListener("input", () => { updateCharCount(); if (live.ws) sendTyped(); });
  el.live.addEventListener("change", () => { if (el.live.checked) startLive(); else stopLive(); });
  for (const control of [el.voice, el.speed]) {
    control.addEventListener("change", () => { if (live.ws) startLive(); }); // a new voice: a new session
  }
  el.stop.addEventListener("click", () => {
    if (live.ws) {
      liveSend({ type: "cancel" });
      stopPlayback();
      live.run.scheduled = [];
      live.run.sources = [];
      live.run.nextTime = 0;
      startTicker();
      setStatus("info", "Stopped. Keep typing to speak again.");
      return;
    }
    stopPlayback();
    if (document.body.dataset.state === "synthesising") setState("stopped");
    el.stop.disabled = true;
    setStatus("info", "Stopped.");
  });
  el.speed.addEventListener("input", () => { el.speedValue.textContent = `${Number(el.speed.value).toFixed(2)}×`; });
  el.format.addEventListener("change", () => {
    const run = app.run;
    if (run && run.done && run.samples) prepareDownload(run, joinedPcm(run));
  });
  el.download.addEventListener("click", (event) => {
    if (el.download.getAttribute("aria-disabled") === "true") event.preventDefault();
  });
  el.cloneForm.addEventListener("submit", (event) => { event.preventDefault(); saveVoice(); });
  el.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = el.key.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    connect();
  });
  el.keyClear.addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    el.key.value = "";
    connect();
  });

  el.key.value = localStorage.getItem(KEY_STORAGE) || "";
  updateCharCount();
  connect();
})();
