// Fleet page: robots and latest episodes, refreshed every 2 s from the REST API.
const REFRESH_MS = 2000;
const robotsTable = document.getElementById("robots");
const episodesTable = document.getElementById("episodes");

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const badge = (text, cls = text) => `<span class="badge ${esc(cls)}">${esc(String(text).replace("_", " "))}</span>`;
const pct = (x) => (x === null || x === undefined ? "–" : `${Math.round(x * 100)}%`);
const ago = (iso) => {
  if (!iso) return "–";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return s < 60 ? `${Math.round(s)} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : new Date(iso).toLocaleString();
};

async function getJSON(url) {
  const resp = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  if (resp.status === 401 || resp.status === 403) { window.location.reload(); throw new Error("logged out"); }
  if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
  return resp.json();
}

function renderRobots(robots) {
  const body = robotsTable.tBodies[0];
  if (!robots.length) {
    body.innerHTML = `<tr><td colspan="10" class="muted">No robots yet. Add one with <code>python manage.py add_robot NAME</code>.</td></tr>`;
    return;
  }
  body.innerHTML = robots.map((r) => {
    const state = r.connected ? r.state : "offline";
    const policy = r.policy_version ? `v${r.policy_version}` : (r.policy_name || "–");
    const loop = r.connected && r.loop_hz ? `${r.loop_hz.toFixed(1)} Hz · p99 ${r.loop_p99_ms.toFixed(0)} ms` : "–";
    return `<tr>
      <td><strong>${esc(r.name)}</strong><div class="prompt">seen ${ago(r.last_seen)}</div></td>
      <td>${badge(state)}</td>
      <td>${esc(r.current_task || "–")}<div class="prompt">${esc(r.current_prompt || "")}</div></td>
      <td>${r.current_episode ? `${esc(r.current_episode.slice(0, 8))} · ${r.current_step}` : "–"}</td>
      <td>${badge(r.control_source)}</td>
      <td>${esc(policy)}${r.policy_error ? `<div class="prompt error" title="${esc(r.policy_error)}">checkpoint rejected</div>` : ""}</td>
      <td>${loop}</td>
      <td>${r.spool_pending ?? 0}</td>
      <td>${r.verified_episode_count}</td>
      <td>${r.verified_episode_count ? pct(r.successful_episode_count / r.verified_episode_count) : "–"}</td>
    </tr>`;
  }).join("");
}

function renderEpisodes(episodes) {
  const body = episodesTable.tBodies[0];
  if (!episodes.length) {
    body.innerHTML = `<tr><td colspan="9" class="muted">No episodes yet.</td></tr>`;
    return;
  }
  body.innerHTML = episodes.map((e) => `<tr>
      <td>${e.status === "recording" ? "running now" : ago(e.ended_at || e.started_at)}</td>
      <td>${esc(e.robot)}</td>
      <td>${esc(e.task)}<div class="prompt">${esc(e.prompt)}</div></td>
      <td>${e.policy_version ? `v${e.policy_version}` : esc(e.policy_name || "–")}</td>
      <td>${e.steps}</td>
      <td>${e.outcome ? badge(e.outcome) : "–"}</td>
      <td>${e.intervention_count ? `${e.intervention_count} (${e.intervention_steps} steps)` : "–"}</td>
      <td>${esc(e.split)}</td>
      <td>${badge(e.status)}</td>
    </tr>`).join("");
}

function renderSummary(robots) {
  const set = (k, v) => { document.querySelector(`[data-stat="${k}"]`).textContent = v; };
  const sum = (f) => robots.reduce((n, r) => n + (r[f] || 0), 0);
  const total = sum("verified_episode_count");
  set("online", `${robots.filter((r) => r.connected).length} / ${robots.length}`);
  set("episodes", total);
  set("success", total ? pct(sum("successful_episode_count") / total) : "–");
  set("spool", sum("spool_pending"));
}

function renderLearning(runs, checkpoints) {
  const el = (k) => document.querySelector(`[data-learn="${k}"]`);
  const deployed = checkpoints.find((c) => c.deployed);
  el("deployed").textContent = deployed
    ? `v${deployed.version} (${deployed.algorithm}, step ${deployed.step})`
    : "none yet (robots run their built-in policy)";
  const run = runs[0];
  if (!run) return;
  const continuous = run.total_steps >= 1e6;  // online post-training runs until someone stops it
  const pctDone = continuous ? 100 : Math.min(100, (100 * run.step) / Math.max(1, run.total_steps));
  const steps = continuous ? `step ${run.step}, runs until stopped` : `step ${run.step} / ${run.total_steps}`;
  el("run").innerHTML = `Run ${run.id} · ${esc(run.algorithm)} on ${esc(run.tasks.join(", "))} ${badge(run.status)} ` +
    `<span class="muted">${steps}</span>`;
  el("bar").classList.toggle("continuous", continuous && run.status === "running");
  el("message").textContent = run.message;
  el("bar").style.width = `${pctDone.toFixed(1)}%`;
}

async function refresh() {
  try {
    const learning = document.getElementById("learning");
    const [robots, episodes, runs, checkpoints] = await Promise.all([
      getJSON(robotsTable.dataset.url),
      getJSON(`${episodesTable.dataset.url}?page_size=12`),
      getJSON(`${learning.dataset.runs}?page_size=1`),
      getJSON(`${learning.dataset.checkpoints}?deployed=1`),
    ]);
    renderLearning(runs.results ?? runs, checkpoints.results ?? checkpoints);
    const robotList = robots.results ?? robots;
    renderRobots(robotList);
    renderEpisodes(episodes.results ?? episodes);
    renderSummary(robotList);
    document.getElementById("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    document.getElementById("updated").textContent = `Update failed: ${err.message}; retrying…`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
