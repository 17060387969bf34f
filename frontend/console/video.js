// WebRTC video from a robot (docs/console.md, "Planes" and "The robot side"): one RTCPeerConnection per viewer with a
// recvonly video transceiver and the unordered, unreliable data channel "teleop". aiortc does not trickle ICE, so the
// offer is sent once ICE gathering completed; the robot's answer comes back over the console socket.
//
// Pure helpers (decodeStamp, computeVideoStats, newSessionId) have no DOM dependency so node's test runner covers them.

import { backoffDelay } from "./socket.js";

// ---------------------------------------------------------------- the video stamp (agent --video-stamp)

// THE layout of the stamp the agent writes into each frame (robots/agent/media.py encode_stamp/decode_stamp,
// docs/console.md "Video"): `bits` square blocks in one row from (x0, y0), block size b = min(maxBlock, width / bits)
// (8 px, smaller only for frames narrower than 192 px), most significant bit first, white = 1. A bit is read from the
// block's centre (the middle half of its rows and columns; the whole block when b < 4): mean luma >= threshold.
// The value is the capture time, unix milliseconds mod 2^bits, in the robot's clock. Align here if the agent changes.
export const STAMP_LAYOUT = Object.freeze({
  bits: 24,
  maxBlock: 8,
  block: null, // a fixed block size in px; null: derived from the frame width as above
  x0: 0,
  y0: 0,
  threshold: 128, // mean luma >= threshold: bit 1
  ambiguity: 48, // strict mode: a centre mean within this of the threshold is not a stamp (a scene, not black/white)
});
export const STAMP_MODULO = 2 ** STAMP_LAYOUT.bits;

const luma = (r, g, b) => 0.299 * r + 0.587 * g + 0.114 * b;

/** The stamp's block size in px for a frame `width` px wide. */
export function stampBlock(width, layout = STAMP_LAYOUT) {
  if (layout.block) return layout.block;
  return Math.max(1, Math.min(layout.maxBlock, Math.floor(width / layout.bits)));
}

/**
 * Decodes the stamp from RGBA pixels (an ImageData, or its .data with `width` pixels per row).
 * Returns the value (unix ms mod 2^24), or null when a block is not clearly black or white (no stamp in the frame);
 * `{strict: false}` always returns a value, like the agent's decode_stamp.
 */
export function decodeStamp(imageData, width, layout = STAMP_LAYOUT, { strict = true } = {}) {
  const data = imageData && imageData.data ? imageData.data : imageData;
  const w = width ?? (imageData && imageData.width);
  if (!data || !w) return null;
  const height = Math.floor(data.length / 4 / w);
  const { bits, x0, y0, threshold, ambiguity } = layout;
  const b = stampBlock(w, layout);
  if (x0 + bits * b > w || y0 + b > height) return null;
  const [lo, hi] = b >= 4 ? [Math.floor(b / 4), b - Math.floor(b / 4)] : [0, b];
  let value = 0;
  for (let i = 0; i < bits; i++) {
    let sum = 0;
    let n = 0;
    for (let y = y0 + lo; y < y0 + hi; y++) {
      for (let x = x0 + i * b + lo; x < x0 + i * b + hi; x++) {
        const p = 4 * (y * w + x);
        sum += luma(data[p], data[p + 1], data[p + 2]);
        n++;
      }
    }
    const mean = sum / n;
    if (strict && Math.abs(mean - threshold) < ambiguity) return null;
    value = value * 2 + (mean >= threshold ? 1 : 0); // multiply, not <<: exact past 31 bits
  }
  return value;
}

/** Writes `value` as a stamp into RGBA pixels like the agent's encode_stamp (tests and a local preview use it). */
export function encodeStamp(data, width, value, layout = STAMP_LAYOUT) {
  const { bits, x0, y0 } = layout;
  const b = stampBlock(width, layout);
  value = ((value % 2 ** bits) + 2 ** bits) % 2 ** bits;
  for (let i = 0; i < bits; i++) {
    const bit = Math.floor(value / 2 ** (bits - 1 - i)) % 2;
    for (let y = y0; y < y0 + b; y++) {
      for (let x = x0 + i * b; x < x0 + (i + 1) * b; x++) {
        const p = 4 * (y * width + x);
        data[p] = data[p + 1] = data[p + 2] = bit ? 255 : 0;
        data[p + 3] = 255;
      }
    }
  }
  return data;
}

/** Glass-to-glass latency from a decoded stamp: (robot-clock now - stamp) mod 2^24, null if implausible (> 60 s). */
export function stampLatencyMs(stamp, robotNowMs, layout = STAMP_LAYOUT) {
  if (stamp === null || stamp === undefined) return null;
  const mod = 2 ** layout.bits;
  const latency = (((Math.round(robotNowMs) - stamp) % mod) + mod) % mod;
  return latency <= 60000 ? latency : null;
}

/** Reads the stamp of the frame a <video> shows now (null without a stamp or before the first frame). */
export function readStamp(video, canvas, layout = STAMP_LAYOUT) {
  if (!video || !video.videoWidth || video.readyState < 2) return null;
  const w = video.videoWidth;
  const h = Math.min(video.videoHeight, layout.y0 + stampBlock(w, layout));
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(video, 0, 0, w, h, 0, 0, w, h);
  return decodeStamp(ctx.getImageData(0, 0, w, h), w, layout);
}

// ---------------------------------------------------------------- stats

function statsList(report) {
  if (!report) return [];
  if (typeof report.values === "function") return [...report.values()];
  return Array.isArray(report) ? report : Object.values(report);
}

/**
 * Video and transport numbers from RTCPeerConnection.getStats(): fps (framesPerSecond, else the framesDecoded delta),
 * framesDecoded, rttMs (the selected candidate pair's currentRoundTripTime), and latencyMs, a receiver-side estimate
 * of the video delay: jitter buffer delay + decode time per frame (deltas since `prev`) + half the round trip.
 * Pass the previous result's `sample` as `prev` to get deltas.
 */
export function computeVideoStats(report, prev = null) {
  const list = statsList(report);
  const byId = new Map(list.map((s) => [s.id, s]));
  const inbound = list.find((s) => s.type === "inbound-rtp" && (s.kind === "video" || s.mediaType === "video"));
  const transport = list.find((s) => s.type === "transport");
  let pair = transport && transport.selectedCandidatePairId ? byId.get(transport.selectedCandidatePairId) : null;
  if (!pair) {
    const pairs = list.filter((s) => s.type === "candidate-pair");
    pair = pairs.find((s) => s.selected) || pairs.find((s) => s.nominated && s.state === "succeeded") ||
      pairs.find((s) => s.state === "succeeded");
  }
  const rttMs = pair && typeof pair.currentRoundTripTime === "number" ? pair.currentRoundTripTime * 1000 : null;
  const out = {
    fps: null, framesDecoded: 0, framesReceived: 0, framesDropped: 0, width: null, height: null,
    jitterBufferMs: null, decodeMs: null, rttMs, latencyMs: null, kbps: null, sample: null,
  };
  if (!inbound) return out;
  const sample = {
    timestamp: inbound.timestamp ?? Date.now(),
    framesDecoded: inbound.framesDecoded ?? 0,
    jitterBufferDelay: inbound.jitterBufferDelay ?? 0,
    jitterBufferEmittedCount: inbound.jitterBufferEmittedCount ?? 0,
    totalDecodeTime: inbound.totalDecodeTime ?? 0,
    bytesReceived: inbound.bytesReceived ?? 0,
  };
  out.sample = sample;
  out.framesDecoded = sample.framesDecoded;
  out.framesReceived = inbound.framesReceived ?? 0;
  out.framesDropped = inbound.framesDropped ?? 0;
  out.width = inbound.frameWidth ?? null;
  out.height = inbound.frameHeight ?? null;
  const dt = prev ? (sample.timestamp - prev.timestamp) / 1000 : 0;
  if (typeof inbound.framesPerSecond === "number") out.fps = inbound.framesPerSecond;
  else if (prev && dt > 0) out.fps = Math.max(0, (sample.framesDecoded - prev.framesDecoded) / dt);
  if (prev && dt > 0) out.kbps = Math.max(0, (8 * (sample.bytesReceived - prev.bytesReceived)) / dt / 1000);
  const emitted = prev ? sample.jitterBufferEmittedCount - prev.jitterBufferEmittedCount : sample.jitterBufferEmittedCount;
  const jbDelay = prev ? sample.jitterBufferDelay - prev.jitterBufferDelay : sample.jitterBufferDelay;
  if (emitted > 0) out.jitterBufferMs = (1000 * jbDelay) / emitted;
  else if (sample.jitterBufferEmittedCount > 0) out.jitterBufferMs = (1000 * sample.jitterBufferDelay) / sample.jitterBufferEmittedCount;
  const decoded = prev ? sample.framesDecoded - prev.framesDecoded : sample.framesDecoded;
  const decodeTime = prev ? sample.totalDecodeTime - prev.totalDecodeTime : sample.totalDecodeTime;
  if (decoded > 0) out.decodeMs = (1000 * decodeTime) / decoded;
  else if (sample.framesDecoded > 0) out.decodeMs = (1000 * sample.totalDecodeTime) / sample.framesDecoded;
  if (out.jitterBufferMs !== null) {
    out.latencyMs = out.jitterBufferMs + (out.decodeMs ?? 0) + (rttMs !== null ? rttMs / 2 : 0);
  }
  return out;
}

// ---------------------------------------------------------------- signalling helpers

/** A uuid4: crypto.randomUUID where available (secure contexts), else getRandomValues, else Math.random. */
export function newSessionId(cryptoImpl = globalThis.crypto) {
  if (cryptoImpl && typeof cryptoImpl.randomUUID === "function") {
    try { return cryptoImpl.randomUUID(); } catch { /* insecure context in some browsers */ }
  }
  const bytes = new Uint8Array(16);
  if (cryptoImpl && typeof cryptoImpl.getRandomValues === "function") cryptoImpl.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
  bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** Resolves when ICE gathering is complete (or after timeoutMs: then the candidates gathered so far go). */
export function waitForIceGathering(pc, timeoutMs = 5000) {
  if (pc.iceGatheringState === "complete") return Promise.resolve(true);
  return new Promise((resolve) => {
    const done = (complete) => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      pc.removeEventListener("icecandidate", onCandidate);
      resolve(complete);
    };
    const check = () => { if (pc.iceGatheringState === "complete") done(true); };
    const onCandidate = (event) => { if (!event.candidate) done(true); }; // null candidate = end of gathering
    const timer = setTimeout(() => done(false), timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
    pc.addEventListener("icecandidate", onCandidate);
  });
}

// ---------------------------------------------------------------- the viewer

export const ANSWER_TIMEOUT_MS = 15000;
const DISCONNECTED_GRACE_MS = 5000;

/**
 * A live video (and the teleop data channel) of one robot.
 *
 *   const viewer = new RobotViewer({socket, robot: "sim-01", video: videoElement, onData: (msg) => ..., onStatus});
 *   viewer.setOnline(robotState.connected); viewer.start(); ... viewer.stop();
 *
 * Status: "idle" | "offline" (robot not connected: waits) | "connecting" | "live" | "retrying" (with .error) | "closed".
 */
export class RobotViewer {
  constructor({ socket, robot, video, onStatus = () => {}, onData = () => {}, onChannel = () => {},
    clockOffset = () => 0, RTCPeerConnectionImpl, answerTimeoutMs = ANSWER_TIMEOUT_MS, backoff = {} }) {
    this.socket = socket;
    this.robot = robot;
    this.video = video;
    this.onStatus = onStatus;
    this.onData = onData;
    this.onChannel = onChannel; // (open: bool) when the data channel opens/closes
    this.clockOffset = clockOffset;
    this.PC = RTCPeerConnectionImpl || globalThis.RTCPeerConnection;
    this.answerTimeoutMs = answerTimeoutMs;
    this.backoff = { base: 1000, max: 20000, ...backoff };
    this.pc = null;
    this.dc = null;
    this.session = null;
    this.status = "idle";
    this.error = "";
    this.online = true;
    this.active = false;
    this.attempt = 0;
    this._gen = 0; // bumps on every teardown: stale async continuations see a different value and stop
    this._retryTimer = null;
    this._graceTimer = null;
    this._prevSample = null;
    this._canvas = null;
    this._pendingAnswer = null;
    this._offs = [
      socket.on("hello", () => this._onHello()),
      socket.on("socket.closed", () => { if (this.status === "connecting") this._fail("console socket closed"); }),
    ];
  }

  get channelOpen() { return !!this.dc && this.dc.readyState === "open"; }

  start() {
    this.active = true;
    if (this.online && !this.pc && !this._retryTimer) this._connect();
    else if (!this.online) this._setStatus("offline");
    return this;
  }

  stop() {
    this.active = false;
    this._teardown();
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._setStatus("closed");
    this._offs.forEach((off) => off());
    this._offs = [];
  }

  /** Follow the robot's `connected`: an offline robot gets no offers; coming back online connects at once. */
  setOnline(online) {
    online = !!online;
    if (online === this.online) return;
    this.online = online;
    if (!this.active) return;
    if (!online) {
      this._teardown();
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      this._setStatus("offline");
    } else {
      this.attempt = 0;
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      if (!this.pc) this._connect();
    }
  }

  /** Reconnect now (a user's "retry" click). */
  retry() {
    this.attempt = 0;
    this._teardown();
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    if (this.active && this.online) this._connect();
  }

  /** Sends a JSON message on the data channel; false when it is not open. */
  sendData(msg) {
    if (!this.channelOpen) return false;
    try {
      this.dc.send(JSON.stringify(msg));
      return true;
    } catch {
      return false;
    }
  }

  /** Video/transport stats (computeVideoStats) plus the stamp latency when the agent stamps frames. */
  async stats() {
    const base = { status: this.status, channelOpen: this.channelOpen, session: this.session };
    if (!this.pc) return { ...computeVideoStats([]), ...base, stamp: null, stampLatencyMs: null };
    let report;
    try {
      report = await this.pc.getStats();
    } catch {
      report = [];
    }
    const stats = computeVideoStats(report, this._prevSample);
    if (stats.sample) this._prevSample = stats.sample;
    let stamp = null;
    try {
      if (this.video && typeof document !== "undefined") {
        this._canvas = this._canvas || document.createElement("canvas");
        stamp = readStamp(this.video, this._canvas);
      }
    } catch { /* a tainted or unready canvas: no stamp */ }
    return { ...stats, ...base, stamp, stampLatencyMs: stampLatencyMs(stamp, Date.now() + this.clockOffset()) };
  }

  _setStatus(status, error = "") {
    this.error = error;
    if (status === this.status && !error) return;
    this.status = status;
    try { this.onStatus(status, error); } catch (err) { console.error(err); }
  }

  _onHello() {
    // a fresh console socket: an offer in flight is lost; a live peer connection survives (media is peer to peer)
    if (this.active && this.online && (!this.pc || this.status === "connecting" || this.status === "retrying")) {
      this.attempt = 0;
      this._teardown();
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      this._connect();
    }
  }

  async _connect() {
    if (!this.active || !this.online) return;
    this._teardown();
    const gen = this._gen;
    this._setStatus("connecting");
    if (!this.PC) {
      this._setStatus("retrying", "this browser has no WebRTC");
      return;
    }
    if (!this.socket.connected || !this.socket.hello) {
      this._setStatus("connecting", "waiting for the console socket");
      return; // _onHello connects
    }
    let pc;
    try {
      pc = new this.PC({ iceServers: this.socket.iceServers });
      this.pc = pc;
      pc.addTransceiver("video", { direction: "recvonly" });
      const dc = pc.createDataChannel("teleop", { ordered: false, maxRetransmits: 0 });
      this.dc = dc;
      dc.onopen = () => { if (gen === this._gen) this.onChannel(true); };
      dc.onclose = () => { if (gen === this._gen) this.onChannel(false); };
      dc.onmessage = (event) => {
        if (gen !== this._gen) return;
        let msg;
        try { msg = JSON.parse(event.data); } catch { return; }
        try { this.onData(msg); } catch (err) { console.error(err); }
      };
      pc.ontrack = (event) => {
        if (gen !== this._gen || !this.video) return;
        const stream = (event.streams && event.streams[0]) || new MediaStream([event.track]);
        if (this.video.srcObject !== stream) this.video.srcObject = stream;
        const play = this.video.play && this.video.play();
        if (play && play.catch) play.catch(() => { /* autoplay of a muted video is allowed; ignore */ });
      };
      pc.onconnectionstatechange = () => this._onConnectionState(pc, gen);
      const offer = await pc.createOffer();
      if (gen !== this._gen) return;
      await pc.setLocalDescription(offer);
      await waitForIceGathering(pc);
      if (gen !== this._gen) return;
      const session = newSessionId();
      const answerP = this._awaitAnswer(session);
      this._pendingAnswer = answerP;
      if (!this.socket.send({ type: "webrtc.offer", robot: this.robot, session, sdp: pc.localDescription.sdp })) {
        answerP.cancel();
        throw new Error("console socket not open");
      }
      this.session = session;
      const answer = await answerP;
      if (gen !== this._gen) return;
      if (answer.error || !answer.sdp) throw new Error(answer.error || "the robot sent an empty answer");
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      if (gen !== this._gen) return;
      if (pc.connectionState === "connected") this._live();
    } catch (err) {
      if (gen === this._gen) this._fail(err && err.message ? err.message : String(err));
    }
  }

  _awaitAnswer(session) {
    let cancel;
    const promise = new Promise((resolve, reject) => {
      const offAnswer = this.socket.on("webrtc.answer", (msg) => {
        if (msg.session !== session) return;
        cleanup();
        resolve(msg);
      });
      const offError = this.socket.on("error", (msg) => {
        const ours = msg.ref === session || msg.robot === this.robot ||
          (msg.ref === "webrtc.offer" && typeof msg.detail === "string" && msg.detail.includes(this.robot));
        if (!ours) return;
        cleanup();
        reject(new Error(msg.detail || msg.code || "offer refused"));
      });
      const timer = setTimeout(() => { cleanup(); reject(new Error("no answer from the robot")); }, this.answerTimeoutMs);
      const cleanup = () => { clearTimeout(timer); offAnswer(); offError(); };
      cancel = () => { cleanup(); resolve({ error: "cancelled" }); };
    });
    promise.cancel = cancel;
    return promise;
  }

  _onConnectionState(pc, gen) {
    if (gen !== this._gen) return;
    const state = pc.connectionState;
    clearTimeout(this._graceTimer);
    if (state === "connected") this._live();
    else if (state === "failed") this._fail("connection failed");
    else if (state === "disconnected") {
      this._graceTimer = setTimeout(() => {
        if (gen === this._gen && pc.connectionState !== "connected") this._fail("connection lost");
      }, DISCONNECTED_GRACE_MS);
    } else if (state === "closed" && this.active) this._fail("connection closed");
  }

  _live() {
    this.attempt = 0;
    this._setStatus("live");
  }

  _fail(reason) {
    this._teardown();
    if (!this.active) return;
    if (!this.online) {
      this._setStatus("offline");
      return;
    }
    const delay = backoffDelay(this.attempt++, this.backoff);
    this._setStatus("retrying", `${reason}; retrying in ${Math.round(delay / 1000)} s`);
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      this._connect();
    }, delay);
  }

  _teardown() {
    this._gen++;
    clearTimeout(this._graceTimer);
    const { pc, dc, session } = this;
    if (this._pendingAnswer) this._pendingAnswer.cancel(); // its timer must not outlive the attempt
    this._pendingAnswer = null;
    this.pc = null;
    this.dc = null;
    this.session = null;
    this._prevSample = null;
    if (session) this.socket.send({ type: "webrtc.close", robot: this.robot, session });
    if (dc) {
      try { dc.close(); } catch { /* closed */ }
      this.onChannel(false);
    }
    if (pc) {
      try { pc.close(); } catch { /* closed */ }
    }
    if (this.video && this.video.srcObject) this.video.srcObject = null;
  }
}
