// omnivox web client: speaks only the realtime protocol (OpenAI Realtime GA events).
// Default: a WebRTC call as OpenAI's browser flow (POST /v1/realtime/calls with an SDP offer;
// the microphone and the answer on one Opus track; events on the "oai-events" data channel).
// Fallback: the WebSocket, with the audio as base64 PCM16 in events:
// microphone -> AudioWorklet -> 24 kHz PCM16 -> input_audio_buffer.append;
// response.output_audio.delta -> jitter-buffered AudioWorklet playback.

import { Timeline } from "./timeline.js";

const SESSION_RATE = 24000;
const TICK_MS = 50; // timeline and stop detection
const AUDIBLE = 0.01; // RMS of the played answer above which it counts as sound
const QUIET_MS = 250; // silence that long after an interrupt: the audio has stopped
const STOP_GIVE_UP_MS = 5000; // still sounding this long after an interrupt: it did not stop
const CONNECT_TIMEOUT_MS = 10000;
const $ = (id) => document.getElementById(id);

// What tests (and curious people) can read from the console.
const stats = (window.omnivoxStats = {
  state: "idle", sessionCreated: false, demo: null, speechStarted: 0, responses: 0, audioDeltas: 0,
  scheduledSamples: 0, playedSamples: 0, interrupts: 0, cancelled: 0, lastTtfaMs: null, ttfas: [], errors: [],
  imagesAccepted: null, imagesSent: 0, tasks: [], statuses: [], sessionUpdates: 0,
  turnDetection: null, // audio.input.turn_detection as the server last reported it (session.created/updated)
  transport: null, // "webrtc" or "websocket", once connected
  credential: null, // where the secret came from: "demo", "settings" or "none"
  fallbacks: [], // why WebRTC was given up for the WebSocket
  extensions: false, audioUnlocked: false, marks: [], outputBuffer: [], // output_audio_buffer.* events seen (WebRTC)
});
const MAX_IMAGE_SIDE = 1024; // pictures are re-encoded as JPEG at most this large (CLIP sees 224 px)

let conn = null; // the live transport: { kind, send(event), close() }
let attempt = 0; // each connect() bumps it; events of an older transport are ignored
let ctx = null;
let mic = null;
let capture = null;
let player = null;
let meter = null;
let wantConnected = false;
let backoffMs = 500;
let pendingPcm = [];
let pendingSamples = 0;
let current = null; // { responseId, itemId, el, playedAtStart, sentSamples, createdAt }
let speechStoppedAt = null;
let awaitingFirstAudio = false;
let lastAudibleAt = -Infinity;
let responseActive = false;
let serverTtfaMs = null;
let remoteSource = null;
const userLines = new Map(); // item_id -> transcript line, filled in when the transcription arrives
const answerLines = new Map(); // response_id -> the answer's line
const timeline = new Timeline($("timeline"));

function setStatus(text, state) {
  stats.state = state;
  const el = $("status");
  el.textContent = text;
  el.dataset.state = state;
}

function showTransport(kind) {
  stats.transport = kind;
  const el = $("transport");
  el.hidden = !kind;
  el.textContent = kind === "webrtc" ? "WebRTC" : kind === "websocket" ? "WebSocket" : "";
}

function addLine(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  const list = $("transcript");
  list.appendChild(li);
  list.scrollTop = list.scrollHeight; // scrolls the list, never the page (the phone keeps its controls)
  return li;
}

// ---------- turn detection ----------

// The session's audio.input.turn_detection from the Settings selects.
function turnDetectionSetting() {
  if ($("turn-detection").value === "semantic_vad") return { type: "semantic_vad", eagerness: $("eagerness").value };
  return { type: "server_vad", silence_duration_ms: 500 };
}

// What the server says it does (never what the selects ask for): "turns: semantic (auto)".
function showTurns(td) {
  stats.turnDetection = td === undefined ? null : td;
  const el = $("turns");
  el.hidden = td === undefined;
  if (td === undefined) return;
  if (!td) el.textContent = "turns: manual";
  else if (td.type === "semantic_vad") el.textContent = `turns: semantic (${td.eagerness})`;
  else el.textContent = `turns: silence (${td.silence_duration_ms} ms)`;
}

function sessionTurns(session) {
  const input = session && session.audio && session.audio.input;
  return input ? input.turn_detection : undefined;
}

// ---------- audio helpers ----------

function resample(input, fromRate, toRate) {
  if (fromRate === toRate) return input;
  const n = Math.floor((input.length * toRate) / fromRate);
  const out = new Float32Array(n);
  const step = fromRate / toRate;
  for (let i = 0; i < n; i++) {
    const x = i * step;
    const j = Math.floor(x);
    const f = x - j;
    out[i] = input[j] * (1 - f) + (input[Math.min(j + 1, input.length - 1)] || 0) * f;
  }
  return out;
}

function floatToPcm16Base64(samples) {
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32767)));
  const bytes = new Uint8Array(pcm.buffer);
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

function base64ToFloat(b64) {
  const bin = atob(b64);
  const pcm = new Int16Array(bin.length / 2);
  for (let i = 0; i < pcm.length; i++) {
    const v = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
    pcm[i] = v >= 0x8000 ? v - 0x10000 : v;
  }
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  return out;
}

// Phones (iOS Safari, Chrome) play audio only after a user gesture: the first tap anywhere
// creates and resumes the AudioContext and starts the (still empty) answer element.
function unlockAudio() {
  if (!ctx) ctx = new AudioContext({ latencyHint: "interactive" });
  if (ctx.state === "suspended") ctx.resume();
  $("remote").play().catch(() => {}); // nothing to play yet; the call marks the element as user-started
  stats.audioUnlocked = ctx.state === "running" || stats.audioUnlocked;
  ctx.onstatechange = () => { stats.audioUnlocked = ctx && ctx.state === "running"; };
}
document.addEventListener("pointerdown", unlockAudio, { once: true, capture: true });

async function startAudio() {
  unlockAudio();
  await ctx.audioWorklet.addModule(new URL("worklets.js", import.meta.url));
  mic = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  });
  const source = ctx.createMediaStreamSource(mic);
  capture = new AudioWorkletNode(ctx, "omnivox-capture");
  capture.port.onmessage = (e) => onMicFrame(e.data);
  source.connect(capture);
  player = new AudioWorkletNode(ctx, "omnivox-player", {
    processorOptions: { prebufferSamples: Math.round(ctx.sampleRate * 0.1) }, // 100 ms jitter buffer
  });
  player.port.onmessage = (e) => {
    stats.playedSamples = e.data.played;
    if (e.data.level !== undefined) onOutputLevel(e.data.level);
  };
  player.connect(ctx.destination);
  if (ctx.state === "suspended") await ctx.resume();
}

function stopAudio() {
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  ctx = mic = capture = player = meter = remoteSource = null;
}

// The WebRTC answer plays through the <audio> element (what phones handle best); a meter on
// the same stream gives the page its playback clock (timeline, time to first audio, stop time).
function playRemote(stream) {
  const el = $("remote");
  el.srcObject = stream;
  el.play().catch((err) => console.warn("the answer cannot play yet:", err.message));
  if (!ctx) return;
  if (remoteSource) remoteSource.disconnect(); // the previous call's stream
  if (!meter) {
    meter = new AudioWorkletNode(ctx, "omnivox-meter");
    meter.port.onmessage = (e) => onOutputLevel(e.data);
  }
  remoteSource = ctx.createMediaStreamSource(stream);
  remoteSource.connect(meter);
}

function onMicFrame(frame) {
  let sum = 0;
  for (let i = 0; i < frame.length; i++) sum += frame[i] * frame[i];
  const level = Math.sqrt(sum / frame.length);
  $("level").value = Math.min(1, level * 4);
  timeline.micLevel(level);
  if (!conn || conn.kind !== "websocket" || !stats.sessionCreated) return; // WebRTC sends the track itself
  pendingPcm.push(frame);
  pendingSamples += frame.length;
  if (pendingSamples < ctx.sampleRate * 0.04) return; // send every ~40 ms
  const joined = new Float32Array(pendingSamples);
  let o = 0;
  for (const f of pendingPcm) { joined.set(f, o); o += f.length; }
  pendingPcm = [];
  pendingSamples = 0;
  send({ type: "input_audio_buffer.append", audio: floatToPcm16Base64(resample(joined, ctx.sampleRate, SESSION_RATE)) });
}

// ---------- the answer as played: time to first audio, the timeline, interrupts ----------

function onOutputLevel(level) {
  timeline.outLevel(level);
  if (level < AUDIBLE) return;
  const now = performance.now();
  lastAudibleAt = now;
  if (awaitingFirstAudio && current && current.createdAt >= speechStoppedAt) {
    awaitingFirstAudio = false;
    stats.lastTtfaMs = Math.round(now - speechStoppedAt);
    stats.ttfas.push(stats.lastTtfaMs);
    showTtfa();
    setStatus("speaking (say \"stop omni\" to interrupt)", "live");
  }
}

// Time to first audio: from the end of the user's turn (speech_stopped) to the first sound the
// page played, next to the server's own figure (to the first audio it sent).
function showTtfa() {
  const parts = [];
  if (stats.lastTtfaMs !== null) parts.push(`first audio ${stats.lastTtfaMs} ms after you stopped`);
  if (serverTtfaMs !== null) parts.push(`(server: ${serverTtfaMs} ms)`);
  $("ttfa").textContent = parts.join(" ");
}

function assistantActive(now) {
  return responseActive || now - lastAudibleAt < 500;
}

// A mark on the timeline; its stop time is measured from now to the last sound the page played.
function markInterrupt(label) {
  const m = timeline.mark(performance.now(), label);
  stats.marks.push({ label, stopMs: undefined });
  m.index = stats.marks.length - 1;
  return m;
}

function measureStops(now) {
  for (const m of timeline.marks) {
    if (m.stopMs !== undefined) continue;
    const lastSound = Math.max(lastAudibleAt, m.t);
    if (now - lastSound >= QUIET_MS) m.stopMs = Math.max(0, Math.round(lastAudibleAt - m.t));
    else if (now - m.t > STOP_GIVE_UP_MS) m.stopMs = null;
    else continue;
    stats.marks[m.index].stopMs = m.stopMs;
  }
}

setInterval(() => {
  const now = performance.now();
  timeline.tick(now);
  measureStops(now);
  timeline.draw(now);
  $("cancel").disabled = !(conn && assistantActive(now)); // while an answer runs or still sounds
}, TICK_MS);

function playedMsOfCurrent() {
  if (!current || !ctx) return 0;
  return Math.max(0, ((stats.playedSamples - current.playedAtStart) / ctx.sampleRate) * 1000);
}

function stopPlayback(reason) {
  if (conn && conn.kind === "webrtc") {
    // The server stops the track and knows what was played; the page only marks the text.
    if (current && current.el && performance.now() - lastAudibleAt < 500) current.el.classList.add("interrupted");
    console.info("playback stopped:", reason);
    return;
  }
  if (!player) return;
  player.port.postMessage("flush");
  const heard = current ? stats.playedSamples - current.playedAtStart : 0;
  // Only an answer still playing was cut: one already heard to the end needs no truncation.
  if (current && current.sentSamples > 0 && heard < current.sentSamples - 0.05 * (ctx ? ctx.sampleRate : 48000)) {
    // Tell the server what the user actually heard.
    send({ type: "conversation.item.truncate", item_id: current.itemId, content_index: 0,
           audio_end_ms: Math.round(playedMsOfCurrent()) });
    if (current.el) {
      // The text runs ahead of the audio: show the share of it that was heard, as the server keeps.
      const text = current.el.textContent;
      current.el.textContent = text.slice(0, Math.round((text.length * heard) / current.sentSamples));
      current.el.classList.add("interrupted");
    }
  }
  if (reason) console.info("playback stopped:", reason);
}

// ---------- images (Mini-Omni2) ----------

let cameraStream = null;

function setImagesEnabled(on) {
  $("images").hidden = !on;
  $("camera").disabled = !on;
  $("picture").disabled = !on;
}

// Any drawable (video frame, decoded picture) -> a JPEG data URL no larger than MAX_IMAGE_SIDE,
// smaller when the transport limits a message's size (a WebRTC data channel: often 64 KiB).
function toJpegDataUrl(source, width, height) {
  const limit = (conn && conn.maxMessageBytes) || Infinity;
  let url = "";
  for (const [side, quality] of [[MAX_IMAGE_SIDE, 0.9], [768, 0.8], [512, 0.75], [384, 0.7], [256, 0.6]]) {
    const scale = Math.min(1, side / Math.max(width, height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(width * scale));
    canvas.height = Math.max(1, Math.round(height * scale));
    canvas.getContext("2d").drawImage(source, 0, 0, canvas.width, canvas.height);
    url = canvas.toDataURL("image/jpeg", quality);
    if (url.length + 1024 <= limit) break; // room for the rest of the event
  }
  return url;
}

// OpenAI Realtime's way to send an image: a user message with an input_image data URL.
function sendImage(dataUrl, label) {
  send({ type: "conversation.item.create", item: { type: "message", role: "user",
    content: [{ type: "input_image", image_url: dataUrl }] } });
  stats.imagesSent += 1;
  const li = addLine("user image", `${label}: your next turn is answered about it`);
  const img = document.createElement("img");
  img.src = dataUrl;
  img.alt = label;
  li.appendChild(img);
}

async function cameraSnapshot() {
  const video = $("camera-view");
  if (!cameraStream) {
    cameraStream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
    video.srcObject = cameraStream;
    video.hidden = false;
    await video.play();
  }
  if (!video.videoWidth) await new Promise((ok) => video.addEventListener("loadeddata", ok, { once: true }));
  sendImage(toJpegDataUrl(video, video.videoWidth, video.videoHeight), "camera snapshot");
}

function stopCamera() {
  if (cameraStream) cameraStream.getTracks().forEach((t) => t.stop());
  cameraStream = null;
  $("camera-view").hidden = true;
}

async function sendPictureFile(file) {
  const bitmap = await createImageBitmap(file); // the browser decodes it; broken files throw here
  sendImage(toJpegDataUrl(bitmap, bitmap.width, bitmap.height), file.name);
  bitmap.close();
}

// ---------- protocol ----------

function send(event) {
  if (conn) conn.send(event);
}

function onEvent(ev) {
  const t = performance.now();
  switch (ev.type) {
    case "session.created": {
      stats.sessionCreated = true;
      stats.extensions = !!ev.session.omnivox; // an omnivox server: our session.update turns them on
      stats.demo = !!(ev.session.omnivox && ev.session.omnivox.demo_checkpoint);
      $("demo").hidden = !stats.demo;
      stats.imagesAccepted = !!(ev.session.omnivox && ev.session.omnivox.images);
      setImagesEnabled(stats.imagesAccepted);
      const input = { transcription: { model: "default" }, turn_detection: turnDetectionSetting() };
      // Over WebRTC the audio format is the call's (Opus); over the WebSocket the page sends PCM16.
      if (conn.kind === "websocket") input.format = { type: "audio/pcm", rate: SESSION_RATE };
      send({ type: "session.update", session: {
        type: "realtime", output_modalities: ["audio"], audio: { input },
        omnivox: { interrupt_mode: $("interrupt").value },
      } });
      showTurns(sessionTurns(ev.session));
      showTransport(conn.kind);
      setStatus("live: speak now", "live");
      backoffMs = 500;
      break;
    }
    case "session.updated":
      stats.sessionUpdates += 1;
      showTurns(sessionTurns(ev.session));
      break;
    case "input_audio_buffer.speech_started":
      stats.speechStarted += 1;
      timeline.speechStarted(t);
      // An omnivox server names its interrupts (omnivox.interrupt, right after this event); for
      // any other server, speech_started while the answer sounds is the barge-in.
      if (!stats.extensions && t - lastAudibleAt < 150) markInterrupt("barge-in");
      stopPlayback("speech_started");
      current = null;
      setStatus("listening...", "live");
      break;
    case "input_audio_buffer.speech_stopped":
      speechStoppedAt = t;
      awaitingFirstAudio = true;
      serverTtfaMs = null;
      timeline.speechStopped(t);
      setStatus("thinking...", "live");
      break;
    case "conversation.item.input_audio_transcription.completed": {
      const li = userLines.get(ev.item_id);
      if (li) li.textContent = ev.transcript || "(you spoke)";
      else addLine("user", ev.transcript);
      break;
    }
    case "input_audio_buffer.committed":
      userLines.set(ev.item_id, addLine("user", "(you spoke)"));
      break;
    case "response.created":
      stats.responses += 1;
      responseActive = true;
      answerLines.clear(); // one answer at a time: an older one's line is final
      timeline.speechStopped(t); // answering: the user's turn is over (if its end went unreported)
      current = { responseId: ev.response.id, itemId: null, el: addLine("assistant", ""),
                  playedAtStart: stats.playedSamples, sentSamples: 0, firstAudio: false, createdAt: t };
      answerLines.set(ev.response.id, current.el);
      break;
    case "response.output_audio_transcript.done": {
      // Over WebRTC the server knows what was played: an interrupted answer keeps what was heard.
      const el = answerLines.get(ev.response_id);
      if (el && conn && conn.kind === "webrtc" && typeof ev.transcript === "string") el.textContent = ev.transcript;
      answerLines.delete(ev.response_id);
      break;
    }
    case "response.output_item.added":
      if (current) current.itemId = ev.item.id;
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      if (current && ev.response_id === current.responseId) current.el.textContent += ev.delta;
      break;
    case "response.output_audio.delta": { // WebSocket only: WebRTC carries the answer on the track
      if (!current || ev.response_id !== current.responseId || !player) break;
      if (!current.firstAudio) {
        current.firstAudio = true;
        current.playedAtStart = stats.playedSamples;
      }
      const samples = resample(base64ToFloat(ev.delta), SESSION_RATE, ctx.sampleRate);
      const n = samples.length; // read before the buffer is transferred to the worklet
      player.port.postMessage(samples, [samples.buffer]);
      stats.audioDeltas += 1;
      stats.scheduledSamples += n;
      current.sentSamples += n;
      break;
    }
    case "output_audio_buffer.started":
    case "output_audio_buffer.stopped":
    case "output_audio_buffer.cleared":
      stats.outputBuffer.push(ev.type.slice("output_audio_buffer.".length));
      break;
    case "omnivox.interrupt":
      stats.interrupts += 1;
      markInterrupt(ev.phrase || "barge-in"); // the phrase heard; "" in interrupt mode vad
      stopPlayback("interrupt");
      break;
    case "response.done": {
      const r = ev.response;
      responseActive = false;
      if (r.omnivox && r.omnivox.task) stats.tasks.push(r.omnivox.task);
      stats.statuses.push(r.status);
      if (r.status === "cancelled") {
        stats.cancelled += 1;
        stopPlayback("cancelled");
        current = null;
      }
      if (r.omnivox && r.omnivox.ttfa_ms) {
        serverTtfaMs = Math.round(r.omnivox.ttfa_ms);
        showTtfa();
      }
      setStatus("live: speak now", "live");
      break;
    }
    case "error":
      stats.errors.push(ev.error.code);
      console.warn("server error", ev.error);
      if (ev.error.code === "invalid_image" || ev.error.code === "image_not_supported") {
        addLine("error", `picture refused: ${ev.error.message}`);
      }
      break;
  }
}

// ---------- connecting ----------

async function fetchWithTimeout(url, init, ms) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), ms);
  try {
    return await fetch(url, { ...init, signal: abort.signal });
  } finally {
    clearTimeout(timer);
  }
}

// A key or client secret typed in Settings wins; else a short-lived secret from the server's
// demo endpoint (404 unless its operator turned it on); else none (a server without a key).
// The server's real key is never part of the page.
async function credential() {
  const typed = $("apikey").value.trim();
  if (typed) return { secret: typed, source: "settings" };
  try {
    const res = await fetchWithTimeout("/v1/demo/client_secret", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" }, 5000);
    if (res.ok) {
      const body = await res.json();
      const value = body.value || (body.client_secret && body.client_secret.value);
      if (value) return { secret: value, source: "demo" };
    }
  } catch (err) {
    console.info("no demo client secret:", err.message);
  }
  return { secret: null, source: "none" };
}

// Waits (bounded) until the offer holds this browser's ICE candidates: the server then needs
// no trickle ICE. Host candidates take milliseconds; STUN ones may take longer.
function iceGathered(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((done) => {
    const timer = setTimeout(done, ms);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); done(); }
    });
  });
}

function waitOpen(dc, pc, ms) {
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error("the data channel did not open in time")), ms);
    dc.addEventListener("open", () => { clearTimeout(timer); ok(); }, { once: true });
    pc.addEventListener("connectionstatechange", () => {
      if (pc.connectionState === "failed") { clearTimeout(timer); fail(new Error("ICE failed")); }
    });
  });
}

// OpenAI's browser flow: POST the SDP offer to /v1/realtime/calls, set the SDP answer.
async function openWebRTC(secret, me) {
  if (typeof RTCPeerConnection === "undefined") throw new Error("this browser has no WebRTC");
  const pc = new RTCPeerConnection();
  const dc = pc.createDataChannel("oai-events");
  const t = { kind: "webrtc", maxMessageBytes: 65536, close: () => { dc.close(); pc.close(); },
              send: (ev) => { if (dc.readyState === "open") dc.send(JSON.stringify(ev)); } };
  conn = t; // events can arrive as soon as the channel opens
  dc.onmessage = (m) => { if (conn === t) onEvent(JSON.parse(m.data)); };
  try {
    pc.addTrack(mic.getAudioTracks()[0], mic);
    pc.ontrack = (e) => playRemote(e.streams[0] || new MediaStream([e.track]));
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, 2000);
    const headers = { "Content-Type": "application/sdp" };
    if (secret) headers.Authorization = `Bearer ${secret}`;
    const res = await fetchWithTimeout("/v1/realtime/calls", {
      method: "POST", headers, body: pc.localDescription.sdp }, CONNECT_TIMEOUT_MS);
    if (res.status !== 201 && res.status !== 200) {
      throw Object.assign(new Error(`POST /v1/realtime/calls answered ${res.status}`), { status: res.status });
    }
    await pc.setRemoteDescription({ type: "answer", sdp: await res.text() });
    await waitOpen(dc, pc, CONNECT_TIMEOUT_MS);
    if (pc.sctp && pc.sctp.maxMessageSize) t.maxMessageBytes = pc.sctp.maxMessageSize; // what both ends accept
  } catch (err) {
    t.close();
    if (conn === t) conn = null;
    throw err;
  }
  if (me !== attempt) { t.close(); return; }
  const lost = (why) => { if (conn === t) onTransportClosed(why); };
  dc.onclose = () => lost("call ended");
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "failed" || pc.connectionState === "closed") lost(`call ${pc.connectionState}`);
  };
}

function openWebSocket(secret) {
  const protocols = ["realtime"];
  if (secret) protocols.push("openai-insecure-api-key." + secret);
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime?model=omnivox`;
  const ws = new WebSocket(url, protocols);
  const t = { kind: "websocket", close: () => ws.close(1000, "bye"),
              send: (ev) => { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(ev)); } };
  conn = t;
  ws.onmessage = (m) => { if (conn === t && typeof m.data === "string") onEvent(JSON.parse(m.data)); };
  ws.onclose = (e) => {
    if (conn !== t) return;
    onTransportClosed(e.code === 1006 ? "connection lost" : `closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
  };
}

async function connect() {
  const me = ++attempt;
  setStatus("connecting...", "connecting");
  stats.sessionCreated = false;
  if ($("connection").value === "webrtc") {
    try {
      const cred = await credential();
      stats.credential = cred.source;
      if (me !== attempt) return;
      await openWebRTC(cred.secret, me);
      return;
    } catch (err) {
      if (me !== attempt) return;
      if (err.status === 401) { refused(); return; } // the WebSocket would refuse it too
      stats.fallbacks.push(err.message);
      console.warn("WebRTC failed; falling back to the WebSocket:", err.message);
    }
  }
  const cred = await credential(); // a client secret opens one session: the fallback takes a fresh one
  stats.credential = cred.source;
  if (me !== attempt) return;
  openWebSocket(cred.secret);
}

// A missing or wrong key: retrying cannot help; the user fixes Settings and starts again.
function refused() {
  $("stop").onclick();
  setStatus("refused: missing or wrong API key or client secret (see Settings)", "error");
}

function onTransportClosed(why) {
  conn = null;
  stats.sessionCreated = false;
  responseActive = false;
  showTurns(undefined);
  showTransport(null);
  if (!wantConnected) { setStatus("not connected", "idle"); return; }
  setStatus(`${why}; reconnecting in ${(backoffMs / 1000).toFixed(1)} s`, "error");
  setTimeout(() => { if (wantConnected && !conn) connect(); }, backoffMs);
  backoffMs = Math.min(backoffMs * 2, 15000);
}

$("start").onclick = async () => {
  unlockAudio(); // inside the tap: phones allow audio from here on
  $("start").disabled = true;
  try {
    await startAudio();
  } catch (err) {
    setStatus(`microphone unavailable: ${err.message}`, "error");
    $("start").disabled = false;
    return;
  }
  wantConnected = true;
  connect();
  $("stop").disabled = false;
};

$("stop").onclick = () => {
  wantConnected = false;
  attempt += 1; // a connect() still under way gives up
  stopCamera();
  setImagesEnabled(false);
  const t = conn;
  conn = null;
  if (t) t.close();
  onTransportClosed("hung up");
  stopAudio();
  $("remote").srcObject = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  $("cancel").disabled = true;
};

$("cancel").onclick = () => {
  if (assistantActive(performance.now())) markInterrupt("stop button");
  if (responseActive) send({ type: "response.cancel" }); // once generated, only its playback is left
  // As OpenAI's SDK: over WebRTC the server drops the answer's audio not yet played.
  if (conn && conn.kind === "webrtc") send({ type: "output_audio_buffer.clear" });
  stopPlayback("button");
};

$("interrupt").onchange = () => send({ type: "session.update", session: { type: "realtime",
  omnivox: { interrupt_mode: $("interrupt").value } } });

function onTurnSettingChange() {
  $("eagerness-row").hidden = $("turn-detection").value !== "semantic_vad";
  if (stats.sessionCreated) {
    send({ type: "session.update", session: { type: "realtime", audio: { input: { turn_detection: turnDetectionSetting() } } } });
  }
}
$("turn-detection").onchange = onTurnSettingChange;
$("eagerness").onchange = onTurnSettingChange;
$("eagerness-row").hidden = $("turn-detection").value !== "semantic_vad"; // a reload may keep the select's value

$("camera").onclick = () => cameraSnapshot().catch((err) => addLine("error", `camera unavailable: ${err.message}`));

$("picture").onchange = (e) => {
  const file = e.target.files[0];
  e.target.value = "";
  if (file) sendPictureFile(file).catch(() => addLine("error", `${file.name} is not a picture this browser can read`));
};
