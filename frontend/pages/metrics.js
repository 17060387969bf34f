// Metrics page: four charts from one JSON endpoint (/metrics/data.json), refreshed every 30 s.
import { esc } from "../console/ui.js";
import { COLORS, OUTCOME_COLORS, getJSON, line, pct, percentAxis, setup } from "./charts.js";

const Chart = setup();
const totals = document.getElementById("totals");
const charts = {};

function label(iso, bucketS) {
  const d = new Date(iso);
  const two = (n) => String(n).padStart(2, "0");
  const hm = `${two(d.getHours())}:${two(d.getMinutes())}`;
  const day = `${two(d.getMonth() + 1)}-${two(d.getDate())}`;
  if (bucketS >= 86400) return `${d.getFullYear()}-${day}`;
  return d.getHours() === 0 && d.getMinutes() < bucketS / 60 ? [hm, day] : hm;  // the date under midnight's tick
}

function bucketText(s) {
  if (!s) return "";
  if (s < 3600) return `${s / 60}-minute`;
  if (s < 86400) return s === 3600 ? "hourly" : `${s / 3600}-hour`;
  return s === 86400 ? "daily" : `${s / 86400}-day`;
}

function draw(id, config) {
  if (charts[id]) {
    charts[id].data = config.data;
    charts[id].options = config.options;
    charts[id].update("none");
  } else {
    charts[id] = new Chart(document.getElementById(id), config);
  }
}

function render(data) {
  const set = (k, v) => { totals.querySelector(`[data-total="${k}"]`).textContent = v; };
  const t = data.totals || {};
  renderAttention(data.attention);
  set("episodes", t.episodes ?? 0);
  set("autonomous_success_rate", pct(t.autonomous_success_rate));
  set("assisted_success_rate", pct(t.assisted_success_rate));
  set("intervened_episode_share", pct(t.intervened_episode_share));
  set("episodes_per_hour", t.episodes_per_hour === null || t.episodes_per_hour === undefined ? "–" : t.episodes_per_hour.toFixed(1));
  set("interventions_per_episode", t.interventions_per_episode === null || t.interventions_per_episode === undefined ? "–" : t.interventions_per_episode.toFixed(2));
  document.getElementById("empty").hidden = data.buckets.length > 0;
  document.getElementById("bucket-note").textContent = data.buckets.length
    ? `${bucketText(data.bucket_s)} buckets · hover a point for the number of episodes behind it` : "";
  const labels = data.buckets.map((b) => label(b, data.bucket_s));

  // per task: autonomous success (solid) and success with an operator's help counted too (dashed, same colour)
  const successSets = data.tasks.flatMap((name, i) => [
    line(name, data.autonomous[name].map((c) => c.rate), COLORS[i % COLORS.length], { task: name }),
    line(`${name} (with assistance)`, data.success[name].map((c) => c.rate), COLORS[i % COLORS.length],
      { task: name, borderDash: [5, 4], borderWidth: 1 }),
  ]);
  draw("chart-success", {
    type: "line",
    data: { labels, datasets: successSets },
    options: { scales: { y: percentAxis() }, plugins: { tooltip: { callbacks: {
      label: (ctx) => `${ctx.dataset.label}: ${pct(ctx.parsed.y)} (${data.success[ctx.dataset.task][ctx.dataIndex].n} episodes)` } } } },
  });

  const versions = data.versions.versions;
  draw("chart-versions", {
    type: "line",
    data: { labels: versions.map((v) => `v${v}`),
      datasets: data.tasks.map((name, i) => line(name, data.versions.autonomous[name].map((c) => c.rate), COLORS[i % COLORS.length])) },
    options: { scales: { y: percentAxis(), x: { title: { display: true, text: "policy version" } } },
      plugins: { tooltip: { callbacks: {
        label: (ctx) => `${ctx.dataset.label}: ${pct(ctx.parsed.y)} autonomous (${data.versions.autonomous[ctx.dataset.label][ctx.dataIndex].n} episodes)` } } } },
  });

  draw("chart-throughput", {
    type: "bar",
    data: { labels, datasets: Object.entries(data.throughput).map(([outcome, values]) => ({
      label: outcome, data: values, backgroundColor: OUTCOME_COLORS[outcome] || "#999", stack: "o", borderRadius: 2 })) },
    options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, title: { display: true, text: "episodes / hour" } } } },
  });

  draw("chart-interventions", {
    type: "line",
    data: { labels, datasets: [
      line("interventions per episode", data.interventions.per_episode, "#7b4bd6", { yAxisID: "y" }),
      line("share of steps driven by an operator", data.interventions.step_share, "#0f9bb0", { yAxisID: "share", borderDash: [5, 4] }),
    ] },
    options: { scales: {
      y: { beginAtZero: true, title: { display: true, text: "interventions / episode" } },
      share: { ...percentAxis("intervened steps"), position: "right", grid: { drawOnChartArea: false } },
    }, plugins: { tooltip: { callbacks: { label: (ctx) => ctx.dataset.yAxisID === "share"
      ? `${ctx.dataset.label}: ${pct(ctx.parsed.y, 1)}` : `${ctx.dataset.label}: ${ctx.parsed.y?.toFixed(2)}` } } } },
  });
}

const attention = document.getElementById("attention");

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${(s / 3600).toFixed(1)} h`;
}

function renderAttention(a) {
  if (!a) return;
  const set = (k, v) => { attention.querySelector(`[data-attn="${k}"]`).textContent = v; };
  set("precision", pct(a.precision));
  set("precision-n", `(${a.answered} of ${a.answered + a.dismissed + a.withdrawn})`);
  set("recall", pct(a.recall));
  set("recall-n", `(${a.takeovers_with_request} of ${a.takeovers})`);
  set("median_response_s", duration(a.median_response_s));
  set("robots_per_operator", a.robots_per_operator === null ? "–" : `≈ ${a.robots_per_operator}`);
  set("coverage-note", a.intervened_step_share === null ? "" :
    `Operators drive ${pct(a.intervened_step_share, 1)} of robot time, with ${a.interventions_per_robot_hour === null ? "–" : a.interventions_per_robot_hour.toFixed(1)} takeovers per robot-hour` +
    (a.median_response_s !== null ? ` and ${duration(a.median_response_s)} to answer each request.` : "; no answered request yet to time the response."));
  const body = attention.querySelector("tbody");
  body.innerHTML = a.operators.length ? a.operators.map((o) => `<tr><td>${esc(o.name)}</td><td>${o.takeovers}</td>
    <td>${duration(o.driving_s)}</td><td>${o.answered}</td><td>${o.false_alarms}</td></tr>`).join("")
    : `<tr><td colspan="5" class="muted">No takeovers in this range.</td></tr>`;
}

async function refresh() {
  try {
    render(await getJSON(`${totals.dataset.url}?range=${encodeURIComponent(totals.dataset.range)}`));
  } catch (err) {
    document.getElementById("bucket-note").textContent = `Could not load the metrics: ${err.message}`;
  }
}

refresh();
setInterval(refresh, 30000);
