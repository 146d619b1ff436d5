// omnivox web client: speaks only the realtime protocol (OpenAI Realtime GA events).
// Microphone -> AudioWorklet -> 24 kHz PCM16 -> input_audio_buffer.append;
// response.output_audio.delta -> jitter-buffered AudioWorklet playback.

const SESSION_RATE = 24000;
const $ = (id) => document.getElementById(id);

// What tests (and curious people) can read from the console.
const stats = (window.omnivoxStats = {
  state: "idle", sessionCreated: false, demo: null, speechStarted: 0, responses: 0, audioDeltas: 0,
  scheduledSamples: 0, playedSamples: 0, interrupts: 0, cancelled: 0, lastTtfaMs: null, errors: [],
  imagesAccepted: null, imagesSent: 0, tasks: [], sessionUpdates: 0,
  turnDetection: null, // audio.input.turn_detection as the server last reported it (session.created/updated)
});
const MAX_IMAGE_SIDE = 1024; // pictures are re-encoded as JPEG at most this large (CLIP sees 224 px)

let ws = null;
let ctx = null;
let mic = null;
let capture = null;
let player = null;
let wantConnected = false;
let backoffMs = 500;
let pendingPcm = [];
let pendingSamples = 0;
let current = null; // { responseId, itemId, el, playedAtStart, sentSamples }
let speechStoppedAt = null;
const userLines = new Map(); // item_id -> transcript line, filled in when the transcription arrives

function setStatus(text, state) {
  stats.state = state;
  const el = $("status");
  el.textContent = text;
  el.dataset.state = state;
}

function addLine(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("transcript").appendChild(li);
  li.scrollIntoView({ block: "end" });
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

async function startAudio() {
  ctx = new AudioContext({ latencyHint: "interactive" });
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
  player.port.onmessage = (e) => { stats.playedSamples = e.data.played; };
  player.connect(ctx.destination);
  if (ctx.state === "suspended") await ctx.resume();
}

function stopAudio() {
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  ctx = mic = capture = player = null;
}

function onMicFrame(frame) {
  let sum = 0;
  for (let i = 0; i < frame.length; i++) sum += frame[i] * frame[i];
  $("level").value = Math.min(1, Math.sqrt(sum / frame.length) * 4);
  if (!ws || ws.readyState !== WebSocket.OPEN || !stats.sessionCreated) return;
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

function playedMsOfCurrent() {
  if (!current || !ctx) return 0;
  return Math.max(0, ((stats.playedSamples - current.playedAtStart) / ctx.sampleRate) * 1000);
}

function stopPlayback(reason) {
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

// Any drawable (video frame, decoded picture) -> a JPEG data URL no larger than MAX_IMAGE_SIDE.
function toJpegDataUrl(source, width, height) {
  const scale = Math.min(1, MAX_IMAGE_SIDE / Math.max(width, height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  canvas.getContext("2d").drawImage(source, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.9);
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
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function onEvent(ev) {
  switch (ev.type) {
    case "session.created":
      stats.sessionCreated = true;
      stats.demo = !!(ev.session.omnivox && ev.session.omnivox.demo_checkpoint);
      $("demo").hidden = !stats.demo;
      stats.imagesAccepted = !!(ev.session.omnivox && ev.session.omnivox.images);
      setImagesEnabled(stats.imagesAccepted);
      send({ type: "session.update", session: {
        type: "realtime", output_modalities: ["audio"],
        audio: { input: { format: { type: "audio/pcm", rate: SESSION_RATE }, transcription: { model: "default" },
                          turn_detection: turnDetectionSetting() } },
        omnivox: { interrupt_mode: $("interrupt").value },
      } });
      showTurns(sessionTurns(ev.session));
      setStatus("live: speak now", "live");
      backoffMs = 500;
      break;
    case "session.updated":
      stats.sessionUpdates += 1;
      showTurns(sessionTurns(ev.session));
      break;
    case "input_audio_buffer.speech_started":
      stats.speechStarted += 1;
      stopPlayback("speech_started");
      current = null;
      setStatus("listening...", "live");
      break;
    case "input_audio_buffer.speech_stopped":
      speechStoppedAt = performance.now();
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
      current = { responseId: ev.response.id, itemId: null, el: addLine("assistant", ""),
                  playedAtStart: stats.playedSamples, sentSamples: 0, firstAudio: false };
      $("cancel").disabled = false;
      break;
    case "response.output_item.added":
      if (current) current.itemId = ev.item.id;
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      if (current && ev.response_id === current.responseId) current.el.textContent += ev.delta;
      break;
    case "response.output_audio.delta": {
      if (!current || ev.response_id !== current.responseId || !player) break;
      if (!current.firstAudio) {
        current.firstAudio = true;
        current.playedAtStart = stats.playedSamples;
        if (speechStoppedAt !== null) {
          stats.lastTtfaMs = Math.round(performance.now() - speechStoppedAt);
          $("ttfa").textContent = `first audio ${stats.lastTtfaMs} ms after you stopped`;
        }
        setStatus("speaking (say \"stop omni\" to interrupt)", "live");
      }
      const samples = resample(base64ToFloat(ev.delta), SESSION_RATE, ctx.sampleRate);
      const n = samples.length; // read before the buffer is transferred to the worklet
      player.port.postMessage(samples, [samples.buffer]);
      stats.audioDeltas += 1;
      stats.scheduledSamples += n;
      current.sentSamples += n;
      break;
    }
    case "omnivox.interrupt":
      stats.interrupts += 1;
      stopPlayback("interrupt");
      break;
    case "response.done": {
      const r = ev.response;
      $("cancel").disabled = true;
      if (r.omnivox && r.omnivox.task) stats.tasks.push(r.omnivox.task);
      if (r.status === "cancelled") {
        stats.cancelled += 1;
        stopPlayback("cancelled");
        current = null;
      }
      if (r.omnivox && r.omnivox.ttfa_ms) {
        $("ttfa").textContent += ` (server: ${Math.round(r.omnivox.ttfa_ms)} ms)`;
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

function connect() {
  const key = $("apikey").value.trim();
  const protocols = ["realtime"];
  if (key) protocols.push("openai-insecure-api-key." + key);
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime?model=omnivox`;
  setStatus("connecting...", "connecting");
  stats.sessionCreated = false;
  ws = new WebSocket(url, protocols);
  ws.onmessage = (m) => { if (typeof m.data === "string") onEvent(JSON.parse(m.data)); };
  ws.onclose = (e) => {
    stats.sessionCreated = false;
    showTurns(undefined);
    if (!wantConnected) { setStatus("not connected", "idle"); return; }
    const why = e.code === 1006 ? "connection lost" : `closed (${e.code}${e.reason ? ": " + e.reason : ""})`;
    setStatus(`${why}; reconnecting in ${(backoffMs / 1000).toFixed(1)} s`, "error");
    setTimeout(() => { if (wantConnected) connect(); }, backoffMs);
    backoffMs = Math.min(backoffMs * 2, 15000);
  };
}

$("start").onclick = async () => {
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
  stopCamera();
  setImagesEnabled(false);
  if (ws) ws.close(1000, "bye");
  stopAudio();
  $("start").disabled = false;
  $("stop").disabled = true;
  $("cancel").disabled = true;
};

$("cancel").onclick = () => {
  send({ type: "response.cancel" });
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
