// The command builder and the clock offset (frontend/console/teleop.js).
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  ClockSync, CommandBuilder, TeleopController, actionFromGamepad, actionFromKeys, mergeActions,
} from "../../frontend/console/teleop.js";

test("seq is strictly increasing, t is browser time + offset, action is clamped to [-1, 1]", () => {
  let now = 1_000_000;
  const clock = new ClockSync({ now: () => now });
  const builder = new CommandBuilder(clock);
  const a = builder.next([0.5, 2, -3], null);
  now += 50;
  const b = builder.next();
  assert.equal(a.type, "cmd");
  assert.ok(b.seq > a.seq);
  assert.deepEqual(a.action, [0.5, 1, -1]);
  assert.deepEqual(b.action, [0, 0, 0], "the zero action is the keepalive");
  assert.equal(a.grip, null, "null grip keeps the robot's gripper");
  assert.equal(a.t, 1_000_000, "offset 0 until known");
  assert.equal(b.t, 1_000_050);
  const seqs = Array.from({ length: 100 }, () => builder.next().seq);
  assert.ok(seqs.every((s, i) => i === 0 || s === seqs[i - 1] + 1));
});

test("clock offset = robot_t - (t_send + t_recv) / 2, first sample direct, then smoothed", () => {
  let now = 10_000;
  const clock = new ClockSync({ now: () => now, alpha: 0.5 });
  assert.equal(clock.known, false);
  assert.equal(clock.offset, 0);
  const ping = clock.ping();
  assert.deepEqual(Object.keys(ping).sort(), ["id", "t", "type"]);
  assert.equal(ping.type, "ping");
  now = 10_020; // 20 ms round trip; the robot's clock is 500 ms ahead
  clock.onPong({ type: "pong", id: ping.id, t: ping.t, robot_t: 10_010 + 500 });
  assert.equal(clock.offset, 500);
  assert.equal(clock.rttMs, 20);
  assert.equal(clock.known, true);
  const ping2 = clock.ping();
  now = 10_040;
  clock.onPong({ type: "pong", id: ping2.id, t: ping2.t, robot_t: 10_030 + 600 }); // sample 600
  assert.equal(clock.offset, 550, "EMA with alpha 0.5");
  const cmd = new CommandBuilder(clock).next([0, 0, 0]);
  assert.equal(cmd.t, 10_040 + 550, "commands carry robot time");
  assert.equal(clock.onPong({ type: "pong", id: 999, t: "x" }), null, "unusable pongs are ignored");
});

test("keys: W/S y, A/D x, R/F and arrows z; opposite keys cancel", () => {
  assert.deepEqual(actionFromKeys(new Set(["KeyW"])), [0, 1, 0]);
  assert.deepEqual(actionFromKeys(new Set(["KeyS"])), [0, -1, 0]);
  assert.deepEqual(actionFromKeys(new Set(["KeyA"])), [-1, 0, 0]);
  assert.deepEqual(actionFromKeys(new Set(["KeyD", "ArrowUp"])), [1, 0, 1]);
  assert.deepEqual(actionFromKeys(new Set(["KeyF"])), [0, 0, -1]);
  assert.deepEqual(actionFromKeys(new Set(["KeyR", "ArrowUp"])), [0, 0, 1], "same direction twice is still 1");
  assert.deepEqual(actionFromKeys(new Set(["KeyW", "KeyS"])), [0, 0, 0]);
});

test("gamepad: dead zone 0.15, stick up is +y, triggers z, button 0 toggles on its edge", () => {
  const pad = (axes, buttons = {}) => ({
    connected: true, axes,
    buttons: Array.from({ length: 16 }, (_, i) => ({ pressed: !!buttons[i], value: buttons[i] ?? 0 })),
  });
  assert.deepEqual(actionFromGamepad(pad([0.1, -0.1, 0, 0.1])).action, [0, 0, 0]);
  const full = actionFromGamepad(pad([1, -1, 0, 0])).action;
  assert.deepEqual(full.map((v) => Math.round(v * 100) / 100), [1, 1, 0]);
  assert.equal(actionFromGamepad(pad([0, 0, 0, 0], { 7: 1 })).action[2], 1, "right trigger up");
  assert.equal(actionFromGamepad(pad([0, 0, 0, 0], { 6: 1 })).action[2], -1, "left trigger down");
  assert.ok(actionFromGamepad(pad([0, 0, 0, -1])).action[2] > 0.99, "right stick up is +z without triggers");
  const first = actionFromGamepad(pad([0, 0, 0, 0], { 0: 1 }), false);
  assert.equal(first.gripPressed, true);
  const held = actionFromGamepad(pad([0, 0, 0, 0], { 0: 1 }), first.gripButton);
  assert.equal(held.gripPressed, false, "holding the button toggles once");
  assert.deepEqual(mergeActions([1, 0, 0], [0.3, -0.5, 0]), [1, -0.5, 0]);
});

test("controller: data channel when open, websocket fallback otherwise, keepalive and e-stop on both", () => {
  const sentWs = [];
  const sentDc = [];
  const socket = { send: (m) => { sentWs.push(m); return true; } };
  let open = false;
  const viewer = { get channelOpen() { return open; }, sendData: (m) => { if (!open) return false; sentDc.push(m); return true; } };
  const ctl = new TeleopController({ socket, robot: "sim-01", viewer, getGamepads: () => [] });
  assert.equal(ctl.tick(), null, "nothing is sent while not holding");
  ctl.setHolding(true); // sends a keepalive and a first command at once
  assert.deepEqual(sentWs[0], { type: "keepalive", robot: "sim-01" });
  assert.equal(sentWs[1].type, "teleop");
  assert.equal(sentWs[1].robot, "sim-01");
  ctl.keyDown("KeyD");
  open = true;
  const cmd = ctl.tick();
  assert.deepEqual(sentDc.at(-1), cmd);
  assert.deepEqual(cmd.action, [1, 0, 0]);
  assert.ok(cmd.seq > sentWs[1].seq, "one seq counter across both paths");
  ctl.keyDown("Space");
  assert.equal(ctl.grip, 1, "the first Space closes");
  ctl.keyDown("Space");
  assert.equal(ctl.grip, -1);
  ctl.keyUp("KeyD");
  assert.deepEqual(ctl.tick().action, [0, 0, 0]);
  ctl.pingTick();
  assert.equal(sentDc.at(-1).type, "ping");
  const n = sentWs.length;
  ctl.keepaliveTick();
  assert.deepEqual(sentWs[n], { type: "keepalive", robot: "sim-01" });
  assert.deepEqual(ctl.estop(), { websocket: true, datachannel: true });
  assert.deepEqual(sentWs.at(-1), { type: "estop", robot: "sim-01", engaged: true });
  assert.deepEqual(sentDc.at(-1), { type: "estop" });
  ctl.setHolding(false);
  assert.equal(ctl.grip, null);
  assert.equal(ctl.onData({ type: "pong", id: 1, t: 5, robot_t: 6 }), null, "pongs are consumed");
  assert.equal(ctl.onData({ type: "hud" }).type, "hud");
});
