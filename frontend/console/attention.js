// Where an operator should look (docs/console.md, "Help queue"): the help queue as the console socket reports it,
// the order tiles are shown in, the tab title's count, an opt-in sound and browser notification, and the `?` overlay
// listing a page's keyboard shortcuts. Pure logic first (tested with node: tests/js/attention.test.mjs), DOM after.

export const ACTIVE = new Set(["open", "claimed"]);
const KIND_TEXT = { stall: "stalled", uncertainty: "unsure", button: "help button" };

export const kindText = (kind) => KIND_TEXT[kind] || kind;
const URGENCY_TEXT = { 3: "urgent", 2: "soon", 1: "low" };
export const urgencyText = (urgency) => URGENCY_TEXT[urgency] || String(urgency);

/** Most urgent first, then the oldest; claimed ones (someone answers them) after every open one. */
export function requestOrder(a, b) {
  const open = (r) => (r.status === "open" ? 0 : 1);
  return open(a) - open(b) || (b.urgency - a.urgency) || String(a.raised_at).localeCompare(String(b.raised_at)) || a.id - b.id;
}

/** The queue: apply the `help` frames (and the hello's list); a closed request leaves it. */
export class HelpQueue {
  constructor() {
    this.requests = new Map(); // id -> view
    this.listeners = new Set();
  }

  reset(views = []) {
    this.requests.clear();
    this.apply(views, { initial: true });
  }

  /** Returns the requests that are new to this page (for the sound and the notification). */
  apply(views = [], { initial = false } = {}) {
    const fresh = [];
    for (const view of views) {
      if (!view || typeof view.id !== "number") continue;
      if (ACTIVE.has(view.status)) {
        if (!this.requests.has(view.id) && view.status === "open") fresh.push(view);
        this.requests.set(view.id, view);
      } else {
        this.requests.delete(view.id);
      }
    }
    for (const fn of this.listeners) fn({ fresh: initial ? [] : fresh, closed: views.filter((v) => !ACTIVE.has(v.status)) });
    return initial ? [] : fresh;
  }

  onChange(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  active() {
    return [...this.requests.values()].sort(requestOrder);
  }

  open() {
    return this.active().filter((r) => r.status === "open");
  }

  forRobot(name) {
    return this.active().find((r) => r.robot === name) || null;
  }

  /** The request this operator should answer next: the one assigned to them, else the most urgent open one. */
  next(user) {
    const open = this.open();
    return open.find((r) => r.assigned_to === user) || open[0] || null;
  }
}

/** Sort rank of a robot tile: open requests (most urgent first), answered ones, e-stopped, driven by an operator,
 * running, idle, offline. Ties keep the name order. */
export function tileRank(state, request) {
  if (request && request.status === "open") return 0 + (3 - request.urgency);
  if (request) return 3;
  if (!state || !state.connected) return 9;
  if (state.estopped || state.state === "estopped") return 4;
  if (state.lease || state.control_source === "operator") return 5;
  if (state.state === "running") return 6;
  return 7;
}

export function sortTiles(names, stateOf, requestOf) {
  return [...names].sort((a, b) => tileRank(stateOf(a), requestOf(a)) - tileRank(stateOf(b), requestOf(b)) || a.localeCompare(b));
}

/** "(2) Fleet · SOP": the count of open requests in front of the page's own title. */
export function titleWithCount(base, count) {
  const plain = String(base).replace(/^\(\d+\)\s*/, "");
  return count > 0 ? `(${count}) ${plain}` : plain;
}

export function sinceText(iso, now = Date.now()) {
  const t = Date.parse(iso);
  if (!Number.isFinite(t)) return "";
  const s = Math.max(0, Math.round((now - t) / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

// ---------------------------------------------------------------- the browser side (not in the node tests)

const PREFS = "sop.attention";

/** Opt-in sound and notifications, remembered per browser. */
export class Alerts {
  constructor(storage = globalThis.localStorage) {
    this.storage = storage;
    let prefs = {};
    try { prefs = JSON.parse(storage?.getItem(PREFS) || "{}"); } catch { prefs = {}; }
    this.sound = !!prefs.sound;
    this.notify = !!prefs.notify && globalThis.Notification?.permission === "granted";
    this.context = null;
    this.played = 0; // beeps played (tests read it: a headless browser has no speakers)
    this.shown = 0; // notifications shown
  }

  save() {
    try { this.storage?.setItem(PREFS, JSON.stringify({ sound: this.sound, notify: this.notify })); } catch { /* private mode */ }
  }

  setSound(on) {
    this.sound = !!on;
    this.save();
    if (on) this.beep(); // a user gesture: the audio context may start now, and the operator hears what it sounds like
  }

  async setNotify(on) {
    if (!on) { this.notify = false; this.save(); return false; }
    if (!("Notification" in globalThis)) return false;
    const permission = Notification.permission === "granted" ? "granted" : await Notification.requestPermission();
    this.notify = permission === "granted";
    this.save();
    return this.notify;
  }

  beep() {
    try {
      this.context = this.context || new AudioContext();
      const ctx = this.context;
      const osc = ctx.createOscillator();
      const gain = ctx.createGain();
      osc.frequency.value = 880;
      gain.gain.setValueAtTime(0.0001, ctx.currentTime);
      gain.gain.exponentialRampToValueAtTime(0.2, ctx.currentTime + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, ctx.currentTime + 0.35);
      osc.connect(gain).connect(ctx.destination);
      osc.start();
      osc.stop(ctx.currentTime + 0.4);
      this.played += 1;
    } catch (err) {
      console.warn("attention: no sound", err);
    }
  }

  /** A new request: sound and notification as the operator chose. */
  announce(request, url) {
    if (this.sound) this.beep();
    if (this.notify && globalThis.Notification?.permission === "granted") {
      try {
        const n = new Notification(`${request.robot} needs help`, {
          body: `${kindText(request.kind)}: ${request.reason}`, tag: `sop-help-${request.id}`, requireInteraction: request.urgency >= 3,
        });
        n.onclick = () => { window.focus(); if (url) window.location.href = url; };
        this.shown += 1;
      } catch (err) {
        console.warn("attention: no notification", err);
      }
    }
  }
}

const typing = (e) => e.target && (e.target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName));

/** `?` opens (and Esc or `?` closes) an overlay listing ``shortcuts`` ([{keys: ["Esc"], text}]); ``handlers`` maps
 * KeyboardEvent.key to a function run when no field has the focus. Returns the overlay element. */
export function installShortcuts(shortcuts, handlers = {}) {
  const overlay = document.createElement("div");
  overlay.className = "shortcuts-overlay";
  overlay.hidden = true;
  overlay.setAttribute("role", "dialog");
  overlay.setAttribute("aria-modal", "true");
  overlay.setAttribute("aria-labelledby", "shortcuts-title");
  overlay.dataset.testid = "shortcuts";
  const rows = shortcuts.map((s) => `<tr><td>${s.keys.map((k) => `<kbd>${k}</kbd>`).join(" ")}</td><td>${s.text}</td></tr>`).join("");
  overlay.innerHTML = `<div class="shortcuts-box card"><h2 id="shortcuts-title">Keyboard shortcuts</h2>
    <table>${rows}</table><p class="small muted">Press <kbd>?</kbd> or <kbd>Esc</kbd> to close.</p>
    <button type="button" data-action="close-shortcuts">Close</button></div>`;
  document.body.appendChild(overlay);
  let opener = null;
  const open = () => { opener = document.activeElement; overlay.hidden = false; overlay.querySelector("button").focus(); };
  const close = () => { overlay.hidden = true; opener?.focus?.(); };
  overlay.querySelector("button").addEventListener("click", close);
  overlay.addEventListener("click", (e) => { if (e.target === overlay) close(); });
  window.addEventListener("keydown", (e) => {
    if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    if (!overlay.hidden) {
      if (e.key === "Escape" || e.key === "?") { e.preventDefault(); close(); }
      return;
    }
    if (e.key === "?") { e.preventDefault(); open(); return; }
    const run = handlers[e.key];
    if (run) { e.preventDefault(); run(e); }
  });
  return overlay;
}

/** A small plot of the robot's last seconds before it asked (the request's trace): how far the hand moved along x, y
 * and z from where the trace starts (cm; a stall is three flat lines), with the steps an operator drove shaded. Drawn
 * on a canvas; returns false when there is nothing to draw. */
export function drawTrace(canvas, trace, { endLabel = "asked" } = {}) {
  const ctx = canvas.getContext && canvas.getContext("2d");
  if (!ctx || !trace || trace.length < 2) return false;
  const ratio = globalThis.devicePixelRatio || 1;
  const w = canvas.clientWidth || 320;
  const h = canvas.clientHeight || 120;
  canvas.width = w * ratio;
  canvas.height = h * ratio;
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, w, h);
  const t0 = trace[0].t;
  const t1 = trace[trace.length - 1].t;
  const origin = trace[0].hand;
  const moved = trace.map((s) => s.hand.map((v, k) => (v - origin[k]) * 100));
  const span = Math.max(1, ...moved.flat().map(Math.abs)); // at least +-1 cm: a stall reads as flat, not as noise
  const left = 34;
  const pad = 14;
  const x = (t) => left + ((t - t0) / Math.max(1e-6, t1 - t0)) * (w - left - pad);
  const y = (v) => h / 2 - (v / span) * (h / 2 - pad);
  const ink = getComputedStyle(canvas).color || "#666";
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillStyle = "rgba(245, 158, 11, 0.2)";
  trace.forEach((s, i) => {
    if (s.driver !== "policy" && i + 1 < trace.length) ctx.fillRect(x(s.t), 0, x(trace[i + 1].t) - x(s.t), h);
  });
  ctx.strokeStyle = "rgba(127, 127, 127, 0.35)";
  ctx.beginPath();
  ctx.moveTo(left, y(0));
  ctx.lineTo(w - pad, y(0));
  ctx.stroke();
  ctx.fillStyle = ink;
  ctx.fillText(`+${span.toFixed(1)} cm`, 0, pad);
  ctx.fillText("0", 20, y(0) + 3);
  ctx.fillText(`−${span.toFixed(1)}`, 0, h - pad + 8);
  const colors = ["#2563eb", "#16a34a", "#dc2626"];
  ["x", "y", "z"].forEach((axis, k) => {
    ctx.strokeStyle = colors[k];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    trace.forEach((s, i) => (i ? ctx.lineTo(x(s.t), y(moved[i][k])) : ctx.moveTo(x(s.t), y(moved[i][k]))));
    ctx.stroke();
    ctx.fillStyle = colors[k];
    ctx.fillText(`Δ${axis}`, left + 40 + 26 * k, pad);
  });
  ctx.fillStyle = ink;
  ctx.fillText(`${t0.toFixed(1)} s`, left, h - 2);
  ctx.fillText(endLabel, w - pad - 28, h - 2);
  return true;
}
