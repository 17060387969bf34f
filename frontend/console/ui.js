// Shared view helpers of the live pages: escaping, formatting, the control badge of a robot state (docs/console.md,
// "A robot state"). No DOM access at import time.

export const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
export const pct = (x) => (x === null || x === undefined || Number.isNaN(x) ? "–" : `${Math.round(x * 100)}%`);
export const num = (x, digits = 0) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–");
export const shortId = (id) => (id ? String(id).slice(0, 8) : "");

export function ago(iso, now = Date.now()) {
  if (!iso) return "–";
  const s = Math.max(0, (now - Date.parse(iso)) / 1000);
  return s < 60 ? `${Math.round(s)} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : new Date(iso).toLocaleString();
}

/** Who drives the robot now, as a operator's name, or "" (lease or status report). */
export function operatorOf(state) {
  if (!state) return "";
  return (state.lease && state.lease.operator) || state.operator || state.operator_name || "";
}

/**
 * The control badge: {text, cls, title}. E-stop wins, then offline, then a human takeover (with the deadman),
 * the simulated operator, and the policy (with its version).
 */
export function controlBadge(state) {
  if (!state) return { text: "–", cls: "unknown", title: "" };
  if (state.estopped || state.state === "estopped") {
    const by = state.estopped_by ? `e-stopped by ${state.estopped_by}` : "e-stopped";
    // What the robot reports wins over what the server asked: a latch it has not confirmed is not a stopped robot.
    if (state.connected && state.reported_estopped === false) {
      return { text: "E-STOP NOT CONFIRMED", cls: "estopped mismatch", title: `${by}; the robot still reports running: the server re-sends the e-stop` };
    }
    return { text: "E-STOPPED", cls: "estopped", title: by };
  }
  if (!state.connected) return { text: "offline", cls: "offline", title: "the robot is not connected" };
  const operator = operatorOf(state);
  if (operator || state.control_source === "operator") {
    if (state.deadman) {
      return { text: `deadman · ${operator || "operator"}`, cls: "deadman", title: "no fresh command: the robot holds still" };
    }
    return { text: `operator ${operator || "?"}`, cls: "operator", title: "a human operator drives" };
  }
  if (state.control_source === "sim_operator") return { text: "simulated operator", cls: "sim_operator", title: "the scripted supervisor drives" };
  const policy = state.policy_version ? `policy v${state.policy_version}` : `policy${state.policy_name ? ` ${state.policy_name}` : ""}`;
  return { text: policy, cls: "policy", title: state.policy_error ? `checkpoint rejected: ${state.policy_error}` : "the policy drives" };
}

/** Where the robot's report disagrees with what the server asked (the server is re-sending), as one line, or "". */
export function mismatchText(state) {
  const found = (state && state.connected && Array.isArray(state.mismatch)) ? state.mismatch : [];
  return found.length ? `⚠ ${found.join(" · ")}` : "";
}

/** The robot's state word for its state badge. */
export function stateWord(state) {
  if (!state) return "unknown";
  if (state.estopped) return "estopped";
  return state.connected ? state.state || "idle" : "offline";
}

/** Episode text: "1a2b3c4d · step 42" or "–". */
export function episodeText(state) {
  if (!state || !state.current_episode) return "–";
  return `${shortId(state.current_episode)} · step ${state.current_step ?? 0}`;
}

/** Live counters: "12 episodes today · 58% success · 3 interventions". */
export function countersText(state) {
  if (!state) return "";
  const n = state.episodes_today;
  const parts = [
    `${n ?? "–"} episode${n === 1 ? "" : "s"} today`,
    `${pct(state.success_rate_today)} success`,
    `${state.interventions_today ?? "–"} intervention${state.interventions_today === 1 ? "" : "s"}`,
  ];
  return parts.join(" · ");
}

/** Sets textContent of `[data-field=name]` under root (no-op if missing). */
export function setField(root, name, text, attrs = {}) {
  const el = root.querySelector(`[data-field="${name}"]`);
  if (!el) return null;
  if (text !== undefined && el.textContent !== String(text)) el.textContent = text;
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (v === null || v === undefined) el.removeAttribute(k);
    else el.setAttribute(k, v);
  }
  return el;
}
