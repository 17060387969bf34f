// Robot page: large live video with a HUD, takeover / release (lease), teleoperation (keyboard, gamepad) over the
// data channel with the websocket fallback, a latched E-STOP and episode labels (docs/console.md).
import { sharedSocket } from "./console/socket.js";
import { RobotViewer } from "./console/video.js";
import { TELEOP_KEYS, TeleopController } from "./console/teleop.js";
import { controlBadge, countersText, episodeText, mismatchText, num, operatorOf, setField, shortId, stateWord } from "./console/ui.js";
import { Alerts, HelpQueue, drawTrace, installShortcuts, kindText, sinceText, titleWithCount, urgencyText } from "./console/attention.js";

const root = document.getElementById("robot-console");
const ROBOT = root.dataset.robot;
const $ = (sel) => root.querySelector(sel);
const button = (action) => root.querySelector(`[data-action="${action}"]`);
const errorBox = document.getElementById("error");
const HUD_FRESH_MS = 1500; // a hud message older than this no longer describes the robot

const socket = sharedSocket();
socket.bindIndicator(document.getElementById("conn"));

let me = root.dataset.user;
let role = root.dataset.role || "viewer";
let state = null;
try { state = JSON.parse(document.getElementById("initial-robot").textContent); } catch { state = null; }
let hud = null; // the latest data-channel hud message
let hudAt = 0;
let holding = false;
let myLease = null;
let holdingSince = 0;
let pendingTakeover = null; // {at, force}
let lastStats = null;
const canOperate = () => role === "operator" || role === "admin";
const isAdmin = () => role === "admin";
const queue = new HelpQueue(); // the fleet's queue; this page shows this robot's request
const alerts = new Alerts();
const baseTitle = document.title;
// ?help=ID: the operator pressed "Answer" on the fleet page: claim it once the socket is up (once only)
let answering = Number(new URLSearchParams(window.location.search).get("help")) || null;

// ---------------------------------------------------------------- video and teleop

const video = root.querySelector("video");
const teleop = new TeleopController({ socket, robot: ROBOT, onSent: (cmd, path) => renderLink(path) });
const viewer = new RobotViewer({
  socket, robot: ROBOT, video,
  clockOffset: () => teleop.clock.offset,
  onStatus: () => renderVideoNote(),
  onData: (msg) => {
    const rest = teleop.onData(msg);
    if (rest && rest.type === "hud") {
      hud = rest;
      hudAt = Date.now();
      renderHud();
      recordLive(rest);
    }
  },
  onChannel: () => renderLink(teleop.lastPath),
});
teleop.setViewer(viewer);
const viewers = new Map([[ROBOT, viewer]]);
// Object.assign would copy the getter's value once; defineProperty keeps `holding` live for tests and benchmarks.
window.sopConsole = Object.assign(window.sopConsole || {}, { socket, viewers, teleop, robot: ROBOT, queue, alerts });
Object.defineProperty(window.sopConsole, "holding", { get: () => holding, configurable: true });

// ---------------------------------------------------------------- messages

function showError(text, { sticky = false } = {}) {
  errorBox.textContent = text;
  errorBox.hidden = !text;
  clearTimeout(showError.timer);
  if (text && !sticky) showError.timer = setTimeout(() => { errorBox.hidden = true; }, 10000);
}

function errorText(msg) {
  const holder = operatorOf(state);
  const detail = msg.detail || "";
  switch (msg.code) {
    case "held": {
      const text = detail || `held by ${holder || "another operator"}`;
      return holder && !text.includes(holder) ? `${text} (held by ${holder})` : text;
    }
    case "forbidden": return detail || "You are not allowed to do that (your role is " + role + ").";
    case "robot_offline": return detail || `${ROBOT} is offline.`;
    case "not_holder": return detail || "You do not hold this robot (any more).";
    case "unknown_robot": return detail || `${ROBOT} is not a known robot.`;
    default: return detail ? `${msg.code}: ${detail}` : `error: ${msg.code}`;
  }
}

socket.on("hello", (hello) => {
  me = hello.user || me;
  role = hello.role || role;
  const mine = (hello.robots || []).find((r) => r.name === ROBOT);
  if (mine) state = mine;
  else showError(`${ROBOT} is not in the fleet (any more).`, { sticky: true });
  setHolding(false); // a new socket: the old one's lease ended with it
  queue.reset(hello.help || []);
  if (answering) {
    const request = queue.requests.get(answering);
    answering = null;
    history.replaceState(null, "", window.location.pathname); // a reload does not claim again
    if (request && request.robot === ROBOT && request.status === "open") claimHelp(request);
    else if (request === undefined) showError("That help request is no longer open.");
  }
  render();
});

socket.on("help", (msg) => {
  const fresh = queue.apply(msg.requests || []);
  for (const r of fresh) if (r.robot === ROBOT) alerts.announce(r);
  render();
});

socket.on("robot.state", (msg) => {
  if (!msg.robot || msg.robot.name !== ROBOT) return;
  const prevEpisode = state && state.current_episode;
  state = msg.robot;
  // the lease belongs to someone else now (forced takeover), or it is gone a while after we got it
  if (holding && state.lease && myLease && state.lease.id !== myLease) setHolding(false, "another operator took the robot");
  else if (holding && state.lease === null && Date.now() - holdingSince > 3000) setHolding(false, "the lease ended");
  if (prevEpisode && prevEpisode !== state.current_episode) setField(root, "label-note", "");
  render();
});

socket.on("robot.live", (msg) => {
  const live = (msg.robots || []).find((r) => r.name === ROBOT);
  if (!live || !state) return;
  state = { ...state, ...live };
  render();
});

socket.on("robot.removed", (msg) => {
  const name = typeof msg.robot === "string" ? msg.robot : msg.robot?.name;
  if (name === ROBOT) {
    showError(`${ROBOT} was removed from the fleet.`, { sticky: true });
    setHolding(false);
    viewer.stop();
  }
});

socket.on("lease", (msg) => {
  if (msg.robot !== ROBOT) return;
  if (msg.active && msg.operator === me && pendingTakeover) {
    pendingTakeover = null;
    myLease = msg.lease;
    setHolding(true);
    showError("");
  } else if (msg.active && holding && msg.lease !== myLease) {
    setHolding(false, `${msg.operator} took over the robot`);
  } else if (!msg.active && holding && (msg.lease === myLease || myLease === null)) {
    setHolding(false, msg.reason && msg.reason !== "released" ? `your control ended: ${msg.reason}` : "");
  }
  if (state) {
    state = { ...state, lease: msg.active ? { id: msg.lease, operator: msg.operator, since: null } : (state.lease && state.lease.id === msg.lease ? null : state.lease) };
  }
  render();
});

socket.on("error", (msg) => {
  if (msg.ref && typeof msg.ref === "string" && /^[0-9a-f-]{36}$/.test(msg.ref) && msg.ref !== viewer.session) return; // another viewer's offer
  if ((msg.code === "held" || msg.code === "forbidden" || msg.code === "robot_offline") && pendingTakeover) pendingTakeover = null;
  if (msg.code === "not_holder" && holding) setHolding(false);
  showError(errorText(msg));
  render();
});

socket.on("socket.closed", () => {
  if (holding) setHolding(false, "console connection lost: the lease ended");
  pendingTakeover = null;
  render();
});

function setHolding(value, why = "") {
  if (value === holding) return;
  holding = value;
  holdingSince = value ? Date.now() : 0;
  if (!value) myLease = null;
  teleop.setHolding(value);
  root.classList.toggle("holding", value);
  if (!value && why) showError(why);
  render();
}

// ---------------------------------------------------------------- actions

function reason() {
  const select = $('[data-field="reason"]');
  const other = $('[data-field="reason-other"]');
  if (select.value === "other") return (other.value || "").trim() || "other";
  return select.value;
}

function send(msg, what) {
  if (!socket.send(msg)) {
    showError(`Not connected: could not ${what}. Reconnecting…`);
    return false;
  }
  return true;
}

function takeover(force = false) {
  if (!canOperate()) return showError("Operators only: viewers cannot take over.");
  pendingTakeover = { at: Date.now(), force };
  showError("");
  if (!send({ type: "takeover", robot: ROBOT, reason: reason(), force }, "take over")) pendingTakeover = null;
  setTimeout(() => { if (pendingTakeover && Date.now() - pendingTakeover.at >= 5000) { pendingTakeover = null; render(); } }, 5100);
  render();
}

function release() {
  send({ type: "release", robot: ROBOT }, "release");
  setHolding(false);
}

function estop() {
  if (!canOperate()) return showError("Operators only: viewers cannot e-stop.");
  const sent = teleop.estop();
  if (!sent.websocket && !sent.datachannel) showError("E-STOP NOT SENT: no connection to the server or the robot!", { sticky: true });
  else if (!sent.websocket) showError("E-stop sent to the robot over WebRTC only (server not connected): it will not be audited until cleared.");
  setField(root, "estop-note", `e-stop sent ${new Date().toLocaleTimeString()} (${[sent.websocket && "server", sent.datachannel && "robot"].filter(Boolean).join(" + ")})`);
  if (state) state = { ...state, estopped: true };
  render();
}

function clearEstop() {
  if (send({ type: "estop", robot: ROBOT, engaged: false }, "clear the e-stop")) {
    setField(root, "estop-note", `clear requested ${new Date().toLocaleTimeString()}`);
  }
}

function claimHelp(request) {
  if (!canOperate()) return showError("Operators only: viewers cannot answer help requests.");
  pendingTakeover = { at: Date.now(), force: false };
  showError("");
  if (!send({ type: "help.claim", id: request.id }, "answer the request")) pendingTakeover = null;
  setTimeout(() => { if (pendingTakeover && Date.now() - pendingTakeover.at >= 5000) { pendingTakeover = null; render(); } }, 5100);
  render();
}

function resolveHelp(outcome) {
  const request = queue.forRobot(ROBOT);
  if (!request) return;
  send({ type: "help.resolve", id: request.id, ...(outcome ? { outcome } : {}) }, "resolve the request");
}

function dismissHelp() {
  const request = queue.forRobot(ROBOT);
  if (!request) return;
  const note = window.prompt("Why is this a false alarm? (optional, helps tune the robot's detector)", "");
  if (note === null) return;
  send({ type: "help.dismiss", id: request.id, note: note.slice(0, 500) }, "dismiss the request");
}

function label(outcome) {
  const episode = state && state.current_episode;
  if (!episode) return showError("No running episode to label.");
  if (send({ type: "label", robot: ROBOT, outcome, episode_id: episode }, "label the episode")) {
    setField(root, "label-note", `marked ${shortId(episode)} as ${outcome}`);
  }
}

button("takeover").addEventListener("click", () => takeover(false));
button("force")?.addEventListener("click", () => takeover(true));
button("release").addEventListener("click", release);
button("estop").addEventListener("click", estop);
button("estop-clear").addEventListener("click", clearEstop);
button("mark-success").addEventListener("click", () => label("success"));
button("mark-failure").addEventListener("click", () => label("failure"));
button("retry-video").addEventListener("click", () => viewer.retry());
button("help-claim").addEventListener("click", () => { const r = queue.forRobot(ROBOT); if (r) claimHelp(r); });
button("help-resolve-success").addEventListener("click", () => resolveHelp("success"));
button("help-resolve-failure").addEventListener("click", () => resolveHelp("failure"));
button("help-resolve").addEventListener("click", () => resolveHelp(null));
button("help-dismiss").addEventListener("click", dismissHelp);
$('[data-field="reason"]').addEventListener("change", (e) => {
  $('[data-field="reason-other"]').hidden = e.target.value !== "other";
});

// keyboard: only while holding, never while typing in a field
const typing = (e) => e.target && (e.target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName));
window.addEventListener("keydown", (e) => {
  if (!holding || typing(e) || e.ctrlKey || e.metaKey || e.altKey || !TELEOP_KEYS.has(e.code)) return;
  e.preventDefault();
  if (e.repeat) return;
  teleop.keyDown(e.code);
  renderGrip();
});
window.addEventListener("keyup", (e) => {
  if (!TELEOP_KEYS.has(e.code)) return;
  teleop.keyUp(e.code);
  if (holding && !typing(e)) e.preventDefault(); // Space must not also click a focused button
});
window.addEventListener("blur", () => teleop.releaseAllKeys());
// Esc: E-STOP, wherever the focus is on this page (a field included); the one shortcut that never waits
window.addEventListener("keydown", (e) => {
  if (e.key !== "Escape" || e.repeat || !canOperate()) return;
  if (window.sopConsole.shortcuts && !window.sopConsole.shortcuts.hidden) return; // Esc closes the shortcut list
  e.preventDefault();
  estop();
}, true);
window.sopConsole.shortcuts = installShortcuts([
  { keys: ["Esc"], text: "E-STOP this robot (operators; works while typing too)" },
  { keys: ["W", "S"], text: "+y / −y while you hold the robot" },
  { keys: ["A", "D"], text: "−x / +x" },
  { keys: ["R", "F"], text: "+z / −z (also ↑ / ↓)" },
  { keys: ["Space"], text: "toggle the gripper" },
  { keys: ["H"], text: "answer this robot's help request (take over)" },
  { keys: ["?"], text: "show this list" },
], {
  h: () => { const r = queue.forRobot(ROBOT); if (r && r.status === "open" && !holding) claimHelp(r); },
});
window.addEventListener("gamepadconnected", (e) => setField(root, "gamepad", `Gamepad: ${e.gamepad.id} (left stick xy, triggers or right stick z, button A toggles grip)`));
window.addEventListener("gamepaddisconnected", () => setField(root, "gamepad", "Gamepad: none"));

window.addEventListener("pagehide", () => {
  if (holding) socket.send({ type: "release", robot: ROBOT }); // best effort; the server also ends it on disconnect
  viewer.stop();
  teleop.stop();
});

// ---------------------------------------------------------------- rendering

function renderGrip() {
  setField(root, "grip", teleop.grip === null ? "unchanged" : teleop.grip > 0 ? "closed" : "open");
}

function renderLink(path) {
  const text = !holding ? (viewer.channelOpen ? "data channel open" : "no data channel") :
    path === "datachannel" ? "teleop: data channel" : path === "websocket" ? "teleop: websocket fallback" : "teleop: not sent!";
  setField(root, "hud-link", text);
}

function renderVideoNote() {
  const box = root.querySelector(".tile-video");
  const online = !!(state && state.connected);
  const status = online ? viewer.status : "offline";
  box.dataset.videoState = status;
  const note = !online ? "robot offline" : { connecting: "connecting video…", retrying: viewer.error || "retrying…", live: "", closed: "video closed", offline: "robot offline" }[status] ?? "";
  setField(root, "video-note", note);
}

function deadmanText() {
  const fresh = hud && Date.now() - hudAt < HUD_FRESH_MS;
  const operator = (fresh && hud.operator) || operatorOf(state);
  const deadman = fresh ? !!hud.deadman : !!(state && state.deadman);
  if (!operator && !(fresh && hud.lease)) return { text: "off (policy drives)", cls: "deadman-off" };
  if (deadman) return { text: "DEADMAN: holding still", cls: "deadman-on" };
  const idle = holding && teleop.lastCommand && teleop.lastCommand.action.every((v) => v === 0);
  if (idle) return { text: "armed: holding still (no input)", cls: "deadman-armed" };
  return { text: holding ? "armed: driving" : "armed", cls: "deadman-armed" };
}

function renderHud() {
  const fresh = hud && Date.now() - hudAt < HUD_FRESH_MS;
  const s = lastStats;
  const robotFps = (fresh && hud.video_fps) || (state && state.video_fps);
  setField(root, "hud-fps", s && s.fps !== null ? `${num(s.fps, 1)} fps` + (robotFps ? ` (robot ${num(robotFps, 0)})` : "") : "– fps");
  setField(root, "hud-frames", s ? String(s.framesDecoded) : "–");
  const rtt = s && s.rttMs !== null ? s.rttMs : teleop.clock.rttMs;
  setField(root, "hud-rtt", rtt !== null && rtt !== undefined ? `${num(rtt, 0)} ms` : "– ms");
  const latency = s && s.stampLatencyMs !== null && s.stampLatencyMs !== undefined
    ? `${num(s.stampLatencyMs, 0)} ms (stamp)` : s && s.latencyMs !== null ? `~${num(s.latencyMs, 0)} ms` : "– ms";
  setField(root, "hud-latency", latency);
  const age = fresh ? hud.last_command_age_ms : state && state.last_command_age_ms;
  setField(root, "hud-staleness", age !== null && age !== undefined ? `${num(age, 0)} ms` : "–",
    { class: age > 250 ? "stale" : "" });
  const dm = deadmanText();
  setField(root, "hud-deadman", dm.text, { class: dm.cls });
  const operator = (fresh && hud.operator) || operatorOf(state);
  const drops = fresh && hud.dropped ? ` · dropped ${hud.dropped.stale ?? 0} stale / ${hud.dropped.replayed ?? 0} replayed` : "";
  setField(root, "hud-lease", operator ? `${operator}${operator === me ? " (you)" : ""}${drops}` : "–");
  const step = fresh && typeof hud.step === "number" ? hud.step : state && state.current_step;
  setField(root, "hud-step", step !== null && step !== undefined ? String(step) : "–");
}

function setButton(action, { disabled, hidden, title, text } = {}) {
  const el = button(action);
  if (!el) return;
  if (disabled !== undefined) el.disabled = disabled;
  if (hidden !== undefined) el.hidden = hidden;
  if (title !== undefined) el.title = title;
  if (text !== undefined) el.textContent = text;
}

function render() {
  const s = state || {};
  const online = !!s.connected;
  const estopped = !!(s.estopped || s.state === "estopped");
  const holder = operatorOf(s);
  const heldByOther = !!holder && holder !== me;
  const operate = canOperate();
  const viewerOnly = "Operators only: you are signed in as a " + role;

  const badge = controlBadge(state);
  setField(root, "control", badge.text, { class: `badge control ${badge.cls}`, title: badge.title });
  const word = stateWord(state);
  setField(root, "state", word, { class: `badge state ${word}` });
  setField(root, "role", role);
  setField(root, "task", s.current_task || "no task");
  setField(root, "prompt", s.current_prompt ? `“${s.current_prompt}”` : "");
  setField(root, "episode", episodeText(state));
  setField(root, "counters", countersText(state));
  setField(root, "held-by", holding ? `you hold ${ROBOT}` : holder ? `held by ${holder}` : online ? "policy drives (no one holds it)" : "robot offline",
    { class: heldByOther ? "held-other" : holding ? "held-me" : "" });
  root.classList.toggle("estopped", estopped);
  setField(root, "mismatch", mismatchText(s));

  // fieldsets disabled server-side for viewers; the hello's role may differ from the page's (a role changed)
  root.querySelectorAll(".takeover-box, .label-box").forEach((f) => { f.disabled = !operate; f.title = operate ? "" : viewerOnly; });
  setButton("takeover", {
    disabled: !operate || holding || !!pendingTakeover || !online,
    hidden: holding,
    text: pendingTakeover ? "Taking over…" : "Take over",
    title: !operate ? viewerOnly : !online ? "the robot is offline" : heldByOther ? `held by ${holder}: you will be refused` : "drive this robot (W/A/S/D, R/F, Space)",
  });
  setButton("release", { disabled: !operate || !holding, title: holding ? "give control back to the policy" : "you do not hold this robot" });
  setButton("force", { hidden: !(isAdmin() && heldByOther), disabled: !online || !!pendingTakeover, title: `take the robot from ${holder}` });
  setButton("estop", {
    disabled: !operate,
    text: estopped ? "E-STOPPED" : "E-STOP",
    title: !operate ? viewerOnly : estopped ? `latched${s.estopped_by ? ` by ${s.estopped_by}` : ""}; clear it to run again` : "Emergency stop: ends the episode, holds the robot still until cleared",
  });
  setButton("estop-clear", { hidden: !estopped, disabled: !operate || !online, title: operate ? "clear the latch: the robot starts a new episode" : viewerOnly });
  const episode = s.current_episode;
  const canLabel = operate && online && !!episode && !estopped;
  setButton("mark-success", { disabled: !canLabel, title: !operate ? viewerOnly : episode ? `end ${shortId(episode)} as a success` : "no running episode" });
  setButton("mark-failure", { disabled: !canLabel, title: !operate ? viewerOnly : episode ? `end ${shortId(episode)} as a failure` : "no running episode" });
  setField(root, "label-episode", episode ? shortId(episode) : "none");
  setField(root, "teleop-state", holding ? "(active: you hold the robot)" : "(while you hold the robot)");
  renderHelp();
  viewer.setOnline(online);
  renderVideoNote();
  renderHud();
  renderGrip();
  renderLink(teleop.lastPath);
}

// ---------------------------------------------------------------- live plot: the robot's last 10 s (hud, 10 Hz)

const LIVE_S = 10;
const live = []; // {t (ms), hand, grip, action, driver}
let liveDrawn = 0;
window.sopConsole.live = live;

function recordLive(msg) {
  if (!Array.isArray(msg.hand) || msg.hand.length !== 3) return;
  const now = Date.now();
  const last = live[live.length - 1];
  if (last && last.step === msg.step) return; // the robot has not stepped since the last hud
  live.push({ t: now, step: msg.step, hand: msg.hand, grip: msg.grip, action: msg.action || [], driver: msg.driver || "policy" });
  while (live.length && live[0].t < now - LIVE_S * 1000) live.shift();
  if (now - liveDrawn > 250) { // 4 redraws a second are plenty for a person
    liveDrawn = now;
    drawTrace($('[data-field="live-plot"]'), live.map((s) => ({ ...s, t: (s.t - now) / 1000 })), { endLabel: "now" });
    const a = live[live.length - 1].action;
    setField(root, "live-action", a.length ? `Last action: [${a.map((v) => v.toFixed(2)).join(", ")}] by ${live[live.length - 1].driver.replace("_", " ")}.` : "");
  }
}

let drawnTrace = null;

function renderHelp() {
  const request = queue.forRobot(ROBOT);
  const box = $('[data-field="help-box"]');
  document.title = titleWithCount(baseTitle, queue.open().length);
  box.hidden = !request;
  root.classList.toggle("needs-help", !!request && request.status === "open");
  if (!request) return;
  const mine = holding && request.status === "claimed" && request.claimed_by === me;
  setField(root, "help-title", request.status === "open" ? `${ROBOT} asks for help` : `answered by ${request.claimed_by}${mine ? " (you)" : ""}`);
  setField(root, "help-urgency", urgencyText(request.urgency), { class: `badge urgency u${request.urgency}` });
  setField(root, "help-reason", `${kindText(request.kind)}: ${request.reason}`);
  const assigned = request.assigned_to ? (request.assigned_to === me ? "assigned to you" : `assigned to ${request.assigned_to}`) : "unassigned";
  setField(root, "help-meta", `asking for ${sinceText(request.raised_at)} · step ${request.step} · ${assigned} · request #${request.id}`);
  if (drawnTrace !== request.id) drawnTrace = drawTrace($('[data-field="help-trace"]'), request.trace) ? request.id : null;
  const operate = canOperate();
  setButton("help-claim", { hidden: request.status !== "open", disabled: !operate || !state?.connected || !!pendingTakeover,
    text: pendingTakeover ? "Taking over…" : "Answer: take over" });
  for (const action of ["help-resolve-success", "help-resolve-failure", "help-resolve"]) setButton(action, { hidden: !mine, disabled: !mine });
  setButton("help-dismiss", { disabled: !operate || (request.status === "claimed" && !mine && !isAdmin()) });
}
setInterval(() => { if (queue.forRobot(ROBOT)) renderHelp(); }, 1000);

async function pollStats() {
  try {
    lastStats = await viewer.stats();
  } catch {
    lastStats = null;
  }
  renderHud();
}

render();
viewer.setOnline(!!(state && state.connected));
viewer.start();
teleop.start();
socket.start();
setInterval(pollStats, 500);
