// The viewer's pure parts and its signalling against fakes (frontend/console/video.js).
import { test } from "node:test";
import assert from "node:assert/strict";
import { RobotViewer, computeVideoStats, newSessionId } from "../../frontend/console/video.js";

const UUID4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

test("session ids are uuid4, with or without crypto.randomUUID", () => {
  assert.match(newSessionId(), UUID4);
  assert.match(newSessionId({ getRandomValues: (a) => a.fill(255) }), UUID4);
  assert.match(newSessionId(null), UUID4);
});

test("stats: fps from framesPerSecond or the framesDecoded delta, RTT of the selected pair, latency estimate", () => {
  const report = (ts, decoded, jb, emitted, decodeTime, fps) => new Map([
    ["T", { id: "T", type: "transport", selectedCandidatePairId: "P" }],
    ["P", { id: "P", type: "candidate-pair", state: "succeeded", nominated: true, currentRoundTripTime: 0.004 }],
    ["Q", { id: "Q", type: "candidate-pair", state: "failed", currentRoundTripTime: 0.5 }],
    ["I", { id: "I", type: "inbound-rtp", kind: "video", timestamp: ts, framesDecoded: decoded, jitterBufferDelay: jb,
      jitterBufferEmittedCount: emitted, totalDecodeTime: decodeTime, bytesReceived: decoded * 1000, framesPerSecond: fps }],
  ]);
  const first = computeVideoStats(report(1000, 100, 2.0, 100, 0.2, undefined));
  assert.equal(first.fps, null, "no delta yet");
  assert.equal(first.framesDecoded, 100);
  assert.equal(first.rttMs, 4);
  assert.equal(Math.round(first.jitterBufferMs), 20);
  assert.equal(Math.round(first.latencyMs), 20 + 2 + 2);
  const second = computeVideoStats(report(2000, 115, 2.45, 115, 0.23, undefined), first.sample);
  assert.equal(second.fps, 15);
  assert.equal(Math.round(second.jitterBufferMs), 30);
  assert.equal(Math.round(second.latencyMs), 30 + 2 + 2);
  assert.equal(computeVideoStats(report(3000, 130, 3, 130, 0.3, 14.5), second.sample).fps, 14.5);
  assert.equal(computeVideoStats([]).fps, null, "no inbound video yet");
});

class FakeSocket {
  constructor() { this.sent = []; this.handlers = new Map(); this.connected = true; this.hello = { role: "viewer" }; this.iceServers = [{ urls: "stun:s" }]; }
  on(type, fn) { if (!this.handlers.has(type)) this.handlers.set(type, new Set()); this.handlers.get(type).add(fn); return () => this.handlers.get(type).delete(fn); }
  send(m) { this.sent.push(m); return this.connected; }
  emit(m) { for (const fn of [...(this.handlers.get(m.type) || [])]) fn(m); }
}

class FakePC {
  static last = null;
  constructor(config) {
    this.config = config; this.connectionState = "new"; this.iceGatheringState = "new"; this.listeners = {};
    this.transceivers = []; this.channels = []; this.closed = false; FakePC.last = this;
  }
  addEventListener(t, f) { (this.listeners[t] ||= []).push(f); }
  removeEventListener(t, f) { this.listeners[t] = (this.listeners[t] || []).filter((x) => x !== f); }
  addTransceiver(kind, init) { this.transceivers.push([kind, init]); }
  createDataChannel(label, init) { const dc = { label, init, readyState: "connecting", sent: [], send(d) { this.sent.push(JSON.parse(d)); }, close() {} }; this.channels.push(dc); return dc; }
  async createOffer() { return { type: "offer", sdp: "v=0 offer" }; }
  async setLocalDescription(d) {
    this.localDescription = { ...d, sdp: `${d.sdp} +candidates` };
    setTimeout(() => { this.iceGatheringState = "complete"; (this.listeners.icegatheringstatechange || []).forEach((f) => f()); }, 5);
  }
  async setRemoteDescription(d) { this.remoteDescription = d; }
  async getStats() { return new Map(); }
  close() { this.closed = true; }
}

const tick = (ms = 20) => new Promise((r) => setTimeout(r, ms));

test("viewer: recvonly video + unordered teleop channel, offer after ICE gathering, answer applied, close on stop", async () => {
  const socket = new FakeSocket();
  const viewer = new RobotViewer({ socket, robot: "sim-01", video: null, RTCPeerConnectionImpl: FakePC, backoff: { base: 5, max: 10 } });
  viewer.start();
  await tick();
  const pc = FakePC.last;
  assert.deepEqual(pc.config, { iceServers: [{ urls: "stun:s" }] });
  assert.deepEqual(pc.transceivers, [["video", { direction: "recvonly" }]]);
  assert.deepEqual([pc.channels[0].label, pc.channels[0].init], ["teleop", { ordered: false, maxRetransmits: 0 }]);
  const offer = socket.sent.find((m) => m.type === "webrtc.offer");
  assert.equal(offer.robot, "sim-01");
  assert.match(offer.session, /^[0-9a-f-]{36}$/);
  assert.equal(offer.sdp, "v=0 offer +candidates", "sent after gathering, with the candidates");
  socket.emit({ type: "webrtc.answer", robot: "sim-01", session: "someone-else", sdp: "nope" });
  socket.emit({ type: "webrtc.answer", robot: "sim-01", session: offer.session, sdp: "v=0 answer" });
  await tick();
  assert.deepEqual(pc.remoteDescription, { type: "answer", sdp: "v=0 answer" });
  pc.connectionState = "connected";
  pc.onconnectionstatechange();
  assert.equal(viewer.status, "live");
  assert.equal(viewer.sendData({ type: "cmd" }), false, "channel not open yet");
  pc.channels[0].readyState = "open";
  assert.equal(viewer.sendData({ type: "cmd", seq: 1 }), true);
  viewer.stop();
  assert.deepEqual(socket.sent.at(-1), { type: "webrtc.close", robot: "sim-01", session: offer.session });
  assert.equal(pc.closed, true);
});

test("viewer: an answer error retries with a new session; offline robots get no offers", async () => {
  const socket = new FakeSocket();
  const statuses = [];
  const viewer = new RobotViewer({ socket, robot: "sim-02", video: null, RTCPeerConnectionImpl: FakePC,
    backoff: { base: 5, max: 10, jitter: 0 }, onStatus: (s) => statuses.push(s) });
  viewer.start();
  await tick();
  const first = socket.sent.find((m) => m.type === "webrtc.offer");
  socket.emit({ type: "webrtc.answer", robot: "sim-02", session: first.session, sdp: "", error: "too many viewers" });
  await tick(60);
  const offers = socket.sent.filter((m) => m.type === "webrtc.offer");
  assert.ok(offers.length >= 2, "retried");
  assert.notEqual(offers[1].session, first.session);
  assert.ok(socket.sent.some((m) => m.type === "webrtc.close" && m.session === first.session));
  assert.ok(statuses.includes("retrying"));
  viewer.setOnline(false);
  assert.equal(viewer.status, "offline");
  const n = socket.sent.filter((m) => m.type === "webrtc.offer").length;
  await tick(60);
  assert.equal(socket.sent.filter((m) => m.type === "webrtc.offer").length, n, "no offers while offline");
  viewer.setOnline(true);
  await tick();
  assert.equal(socket.sent.filter((m) => m.type === "webrtc.offer").length, n + 1, "back online: offers at once");
  viewer.stop();
});

test("viewer: a server error for the robot fails the pending offer", async () => {
  const socket = new FakeSocket();
  const viewer = new RobotViewer({ socket, robot: "sim-03", video: null, RTCPeerConnectionImpl: FakePC, backoff: { base: 1000 } });
  viewer.start();
  await tick();
  socket.emit({ type: "error", code: "robot_offline", detail: "sim-03 is offline", ref: "webrtc.offer" });
  await tick();
  assert.equal(viewer.status, "retrying");
  assert.match(viewer.error, /offline/);
  viewer.stop();
});
