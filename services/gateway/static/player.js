// The HiStream Serve player: a streaming session over the WebSocket API (/v1/sessions), played
// as it arrives through Media Source Extensions (the init segment, then one fMP4 media segment
// per chunk), and the tenant's finished videos (/v1/videos). No build step, no dependencies.
// `window.histream` holds what the page saw, for people in the console and for the browser test.
"use strict";

const config = JSON.parse(document.getElementById("config").textContent);
// every API path is relative to the page, so the page works under a route prefix too
const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const $ = (id) => document.getElementById(id);
const video = $("video");

const state = (window.histream = {
  status: "idle", // idle | connecting | queued | streaming | ended | failed
  sessionId: null,
  promptVersion: null,
  chunks: [], // one entry per chunk appended: index, prompt_version, frames, buffered_end, ...
  events: [], // every JSON event, in order
  errors: [],
  accepted: [], // prompt.accepted events
  applied: [], // prompt.applied events
  endReason: null,
});

let ws = null;
let session = null; // the MSE side of the running session

function log(text, isError = false) {
  const line = document.createElement("div");
  line.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (isError) line.className = "error";
  $("log").prepend(line);
}

function setStatus(status) {
  state.status = status;
  $("status").textContent = status;
  const live = ["connecting", "queued", "streaming"].includes(status);
  $("start").disabled = live;
  $("stop").disabled = !live;
  $("change").disabled = status !== "streaming";
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// avcC's profile, compatibility and level bytes give the codec string MSE asks for.
function codecOf(init) {
  const bytes = new Uint8Array(init);
  for (let i = 4; i + 8 < bytes.length; i++) {
    if (bytes[i] === 0x61 && bytes[i + 1] === 0x76 && bytes[i + 2] === 0x63 && bytes[i + 3] === 0x43) {
      const hex = (b) => b.toString(16).padStart(2, "0");
      return `avc1.${hex(bytes[i + 5])}${hex(bytes[i + 6])}${hex(bytes[i + 7])}`;
    }
  }
  return "avc1.64001f";
}

// Appends segments to one SourceBuffer in order, one at a time (MSE allows one update at once).
class Playback {
  constructor() {
    this.media = new MediaSource();
    this.queue = [];
    this.buffer = null;
    this.ended = false;
    this.opened = new Promise((resolve) => this.media.addEventListener("sourceopen", resolve, { once: true }));
    video.src = URL.createObjectURL(this.media);
  }

  async init(data) {
    await this.opened;
    const type = `video/mp4; codecs="${codecOf(data)}"`;
    if (!MediaSource.isTypeSupported(type)) throw new Error(`this browser cannot play ${type}`);
    this.buffer = this.media.addSourceBuffer(type);
    this.buffer.addEventListener("updateend", () => this.next());
    this.push(data, null);
  }

  push(data, chunk) {
    this.queue.push({ data, chunk });
    this.next();
  }

  next() {
    if (!this.buffer || this.buffer.updating) return;
    const done = this.current;
    this.current = null;
    if (done && done.chunk) appended(done.chunk);
    const item = this.queue.shift();
    if (item) {
      this.current = item;
      this.buffer.appendBuffer(item.data);
    } else if (this.ended && this.media.readyState === "open") {
      this.media.endOfStream();
    }
  }

  end() {
    this.ended = true;
    this.next();
  }
}

function bufferedEnd() {
  const ranges = video.buffered;
  return ranges.length ? ranges.end(ranges.length - 1) : 0;
}

// A chunk's segment is in the buffer: play, and record what the video element says.
function appended(chunk) {
  const now = performance.now();
  const previous = state.chunks[state.chunks.length - 1];
  const latency = now - (previous ? previous.appended_at : state.startedAt);
  state.chunks.push({
    index: chunk.index,
    prompt_version: chunk.prompt_version,
    frames: chunk.num_frames,
    buffered_end: bufferedEnd(),
    current_time: video.currentTime,
    appended_at: now,
    latency_ms: latency,
  });
  if (video.paused) video.play().catch((err) => log(`play: ${err.message}`, true));
  const recent = state.chunks.slice(-8);
  const span = (recent[recent.length - 1].appended_at - (recent.length > 1 ? recent[0].appended_at : state.startedAt)) / 1000;
  const frames = recent.slice(recent.length > 1 ? 1 : 0).reduce((n, c) => n + c.frames, 0);
  $("chunks").textContent = String(state.chunks.length);
  $("latency").textContent = `${latency.toFixed(0)} ms`;
  $("fps").textContent = span > 0 ? (frames / span).toFixed(1) : "–";
  $("version").textContent = String(chunk.prompt_version);
}

function startMessage() {
  const message = { type: "start", prompt: $("prompt").value.trim(), mode: $("mode").value };
  const size = $("size").value.trim();
  if (size) message.size = size;
  if ($("seed").value !== "") message.seed = Number($("seed").value);
  if ($("frames").value !== "") message.num_frames = Number($("frames").value);
  const key = $("api-key").value.trim();
  if (key) message.api_key = key; // browsers cannot set headers on a WebSocket
  return message;
}

function start(event) {
  event.preventDefault();
  if (ws) return;
  Object.assign(state, { sessionId: null, promptVersion: null, chunks: [], events: [], errors: [],
    accepted: [], applied: [], endReason: null, startedAt: performance.now() });
  ["chunks", "latency", "fps", "version", "session"].forEach((id) => ($(id).textContent = "–"));
  if (config.tenancy) localStorage.setItem("histream-api-key", $("api-key").value.trim());
  setStatus("connecting");
  session = new Playback();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${scheme}//${location.host}${base}v1/sessions`);
  ws.binaryType = "arraybuffer";
  let pending = null; // the JSON event whose media is the next binary message
  ws.onopen = () => ws.send(JSON.stringify(startMessage()));
  ws.onmessage = (message) => {
    if (typeof message.data !== "string") {
      const event = pending;
      pending = null;
      if (event && event.type === "init") session.init(message.data).catch(fail);
      else if (event && event.type === "chunk") session.push(message.data, event);
      return;
    }
    const event = JSON.parse(message.data);
    state.events.push(event);
    if (event.bytes !== undefined) pending = event;
    handle(event);
  };
  ws.onclose = () => {
    ws = null;
    if (["connecting", "queued", "streaming"].includes(state.status)) setStatus(state.errors.length ? "failed" : "ended");
    session.end();
  };
}

function handle(event) {
  switch (event.type) {
    case "queued":
      setStatus("queued");
      log(`queued: position ${event.position}`);
      break;
    case "session.started":
      state.sessionId = event.session_id;
      state.promptVersion = 0;
      $("session").textContent = event.session_id;
      setStatus("streaming");
      log(`started ${event.width}x${event.height} ${event.mode}, ` +
        (event.endless ? `endless (at most ${event.num_chunks} chunks)` : `${event.num_chunks} chunks`));
      break;
    case "prompt.accepted":
      state.accepted.push(event);
      log(`prompt ${event.prompt_version} accepted, from chunk ${event.from_chunk}`);
      break;
    case "prompt.applied":
      state.applied.push(event);
      state.promptVersion = event.prompt_version;
      log(`prompt ${event.prompt_version} applies from chunk ${event.from_chunk}`);
      break;
    case "session.ended":
      state.endReason = event.reason;
      setStatus("ended");
      log(`ended: ${event.reason}`);
      refreshGallery();
      break;
    case "error":
      state.errors.push(event);
      log(`error ${event.code}: ${event.message}`, true);
      break;
  }
}

function fail(err) {
  state.errors.push({ code: "player", message: err.message });
  log(err.message, true);
  if (ws) ws.close();
  setStatus("failed");
}

function stop() {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "close" }));
}

function changePrompt(event) {
  event.preventDefault();
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(JSON.stringify({
    type: "prompt",
    prompt: $("new-prompt").value.trim(),
    transition_chunks: Number($("transition").value || 1),
    interpolation: $("interpolation").value,
  }));
}

// -- the gallery: the tenant's finished videos ----------------------------------------------

async function fetchOk(path) {
  const response = await fetch(base + path, { headers: authHeaders() });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error((body.error && body.error.message) || `${response.status} ${response.statusText}`);
  }
  return response;
}

async function contentUrl(id) {
  const response = await fetchOk(`v1/videos/${encodeURIComponent(id)}/content`);
  return URL.createObjectURL(await response.blob());
}

async function refreshGallery() {
  const list = $("gallery");
  try {
    const page = await (await fetchOk("v1/videos?limit=24")).json();
    list.replaceChildren();
    for (const item of page.data.filter((v) => v.status === "completed")) {
      const li = document.createElement("li");
      const title = document.createElement("p");
      title.textContent = item.prompt || item.id;
      title.title = `${item.id} · ${item.size} · ${item.seconds} s`;
      const play = document.createElement("button");
      play.textContent = "Play";
      play.onclick = async () => {
        const player = $("gallery-video");
        player.src = await contentUrl(item.id).catch((err) => log(err.message, true));
        player.hidden = false;
        player.play().catch(() => {});
      };
      const download = document.createElement("button");
      download.textContent = "Download";
      download.onclick = async () => {
        const link = document.createElement("a");
        link.href = await contentUrl(item.id);
        link.download = `${item.id}.mp4`;
        link.click();
      };
      li.append(title, play, " ", download);
      list.append(li);
    }
    if (!list.children.length) list.textContent = "No finished videos yet.";
  } catch (err) {
    list.textContent = `Could not list videos: ${err.message}`;
  }
}

function setUp() {
  $("model").textContent = `${config.model} · preset ${config.preset}`;
  for (const mode of config.modes) {
    const option = document.createElement("option");
    option.value = option.textContent = mode;
    $("mode").append(option);
  }
  $("mode").value = config.default_mode;
  $("size").value = config.size;
  $("size").placeholder = `up to ${config.max_size}`;
  $("frames").placeholder = `endless (or up to ${config.max_num_frames})`;
  $("frames").max = String(config.max_num_frames);
  $("prompt").value = config.example_prompt;
  $("key-field").hidden = !config.tenancy;
  if (config.tenancy) $("api-key").value = localStorage.getItem("histream-api-key") || "";
  $("start-form").addEventListener("submit", start);
  $("stop").addEventListener("click", stop);
  $("prompt-form").addEventListener("submit", changePrompt);
  $("refresh").addEventListener("click", refreshGallery);
  setStatus("idle");
  refreshGallery();
}

setUp();
