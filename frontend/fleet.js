// Fleet page: a tile per robot with live video (WebRTC), control badge and live counters, all from robot.state
// messages of the one console socket (docs/console.md). The learning panel and the latest episodes poll the REST API.
import { sharedSocket } from "./console/socket.js";
import { RobotViewer } from "./console/video.js";
import { ago, controlBadge, countersText, episodeText, esc, mismatchText, num, pct, setField, stateWord } from "./console/ui.js";
import { Alerts, HelpQueue, installShortcuts, kindText, sinceText, sortTiles, titleWithCount, urgencyText } from "./console/attention.js";

const LEARN_REFRESH_MS = 5000;
const EPISODES_REFRESH_MS = 5000;

const root = document.getElementById("fleet");
const grid = document.getElementById("tiles");
const tileTemplate = document.getElementById("tile-template");
const episodesTable = document.getElementById("episodes");
const errorBox = document.getElementById("fleet-error");
const MAX_VIDEOS = Math.max(1, Number(root.dataset.maxVideos) || 6);
const robotUrl = (name) => root.dataset.robotUrl.replace("ROBOT", encodeURIComponent(name));
const answerUrl = (request) => `${robotUrl(request.robot)}?help=${request.id}`;
let me = root.dataset.user;
let role = root.dataset.role || "viewer";
const canOperate = () => role === "operator" || role === "admin";

const socket = sharedSocket();
socket.bindIndicator(document.getElementById("conn"));

/** name -> {name, el, state, viewer, visible, pinnedAt} */
const tiles = new Map();
const viewers = new Map(); // name -> RobotViewer (window.sopConsole.viewers)
const queue = new HelpQueue();
const alerts = new Alerts();
const baseTitle = document.title;
window.sopConsole = Object.assign(window.sopConsole || {}, { socket, viewers, tiles, queue, alerts });

// ---------------------------------------------------------------- tiles

const observer = "IntersectionObserver" in window
  ? new IntersectionObserver((entries) => {
    for (const entry of entries) {
      const tile = tiles.get(entry.target.dataset.robot);
      if (tile) tile.visible = entry.isIntersecting;
    }
    scheduleAllocation();
  }, { rootMargin: "100px" })
  : null;

function ensureTile(name) {
  let tile = tiles.get(name);
  if (tile) return tile;
  let el = grid.querySelector(`[data-robot="${CSS.escape(name)}"]`);
  if (!el) {
    el = document.createElement("article");
    el.className = "tile";
    el.dataset.robot = name;
    grid.appendChild(el);
    document.getElementById("no-robots")?.remove();
  }
  el.replaceChildren(tileTemplate.content.cloneNode(true));
  setField(el, "name", name);
  setField(el, "link", undefined, { href: robotUrl(name), title: `open ${name}` });
  el.querySelector("video").setAttribute("aria-label", `live camera of ${name}`);
  tile = { name, el, state: null, viewer: null, visible: !observer, pinnedAt: 0 };
  el.querySelector('[data-action="watch"]').addEventListener("click", () => {
    tile.pinnedAt = Date.now();
    allocateVideos();
  });
  tiles.set(name, tile);
  if (observer) observer.observe(el);
  return tile;
}

function removeTile(name) {
  const tile = tiles.get(name);
  if (!tile) return;
  stopVideo(tile);
  if (observer) observer.unobserve(tile.el);
  tile.el.remove();
  tiles.delete(name);
  renderSummary();
}

function renderTile(tile) {
  const s = tile.state;
  const el = tile.el;
  const badge = controlBadge(s);
  setField(el, "control", badge.text, { class: `badge control ${badge.cls}`, title: badge.title });
  const word = stateWord(s);
  setField(el, "state", word, { class: `badge state ${word}` });
  el.dataset.connected = s && s.connected ? "true" : "false";
  el.dataset.control = badge.cls;
  el.classList.toggle("offline", !(s && s.connected));
  el.classList.toggle("estopped", badge.cls === "estopped");
  el.classList.toggle("operated", badge.cls === "operator" || badge.cls === "deadman");
  setField(el, "task", s?.current_task || "no task");
  setField(el, "prompt", s?.current_prompt ? `“${s.current_prompt}”` : "");
  setField(el, "episode", episodeText(s));
  setField(el, "counters", countersText(s));
  setField(el, "loop", s?.connected && s.loop_hz ? `${num(s.loop_hz, 1)} Hz` : "");
  setField(el, "viewers", s?.connected && s.viewers ? `· ${s.viewers} watching` : "");
  setField(el, "policy-error", s?.policy_error ? "· checkpoint rejected" : "", { title: s?.policy_error || null });
  setField(el, "mismatch", mismatchText(s));
  const help = queue.forRobot(tile.name);
  el.classList.toggle("needs-help", !!help && help.status === "open");
  el.classList.toggle("helped", !!help && help.status === "claimed");
  el.dataset.urgency = help ? String(help.urgency) : "";
  setField(el, "help", help ? (help.status === "open" ? `needs help: ${kindText(help.kind)}` : `answered by ${help.claimed_by}`) : "",
    { hidden: help ? null : "", title: help ? help.reason : null });
  renderVideoNote(tile);
}

function renderVideoNote(tile) {
  const box = tile.el.querySelector(".tile-video");
  const watch = tile.el.querySelector('[data-action="watch"]');
  const online = !!(tile.state && tile.state.connected);
  let note = "";
  let state = "idle";
  if (!online) {
    note = "robot offline";
    state = "offline";
  } else if (tile.viewer) {
    state = tile.viewer.status;
    note = { connecting: "connecting video…", live: "", retrying: tile.viewer.error || "retrying…", offline: "robot offline" }[state] ?? "";
  } else if (tile.visible) {
    note = "";
    state = "placeholder";
  }
  box.dataset.videoState = state;
  setField(tile.el, "video-note", note);
  watch.hidden = !(online && !tile.viewer && state === "placeholder");
}

// ---------------------------------------------------------------- video slots

function startVideo(tile) {
  if (tile.viewer) return;
  const video = tile.el.querySelector("video");
  tile.viewer = new RobotViewer({
    socket, robot: tile.name, video,
    onStatus: () => renderVideoNote(tile),
  });
  tile.viewer.setOnline(!!tile.state?.connected);
  tile.viewer.start();
  viewers.set(tile.name, tile.viewer);
  renderVideoNote(tile);
}

function stopVideo(tile) {
  if (!tile.viewer) return;
  tile.viewer.stop(); // sends webrtc.close
  tile.viewer = null;
  viewers.delete(tile.name);
  renderVideoNote(tile);
}

let allocTimer = null;
function scheduleAllocation() {
  clearTimeout(allocTimer);
  allocTimer = setTimeout(allocateVideos, 250); // scrolling past tiles does not open and close videos
}

/** Visible, online tiles get video: clicked ("pinned") ones first, then in page order, at most MAX_VIDEOS. */
function allocateVideos() {
  const order = [...grid.querySelectorAll(".tile[data-robot]")].map((el) => tiles.get(el.dataset.robot)).filter(Boolean);
  const candidates = order.filter((t) => t.visible && t.state && t.state.connected);
  const pinned = candidates.filter((t) => t.pinnedAt).sort((a, b) => b.pinnedAt - a.pinnedAt);
  const rest = candidates.filter((t) => !t.pinnedAt);
  const chosen = new Set([...pinned, ...rest].slice(0, MAX_VIDEOS));
  for (const t of pinned) if (!chosen.has(t)) t.pinnedAt = 0; // bumped out by newer clicks
  for (const t of order) {
    if (!chosen.has(t)) stopVideo(t);
  }
  for (const t of chosen) startVideo(t);
  for (const t of order) renderVideoNote(t);
}

// ---------------------------------------------------------------- state

function applyState(state) {
  if (!state || !state.name) return;
  if (state.revoked) {
    removeTile(state.name);
    return;
  }
  const tile = ensureTile(state.name);
  const prev = tile.state;
  tile.state = state;
  renderTile(tile);
  if (tile.viewer) tile.viewer.setOnline(!!state.connected);
  if (!prev || prev.connected !== state.connected) scheduleAllocation();
  if (prev && prev.current_episode && prev.current_episode !== state.current_episode) scheduleEpisodes();
  if (!prev || prev.connected !== state.connected || prev.state !== state.state || !!prev.lease !== !!state.lease
      || prev.estopped !== state.estopped) scheduleOrder();
}

// ---------------------------------------------------------------- attention: tile order and the help queue

let orderTimer = null;
function scheduleOrder() {
  clearTimeout(orderTimer);
  orderTimer = setTimeout(orderTiles, 100);
}

/** Robots asking for help first (most urgent, oldest), then answered ones, e-stopped, driven, running, idle, offline.
 * The DOM order itself changes (keyboard and screen-reader order follow what is seen); videos keep playing. */
function orderTiles() {
  const names = [...grid.querySelectorAll(".tile[data-robot]")].map((el) => el.dataset.robot);
  const order = sortTiles(names, (n) => tiles.get(n)?.state, (n) => queue.forRobot(n));
  if (order.every((n, i) => n === names[i])) return;
  for (const name of order) {
    const tile = tiles.get(name);
    if (tile) grid.appendChild(tile.el);
  }
  scheduleAllocation(); // the first MAX_VIDEOS visible tiles get video: the ones asking for help now among them
}

const queueBox = document.getElementById("help-queue");
const queueList = queueBox.querySelector('[data-field="help-list"]');

function helpItem(r) {
  const mine = r.assigned_to && r.assigned_to === me;
  const who = r.status === "claimed" ? `answered by ${esc(r.claimed_by)}`
    : mine ? "<strong>assigned to you</strong>" : r.assigned_to ? `assigned to ${esc(r.assigned_to)}` : "unassigned";
  const actions = r.status === "open" && canOperate()
    ? `<a class="button primary" data-action="answer" href="${esc(answerUrl(r))}" aria-label="answer ${esc(r.robot)}'s request: open the robot and take it over">Answer</a>
       <button type="button" data-action="dismiss" data-help="${r.id}" aria-label="dismiss ${esc(r.robot)}'s request as a false alarm">False alarm</button>`
    : `<a class="button" href="${esc(robotUrl(r.robot))}">Open</a>`;
  return `<li class="help-item ${r.status} urgency-${r.urgency}${mine ? " mine" : ""}" data-help="${r.id}" data-robot="${esc(r.robot)}" data-testid="help-item">
    <span class="badge urgency u${r.urgency}">${urgencyText(r.urgency)}</span>
    <div class="help-text"><a href="${esc(robotUrl(r.robot))}"><strong>${esc(r.robot)}</strong></a>
      <span class="kind">${esc(kindText(r.kind))}</span> · ${esc(r.reason)}
      <div class="small muted">asking for <span data-since="${esc(r.raised_at)}">${sinceText(r.raised_at)}</span> · ${who}</div></div>
    <span class="help-actions">${actions}</span></li>`;
}

function renderQueue() {
  const active = queue.active();
  const open = active.filter((r) => r.status === "open").length;
  queueList.innerHTML = active.map(helpItem).join("");
  setField(queueBox, "help-count", String(open), { class: `count${open ? " hot" : ""}` });
  queueBox.classList.toggle("has-requests", open > 0);
  queueBox.querySelector('[data-field="help-empty"]').hidden = active.length > 0;
  document.title = titleWithCount(baseTitle, open);
  set("help", open); // the summary tile
  for (const tile of tiles.values()) if (tile.state) renderTile(tile);
  scheduleOrder();
}

function set(k, v) {
  const el = document.querySelector(`[data-stat="${k}"]`);
  if (el) el.textContent = v;
}

queue.onChange(({ fresh }) => {
  renderQueue();
  for (const r of fresh) alerts.announce(r, answerUrl(r));
});
queueList.addEventListener("click", (e) => {
  const dismiss = e.target.closest('[data-action="dismiss"]');
  if (!dismiss) return;
  const note = window.prompt("Why is this a false alarm? (optional, helps tune the robot's detector)", "") ?? null;
  if (note === null) return;
  socket.send({ type: "help.dismiss", id: Number(dismiss.dataset.help), note: note.slice(0, 500) });
});
setInterval(() => {
  for (const el of queueList.querySelectorAll("[data-since]")) el.textContent = sinceText(el.dataset.since);
}, 1000);

const prefs = {
  sound: queueBox.querySelector('[data-pref="sound"]'),
  notify: queueBox.querySelector('[data-pref="notify"]'),
  capacity: queueBox.querySelector('[data-pref="capacity"]'),
};
prefs.sound.checked = alerts.sound;
prefs.notify.checked = alerts.notify;
prefs.sound.addEventListener("change", () => alerts.setSound(prefs.sound.checked));
prefs.notify.addEventListener("change", async () => {
  const wanted = prefs.notify.checked;
  prefs.notify.checked = await alerts.setNotify(wanted);
  if (wanted && !prefs.notify.checked) showError("Notifications are blocked for this site: allow them in the browser's site settings.");
});
const CAPACITY = "sop.capacity";
if (prefs.capacity) {
  prefs.capacity.value = localStorage.getItem(CAPACITY) || "1";
  prefs.capacity.addEventListener("change", () => {
    localStorage.setItem(CAPACITY, prefs.capacity.value);
    socket.send({ type: "help.capacity", capacity: Number(prefs.capacity.value) });
  });
}

const shortcuts = installShortcuts([
  { keys: ["A"], text: "answer the next help request (yours first, else the most urgent)" },
  { keys: ["?"], text: "show this list" },
  { keys: ["Esc"], text: "on a robot's page: E-STOP that robot" },
], {
  a: () => {
    const next = queue.next(me);
    if (next && canOperate()) window.location.href = answerUrl(next);
  },
});
queueBox.querySelector('[data-action="shortcuts"]').addEventListener("click", () => {
  window.dispatchEvent(new KeyboardEvent("keydown", { key: "?" }));
});
window.sopConsole.shortcuts = shortcuts;

function renderSummary() {
  const robots = [...tiles.values()].map((t) => t.state).filter(Boolean);
  const sum = (f) => robots.reduce((n, r) => n + (r[f] || 0), 0);
  const total = sum("verified_episode_count");
  set("online", `${robots.filter((r) => r.connected).length} / ${robots.length}`);
  set("episodes", total);
  const rated = sum("rated_online_count"); // the fleet's own work: an operator's rescue is not the policy's success
  set("autonomous", rated ? pct(sum("autonomous_success_count") / rated) : "–");
  set("spool", sum("spool_pending"));
}

function showError(text) {
  errorBox.textContent = text;
  errorBox.hidden = !text;
  clearTimeout(showError.timer);
  if (text) showError.timer = setTimeout(() => { errorBox.hidden = true; }, 8000);
}

socket.on("hello", (hello) => {
  me = hello.user || me;
  role = hello.role || role;
  queue.reset(hello.help || []);
  const capacity = Number(localStorage.getItem(CAPACITY) || 1);
  if (canOperate() && capacity > 1) socket.send({ type: "help.capacity", capacity });
  const names = new Set((hello.robots || []).map((r) => r.name));
  for (const name of [...tiles.keys()]) if (!names.has(name)) removeTile(name);
  for (const state of hello.robots || []) applyState(state);
  renderSummary();
  scheduleAllocation();
});
socket.on("robot.state", (msg) => { applyState(msg.robot); renderSummary(); });
// volatile values of robots whose heartbeats changed nothing else: merged into the last state of each
socket.on("robot.live", (msg) => {
  for (const live of msg.robots || []) {
    const tile = tiles.get(live.name);
    if (tile && tile.state) applyState({ ...tile.state, ...live });
  }
  renderSummary();
});
socket.on("help", (msg) => queue.apply(msg.requests || []));
socket.on("robot.removed", (msg) => removeTile(typeof msg.robot === "string" ? msg.robot : msg.robot?.name));
socket.on("error", (msg) => {
  if (msg.code === "forbidden" || msg.code === "unknown_robot" || msg.code === "malformed" || msg.code === "invalid"
      || msg.code === "held") {
    showError(msg.detail || msg.code);
  }
});

// the page renders at once from the database; the socket's hello replaces it
try {
  for (const state of JSON.parse(document.getElementById("initial-robots").textContent)) applyState(state);
} catch (err) {
  console.warn("fleet: no initial robots", err);
}
renderSummary();
scheduleAllocation();
socket.start();

window.addEventListener("pagehide", () => { for (const t of tiles.values()) stopVideo(t); });

// ---------------------------------------------------------------- REST panels: learning and latest episodes

async function getJSON(url) {
  const resp = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  if (resp.status === 401) { window.location.reload(); throw new Error("logged out"); }
  if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
  return resp.json();
}

const badge = (text, cls = text) => `<span class="badge ${esc(cls)}">${esc(String(text).replace("_", " "))}</span>`;

function renderLearning(runs, checkpoints) {
  const el = (k) => document.querySelector(`[data-learn="${k}"]`);
  const deployed = checkpoints.find((c) => c.deployed);
  el("deployed").textContent = deployed
    ? `v${deployed.version} (${deployed.algorithm}, step ${deployed.step})`
    : "none yet (robots run their built-in policy)";
  const run = runs[0];
  if (!run) return;
  const continuous = run.total_steps >= 1e6; // online post-training runs until someone stops it
  const pctDone = continuous ? 100 : Math.min(100, (100 * run.step) / Math.max(1, run.total_steps));
  const steps = continuous ? `step ${run.step}, runs until stopped` : `step ${run.step} / ${run.total_steps}`;
  el("run").innerHTML = `Run ${run.id} · ${esc(run.algorithm)} on ${esc(run.tasks.join(", "))} ${badge(run.status)} ` +
    `<span class="muted">${steps}</span>`;
  el("bar").classList.toggle("continuous", continuous && run.status === "running");
  el("message").textContent = run.message;
  el("bar").style.width = `${pctDone.toFixed(1)}%`;
}

function renderEpisodes(episodes) {
  const body = episodesTable.tBodies[0];
  if (!episodes.length) {
    body.innerHTML = `<tr><td colspan="9" class="muted">No episodes yet.</td></tr>`;
    return;
  }
  body.innerHTML = episodes.map((e) => `<tr>
      <td>${e.status === "recording" ? "running now" : ago(e.ended_at || e.started_at)}</td>
      <td><a href="${esc(robotUrl(e.robot))}">${esc(e.robot)}</a></td>
      <td>${esc(e.task)}<div class="prompt">${esc(e.prompt)}</div></td>
      <td>${e.policy_version ? `v${e.policy_version}` : esc(e.policy_name || "–")}</td>
      <td>${e.steps}</td>
      <td>${e.outcome ? badge(e.outcome) : "–"}</td>
      <td>${e.intervention_count ? `${e.intervention_count} (${e.intervention_steps} steps)` : "–"}</td>
      <td>${esc(e.split)}</td>
      <td>${badge(e.status)}</td>
    </tr>`).join("");
}

const updated = document.getElementById("updated");

async function refreshLearning() {
  try {
    const learning = document.getElementById("learning");
    const [runs, checkpoints] = await Promise.all([
      getJSON(`${learning.dataset.runs}?page_size=1`),
      getJSON(`${learning.dataset.checkpoints}?deployed=1`),
    ]);
    renderLearning(runs.results ?? runs, checkpoints.results ?? checkpoints);
  } catch (err) {
    updated.textContent = `Learning update failed: ${err.message}; retrying…`;
  }
}

let episodesTimer = null;
async function refreshEpisodes() {
  clearTimeout(episodesTimer);
  try {
    const episodes = await getJSON(`${episodesTable.dataset.url}?page_size=12`);
    renderEpisodes(episodes.results ?? episodes);
    updated.textContent = `Episodes updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    updated.textContent = `Episodes update failed: ${err.message}; retrying…`;
  }
  episodesTimer = setTimeout(refreshEpisodes, EPISODES_REFRESH_MS);
}

function scheduleEpisodes() {
  clearTimeout(episodesTimer);
  episodesTimer = setTimeout(refreshEpisodes, 1500); // an episode ended: its upload lands within a moment
}

refreshLearning();
setInterval(refreshLearning, LEARN_REFRESH_MS);
refreshEpisodes();
