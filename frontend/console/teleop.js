// Teleoperation (docs/console.md "Commands"): while this page holds the robot's lease it sends
// {type: "cmd", seq, t, action: [dx, dy, dz], grip} at 20 Hz on the data channel "teleop", or as the websocket
// fallback `teleop` when the channel is not open. `t` is in the robot's clock (unix ms): Date.now() + the offset
// learned from data-channel ping/pong. A zero action is the keepalive that keeps the robot's deadman off.
//
// The pure parts (ClockSync, CommandBuilder, actionFromKeys, actionFromGamepad) have no DOM dependency.

export const COMMAND_HZ = 20;
export const PING_INTERVAL_MS = 1000;
export const KEEPALIVE_MS = 1000;
export const DEAD_ZONE = 0.15;

/** The key map (KeyboardEvent.code): what the page shows and what actionFromKeys reads. */
export const KEY_MAP = Object.freeze([
  { keys: ["KeyW"], label: "W", axis: 1, sign: +1, help: "+y (away)" },
  { keys: ["KeyS"], label: "S", axis: 1, sign: -1, help: "−y (toward)" },
  { keys: ["KeyA"], label: "A", axis: 0, sign: -1, help: "−x (left)" },
  { keys: ["KeyD"], label: "D", axis: 0, sign: +1, help: "+x (right)" },
  { keys: ["KeyR", "ArrowUp"], label: "R / ↑", axis: 2, sign: +1, help: "+z (up)" },
  { keys: ["KeyF", "ArrowDown"], label: "F / ↓", axis: 2, sign: -1, help: "−z (down)" },
]);
export const GRIP_KEY = { keys: ["Space"], label: "Space", help: "toggle gripper close / open" };
export const TELEOP_KEYS = new Set([...KEY_MAP.flatMap((k) => k.keys), ...GRIP_KEY.keys]);

const clamp = (x, lo = -1, hi = 1) => Math.min(hi, Math.max(lo, x));

/** Learns robot clock - browser clock from pings: offset = robot_t - (t_send + t_recv) / 2, smoothed. */
export class ClockSync {
  constructor({ alpha = 0.2, now = () => Date.now() } = {}) {
    this.alpha = alpha;
    this.now = now;
    this.offset = 0; // 0 until the first pong
    this.known = false;
    this.rttMs = null;
    this.samples = 0;
    this.pending = new Map(); // ping id -> t_send
    this._id = 0;
  }

  /** The next ping message for the data channel. */
  ping() {
    const id = ++this._id;
    const t = this.now();
    this.pending.set(id, t);
    if (this.pending.size > 32) this.pending.delete(this.pending.keys().next().value);
    return { type: "ping", id, t };
  }

  /** Feeds a pong {id, t, robot_t}; returns the new offset (or null if the pong is unusable). */
  onPong(pong, tRecv = this.now()) {
    if (!pong || typeof pong.robot_t !== "number") return null;
    const tSend = this.pending.has(pong.id) ? this.pending.get(pong.id) : pong.t;
    this.pending.delete(pong.id);
    if (typeof tSend !== "number" || tRecv < tSend) return null;
    return this.addSample(tSend, tRecv, pong.robot_t);
  }

  addSample(tSend, tRecv, robotT) {
    const sample = robotT - (tSend + tRecv) / 2;
    const rtt = tRecv - tSend;
    this.rttMs = this.rttMs === null ? rtt : this.rttMs + this.alpha * (rtt - this.rttMs);
    this.offset = this.known ? this.offset + this.alpha * (sample - this.offset) : sample;
    this.known = true;
    this.samples++;
    return this.offset;
  }

  /** The robot's clock now (unix ms). */
  robotNow() { return this.now() + this.offset; }
}

/** Builds commands with a strictly increasing seq and t in the robot's clock. */
export class CommandBuilder {
  constructor(clock = new ClockSync(), { startSeq = 0 } = {}) {
    this.clock = clock;
    this.seq = startSeq;
  }

  next(action = [0, 0, 0], grip = null) {
    const a = [0, 1, 2].map((i) => {
      const v = Number(action && action[i]) || 0;
      return Math.round(clamp(v) * 1000) / 1000;
    });
    this.seq += 1;
    return {
      type: "cmd", seq: this.seq, t: Math.round(this.clock.robotNow() * 10) / 10, action: a,
      grip: grip === null || grip === undefined ? null : clamp(Number(grip)),
    };
  }
}

/** [dx, dy, dz] from the set of pressed key codes (opposite keys cancel). */
export function actionFromKeys(pressed) {
  const action = [0, 0, 0];
  for (const entry of KEY_MAP) {
    if (entry.keys.some((k) => pressed.has(k))) action[entry.axis] += entry.sign;
  }
  return action.map((v) => clamp(v));
}

function deadZone(v, dz = DEAD_ZONE) {
  if (typeof v !== "number" || Math.abs(v) < dz) return 0;
  return Math.sign(v) * ((Math.abs(v) - dz) / (1 - dz)); // rescaled: no jump at the edge of the dead zone
}

/**
 * [dx, dy, dz] and the grip toggle edge from a standard-mapping Gamepad: left stick xy (stick up = +y), triggers
 * (RT up, LT down; buttons 7 / 6) or the right stick's vertical axis for z, button 0 toggles the gripper.
 * `prevGripButton` is the button's state at the previous poll; returns {action, gripPressed, gripButton}.
 */
export function actionFromGamepad(pad, prevGripButton = false, dz = DEAD_ZONE) {
  if (!pad) return { action: [0, 0, 0], gripPressed: false, gripButton: false };
  const axes = pad.axes || [];
  const buttons = pad.buttons || [];
  const val = (b) => (b ? (typeof b === "object" ? b.value ?? (b.pressed ? 1 : 0) : Number(b)) : 0);
  const x = deadZone(axes[0]);
  const y = -deadZone(axes[1]); // screen y grows downward
  const triggers = val(buttons[7]) - val(buttons[6]);
  const z = Math.abs(triggers) >= dz ? triggers : -deadZone(axes[3]);
  const gripButton = !!(buttons[0] && (buttons[0].pressed ?? val(buttons[0]) > 0.5));
  return { action: [clamp(x) + 0, clamp(y) + 0, clamp(z) + 0], gripPressed: gripButton && !prevGripButton, gripButton };
}

/** Both inputs together: the larger magnitude per axis wins. */
export function mergeActions(a, b) {
  return [0, 1, 2].map((i) => (Math.abs(b[i]) > Math.abs(a[i]) ? b[i] : a[i]));
}

/**
 * Drives one robot while `holding`: commands at 20 Hz (data channel, else websocket `teleop`), ws keepalive every 1 s,
 * data-channel pings every 1 s (whenever the channel is open: RTT and clock offset even before a takeover).
 */
export class TeleopController {
  constructor({ socket, robot, viewer = null, clock = new ClockSync(), getGamepads, onSent = () => {} }) {
    this.socket = socket;
    this.robot = robot;
    this.viewer = viewer;
    this.clock = clock;
    this.builder = new CommandBuilder(clock);
    this.getGamepads = getGamepads || (() => (globalThis.navigator && navigator.getGamepads ? navigator.getGamepads() : []));
    this.onSent = onSent;
    this.pressed = new Set();
    this.grip = null; // null: keep the robot's gripper; -1 open / 1 close once the operator toggles it
    this.holding = false;
    this.lastCommand = null;
    this.lastPath = null; // "datachannel" | "websocket" | null
    this.sentCount = 0;
    this._padGrip = false;
    this._timers = [];
  }

  start() {
    this.stop();
    this._timers.push(setInterval(() => this.tick(), 1000 / COMMAND_HZ));
    this._timers.push(setInterval(() => this.pingTick(), PING_INTERVAL_MS));
    this._timers.push(setInterval(() => this.keepaliveTick(), KEEPALIVE_MS));
    return this;
  }

  stop() {
    this._timers.forEach(clearInterval);
    this._timers = [];
  }

  setViewer(viewer) { this.viewer = viewer; }

  setHolding(holding) {
    holding = !!holding;
    if (holding === this.holding) return;
    this.holding = holding;
    if (!holding) {
      this.pressed.clear();
      this.grip = null;
    } else {
      this.keepaliveTick();
      this.tick();
    }
  }

  // A change of the pressed keys is sent at once (not at the next 20 Hz tick): it is what the operator waits for.
  keyDown(code) {
    if (code === GRIP_KEY.keys[0]) {
      this.toggleGrip();
      return;
    }
    if (this.pressed.has(code)) return; // key repeat
    this.pressed.add(code);
    if (this.holding) this.tick();
  }

  keyUp(code) {
    if (this.pressed.delete(code) && this.holding) this.tick();
  }

  releaseAllKeys() { this.pressed.clear(); }

  toggleGrip() {
    this.grip = this.grip === 1 ? -1 : 1; // the first toggle closes
    if (this.holding) this.tick();
  }

  currentAction() {
    let action = actionFromKeys(this.pressed);
    const pads = [...(this.getGamepads() || [])].filter((p) => p && p.connected !== false);
    if (pads.length) {
      const { action: padAction, gripPressed, gripButton } = actionFromGamepad(pads[0], this._padGrip);
      this._padGrip = gripButton;
      if (gripPressed) this.grip = this.grip === 1 ? -1 : 1;
      action = mergeActions(action, padAction);
    }
    return action;
  }

  /** One command (20 Hz while holding). */
  tick() {
    if (!this.holding) return null;
    const cmd = this.builder.next(this.currentAction(), this.grip);
    let path = null;
    if (this.viewer && this.viewer.sendData(cmd)) path = "datachannel";
    else if (this.socket.send({ type: "teleop", robot: this.robot, seq: cmd.seq, t: cmd.t, action: cmd.action, grip: cmd.grip })) {
      path = "websocket";
    }
    this.lastCommand = cmd;
    this.lastPath = path;
    if (path) this.sentCount++;
    this.onSent(cmd, path);
    return cmd;
  }

  pingTick() {
    if (this.viewer && this.viewer.channelOpen) this.viewer.sendData(this.clock.ping());
  }

  keepaliveTick() {
    if (this.holding) this.socket.send({ type: "keepalive", robot: this.robot });
  }

  /** Data-channel messages from the robot: pongs feed the clock; the rest is returned for the HUD. */
  onData(msg) {
    if (msg && msg.type === "pong") {
      this.clock.onPong(msg);
      return null;
    }
    return msg;
  }

  /** E-stop on both planes: the websocket (authoritative, audited) and the data channel (latch only). */
  estop() {
    const ws = this.socket.send({ type: "estop", robot: this.robot, engaged: true });
    const dc = this.viewer ? this.viewer.sendData({ type: "estop" }) : false;
    return { websocket: ws, datachannel: dc };
  }
}
