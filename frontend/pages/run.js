// Training run page: progress bar and loss curves, polled every 2 s from /training/runs/<id>/metrics.json while the
// run is active (once when it is over). RECAP runs add the value loss and the per-task positive-advantage share.
import { COLORS, getJSON, line, pct, percentAxis, setup } from "./charts.js";

const Chart = setup();
const box = document.getElementById("run");
const POLL_MS = 2000;
const ACTIVE = new Set(["queued", "running", "stopping", "waiting"]);
let lossChart = null;
let taskChart = null;
let valueChart = null;
let positiveChart = null;
let lastStatus = null;

// Vertical dotted lines at the steps where the run published a checkpoint.
const checkpointLines = {
  id: "checkpointLines",
  afterDatasetsDraw(chart, _args, opts) {
    const steps = opts.steps || [];
    const { ctx, chartArea, scales } = chart;
    ctx.save();
    ctx.strokeStyle = "rgba(31,157,85,0.55)";
    ctx.setLineDash([2, 3]);
    for (const s of steps) {
      const x = scales.x.getPixelForValue(s);
      if (x < chartArea.left || x > chartArea.right) continue;
      ctx.beginPath(); ctx.moveTo(x, chartArea.top); ctx.lineTo(x, chartArea.bottom); ctx.stroke();
    }
    ctx.restore();
  },
};

const xy = (steps, values) => steps.map((s, i) => ({ x: s, y: values[i] ?? null }));

function render(d) {
  const status = document.getElementById("run-status");
  status.textContent = d.status;
  status.className = `badge big ${d.status}`;
  document.getElementById("run-message").textContent = d.message;
  document.getElementById("run-steps").textContent = d.continuous
    ? `step ${d.step} · runs until stopped` : `step ${d.step} / ${d.total_steps}`;
  const bar = document.getElementById("run-bar");
  bar.style.width = d.continuous ? "100%" : `${Math.min(100, (100 * d.step) / Math.max(1, d.total_steps))}%`;
  bar.classList.toggle("continuous", d.continuous && d.status === "running");
  document.getElementById("run-beat").textContent = d.heartbeat_at && ACTIVE.has(d.status)
    ? `worker heartbeat ${Math.max(0, Math.round((Date.now() - Date.parse(d.heartbeat_at)) / 1000))} s ago` : "";
  document.getElementById("no-metrics").hidden = d.steps.length > 0;

  const ckSteps = d.checkpoints.map((c) => c.step);
  const xScale = { type: "linear", title: { display: true, text: "learner step" }, ticks: { maxTicksLimit: 8 } };
  const lossData = { datasets: [
    line("loss", xy(d.steps, d.loss), "#2f6fed", { pointRadius: 0, tension: 0.15 }),
    line("online share of batch", xy(d.steps, d.online_fraction), "#c98a00", { pointRadius: 0, yAxisID: "share", borderWidth: 1.5 }),
  ] };
  const lossOptions = { parsing: true, scales: { x: xScale, y: { title: { display: true, text: "loss" } },
    share: { min: 0, max: 1, position: "right", grid: { drawOnChartArea: false }, ticks: { callback: (v) => `${Math.round(v * 100)}%` } } },
  plugins: { checkpointLines: { steps: ckSteps } } };
  if (!lossChart) {
    lossChart = new Chart(document.getElementById("chart-loss"), { type: "line", data: lossData, options: lossOptions, plugins: [checkpointLines] });
  } else { lossChart.data = lossData; lossChart.options = lossOptions; lossChart.update("none"); }

  const names = Object.keys(d.tasks).sort();
  const taskData = { datasets: names.flatMap((name, i) => [
    line(`${name} online`, xy(d.steps, d.tasks[name].loss_online), COLORS[i % COLORS.length], { pointRadius: 0 }),
    line(`${name} offline`, xy(d.steps, d.tasks[name].loss_offline), COLORS[i % COLORS.length], { pointRadius: 0, borderDash: [5, 4], borderWidth: 1.5 }),
  ]) };
  const taskOptions = { scales: { x: xScale, y: { title: { display: true, text: "loss" } } },
    plugins: { legend: { labels: { filter: (item) => item.text.endsWith("online") } } } };
  if (!taskChart) {
    taskChart = new Chart(document.getElementById("chart-tasks"), { type: "line", data: taskData, options: taskOptions });
  } else { taskChart.data = taskData; taskChart.options = taskOptions; taskChart.update("none"); }

  if (d.algorithm === "recap") renderRecap(d, xScale, ckSteps);

  // A run that just ended has new checkpoints and buttons: reload once to show them.
  if (lastStatus && ACTIVE.has(lastStatus) && !ACTIVE.has(d.status)) window.location.reload();
  lastStatus = d.status;
}

// Dotted horizontal line at the target share of positive advantages (config positive_share).
const targetLine = {
  id: "targetLine",
  afterDatasetsDraw(chart, _args, opts) {
    if (opts.value === undefined || opts.value === null) return;
    const { ctx, chartArea, scales } = chart;
    const y = scales.y.getPixelForValue(opts.value);
    ctx.save();
    ctx.strokeStyle = "rgba(29,36,48,0.45)";
    ctx.setLineDash([2, 3]);
    ctx.beginPath(); ctx.moveTo(chartArea.left, y); ctx.lineTo(chartArea.right, y); ctx.stroke();
    ctx.restore();
  },
};

// RECAP runs: the value function's loss and each task's share of positive advantages over learner steps.
function renderRecap(d, xScale, ckSteps) {
  const valueLoss = d.value_loss || [];
  document.getElementById("no-value-loss").hidden = d.steps.length === 0 || valueLoss.some((v) => v !== null);
  const valueData = { datasets: [
    line("value loss", xy(d.steps, valueLoss), "#7b4bd6", { pointRadius: 0, tension: 0.15, spanGaps: false }),
  ] };
  const valueOptions = { scales: { x: xScale, y: { title: { display: true, text: "cross-entropy" } } },
    plugins: { checkpointLines: { steps: ckSteps }, legend: { display: false } } };
  if (!valueChart) {
    valueChart = new Chart(document.getElementById("chart-value-loss"), { type: "line", data: valueData, options: valueOptions, plugins: [checkpointLines] });
  } else { valueChart.data = valueData; valueChart.options = valueOptions; valueChart.update("none"); }

  const shares = d.positive_share || {};
  const names = Object.keys(shares).sort();
  const taskOrder = Object.keys(d.tasks).sort();  // same colour per task as the per-task loss chart
  const target = Number(document.getElementById("recap-charts").dataset.target);
  const posData = { datasets: names.map((name) => {
    const i = Math.max(0, taskOrder.indexOf(name));
    return line(name, xy(d.steps, shares[name]), COLORS[i % COLORS.length], { pointRadius: 0, spanGaps: false });
  }) };
  const posOptions = { scales: { x: xScale, y: percentAxis("positive share") },
    plugins: { targetLine: { value: Number.isFinite(target) ? target : null },
      tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${pct(c.parsed.y, 1)}` } } } };
  if (!positiveChart) {
    positiveChart = new Chart(document.getElementById("chart-positive"), { type: "line", data: posData, options: posOptions, plugins: [targetLine] });
  } else { positiveChart.data = posData; positiveChart.options = posOptions; positiveChart.update("none"); }
}

async function poll() {
  try {
    const d = await getJSON(box.dataset.url);
    render(d);
    if (ACTIVE.has(d.status)) setTimeout(poll, POLL_MS);
  } catch (err) {
    document.getElementById("run-message").textContent = `Could not load the run: ${err.message}`;
    setTimeout(poll, POLL_MS * 3);
  }
}

poll();
