// The console socket client (frontend/console/socket.js) against a fake WebSocket.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ConsoleSocket, backoffDelay, consoleUrl } from "../../frontend/console/socket.js";

class FakeWS {
  static instances = [];
  constructor(url) { this.url = url; this.readyState = 0; this.sent = []; FakeWS.instances.push(this); }
  send(data) { this.sent.push(JSON.parse(data)); }
  close() { this.readyState = 3; this.onclose?.({}); }
  open() { this.readyState = 1; this.onopen?.({}); }
  receive(msg) { this.onmessage?.({ data: JSON.stringify(msg) }); }
}

test("url follows the page scheme", () => {
  assert.equal(consoleUrl({ protocol: "http:", host: "h:8000" }), "ws://h:8000/ws/console/");
  assert.equal(consoleUrl({ protocol: "https:", host: "sop.example" }), "wss://sop.example/ws/console/");
});

test("backoff doubles up to the cap, with jitter", () => {
  const fixed = { jitter: 0, base: 500, max: 8000 };
  assert.deepEqual([0, 1, 2, 3, 4, 10].map((a) => backoffDelay(a, fixed)), [500, 1000, 2000, 4000, 8000, 8000]);
  const j = backoffDelay(2, { base: 500, jitter: 0.3, random: () => 1 });
  assert.equal(j, 2600);
});

test("dispatch by type, hello exposed, send only while open, reconnect after close", async () => {
  FakeWS.instances.length = 0;
  const socket = new ConsoleSocket({ url: "ws://x/ws/console/", WebSocketImpl: FakeWS, backoff: { base: 5, max: 10 }, pingMs: 1e6 });
  const statuses = [];
  socket.onStatus((s) => statuses.push(s));
  const states = [];
  const off = socket.on("robot.state", (m) => states.push(m.robot.name));
  const all = [];
  socket.on("*", (m) => all.push(m.type));
  socket.start();
  const ws = FakeWS.instances[0];
  assert.equal(socket.send({ type: "ping" }), false, "not open yet");
  ws.open();
  ws.receive({ type: "hello", user: "alice", role: "operator", ice_servers: [{ urls: "stun:x" }], lease_timeout_s: 5, deadman_ms: 250, robots: [] });
  assert.equal(socket.role, "operator");
  assert.equal(socket.user, "alice");
  assert.deepEqual(socket.iceServers, [{ urls: "stun:x" }]);
  assert.equal(socket.deadmanMs, 250);
  ws.receive({ type: "robot.state", robot: { name: "sim-01" } });
  off();
  ws.receive({ type: "robot.state", robot: { name: "sim-02" } });
  assert.deepEqual(states, ["sim-01"]);
  assert.deepEqual(all, ["hello", "robot.state", "robot.state"]);
  assert.equal(socket.send({ type: "takeover", robot: "sim-01", reason: "stuck", force: false }), true);
  assert.deepEqual(ws.sent.at(-1), { type: "takeover", robot: "sim-01", reason: "stuck", force: false });
  ws.onmessage({ data: "not json" }); // ignored, no throw
  const late = [];
  socket.on("hello", (h) => late.push(h.user));
  await new Promise((r) => setTimeout(r, 0));
  assert.deepEqual(late, ["alice"], "a late hello subscriber gets the current hello");
  ws.close();
  assert.equal(socket.connected, false);
  await new Promise((r) => setTimeout(r, 40));
  assert.equal(FakeWS.instances.length, 2, "reconnected");
  assert.deepEqual(statuses.slice(0, 4), ["closed", "connecting", "open", "closed"]);
  socket.stop();
});

test("waitFor resolves on a matching message and times out otherwise", async () => {
  FakeWS.instances.length = 0;
  const socket = new ConsoleSocket({ url: "ws://x/", WebSocketImpl: FakeWS, pingMs: 1e6 }).start();
  const ws = FakeWS.instances[0];
  ws.open();
  const p = socket.waitFor("webrtc.answer", (m) => m.session === "b", 1000);
  ws.receive({ type: "webrtc.answer", session: "a", sdp: "x" });
  ws.receive({ type: "webrtc.answer", session: "b", sdp: "y" });
  assert.equal((await p).sdp, "y");
  await assert.rejects(socket.waitFor("pong", () => true, 10));
  socket.stop();
});

test("a hello in parts (robot.list frames) reaches subscribers once, complete", () => {
  FakeWS.instances.length = 0;
  const socket = new ConsoleSocket({ url: "ws://x/ws/console/", WebSocketImpl: FakeWS, pingMs: 1e6 });
  const hellos = [];
  socket.on("hello", (h) => hellos.push(h));
  const lists = [];
  socket.on("robot.list", (m) => lists.push(m));
  socket.start();
  const ws = FakeWS.instances[0];
  ws.open();
  ws.receive({ type: "hello", user: "alice", role: "viewer", ice_servers: [], lease_timeout_s: 5, deadman_ms: 250,
               robots: [{ name: "a" }], more: true });
  assert.equal(hellos.length, 0, "not before the last part");
  ws.receive({ type: "robot.list", robots: [{ name: "b" }], more: true });
  ws.receive({ type: "robot.list", robots: [{ name: "c" }], more: false });
  assert.equal(hellos.length, 1);
  assert.deepEqual(hellos[0].robots.map((r) => r.name), ["a", "b", "c"]);
  assert.equal(hellos[0].more, false);
  assert.equal(socket.user, "alice");
  assert.equal(lists.length, 0, "the parts are the socket's business");
  ws.receive({ type: "robot.list", robots: [{ name: "stray" }], more: false }); // no hello in progress: ignored
  assert.equal(hellos.length, 1);
  socket.stop?.();
});
