// The help queue's client side (frontend/console/attention.js): order, tile ranks, the tab title, the queue's state.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Alerts, HelpQueue, requestOrder, sinceText, sortTiles, tileRank, titleWithCount } from "../../frontend/console/attention.js";

const req = (id, fields = {}) => ({ id, robot: `sim-0${id}`, kind: "stall", reason: "still", urgency: 2, status: "open",
  raised_at: `2026-12-06T01:00:0${id}Z`, assigned_to: "", claimed_by: "", trace: [], ...fields });

test("requests: open before claimed, the most urgent first, then the oldest", () => {
  const list = [req(1), req(2, { urgency: 3 }), req(3, { status: "claimed", urgency: 3 }), req(4, { urgency: 1 }), req(5)];
  assert.deepEqual(list.sort(requestOrder).map((r) => r.id), [2, 1, 5, 4, 3]);
});

test("the queue keeps active requests, drops closed ones and reports only new open ones", () => {
  const queue = new HelpQueue();
  const seen = [];
  queue.onChange(({ fresh }) => seen.push(fresh.map((r) => r.id)));
  queue.reset([req(1)]);
  assert.deepEqual(seen, [[]]); // what was there when the page opened makes no sound
  assert.deepEqual(queue.apply([req(2), req(1, { status: "claimed", claimed_by: "alice" })]).map((r) => r.id), [2]);
  assert.equal(queue.forRobot("sim-01").status, "claimed");
  assert.deepEqual(queue.open().map((r) => r.id), [2]);
  queue.apply([req(1, { status: "resolved" }), req(2, { status: "withdrawn" })]);
  assert.deepEqual(queue.active(), []);
  assert.equal(queue.forRobot("sim-01"), null);
  queue.apply([req(3, { status: "claimed" })]); // first seen already claimed: nothing to announce
  assert.deepEqual(seen.at(-1), []);
});

test("next: the request assigned to me, else the most urgent open one", () => {
  const queue = new HelpQueue();
  queue.reset([req(1, { urgency: 3, assigned_to: "bob" }), req(2, { assigned_to: "alice" }), req(3)]);
  assert.equal(queue.next("alice").id, 2);
  assert.equal(queue.next("carol").id, 1);
  queue.reset([]);
  assert.equal(queue.next("alice"), null);
});

test("tiles: asking robots first by urgency, then answered, e-stopped, driven, running, idle, offline", () => {
  const on = { connected: true, state: "running", lease: null, control_source: "policy", estopped: false };
  assert.equal(tileRank(on, req(1, { urgency: 3 })), 0);
  assert.ok(tileRank(on, req(1, { urgency: 1 })) < tileRank(on, req(1, { status: "claimed" })));
  assert.ok(tileRank({ ...on, estopped: true }, null) < tileRank({ ...on, lease: { id: 1 } }, null));
  assert.ok(tileRank(on, null) < tileRank({ ...on, state: "idle" }, null));
  assert.ok(tileRank({ ...on, state: "idle" }, null) < tileRank({ ...on, connected: false }, null));
  const states = { a: on, b: { ...on, connected: false }, c: on, d: on };
  const requests = { d: req(4, { urgency: 3 }), c: req(3) };
  assert.deepEqual(sortTiles(["a", "b", "c", "d"], (n) => states[n], (n) => requests[n] || null), ["d", "c", "a", "b"]);
});

test("the tab title counts open requests and never stacks counts", () => {
  assert.equal(titleWithCount("Fleet · SOP", 2), "(2) Fleet · SOP");
  assert.equal(titleWithCount("(2) Fleet · SOP", 3), "(3) Fleet · SOP");
  assert.equal(titleWithCount("(3) Fleet · SOP", 0), "Fleet · SOP");
});

test("how long a robot has been asking", () => {
  const now = Date.parse("2026-12-06T01:02:05Z");
  assert.equal(sinceText("2026-12-06T01:02:00Z", now), "5 s");
  assert.equal(sinceText("2026-12-06T01:00:00Z", now), "2 min 5 s");
  assert.equal(sinceText("2026-12-05T23:00:00Z", now), "2 h 2 min");
  assert.equal(sinceText("garbage", now), "");
});

test("sound and notifications are opt-in and remembered", () => {
  const store = new Map();
  const storage = { getItem: (k) => store.get(k) ?? null, setItem: (k, v) => store.set(k, v) };
  const alerts = new Alerts(storage);
  assert.equal(alerts.sound, false);
  alerts.sound = true;
  alerts.save();
  assert.equal(new Alerts(storage).sound, true);
  assert.equal(new Alerts(storage).notify, false); // no Notification permission in node: never on
});
