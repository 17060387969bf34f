// Episode page: the timeline under the replay shows the playback position; clicking it (or a segment's
// "play from here") seeks. Steps map to video time through the episode's control rate (one frame per step).
// Below it, V(o_t) of the newest value function (/episodes/<id>/value.json) with the intervention segments shaded
// and the playhead mirrored; clicking the plot seeks too.
import { getJSON, line, setup } from "./charts.js";

const replay = document.getElementById("replay");
const video = document.getElementById("video");
const timeline = document.getElementById("timeline");
const playhead = document.getElementById("playhead");
const readout = document.getElementById("step-readout");
const hz = Number(replay.dataset.hz) || 10;
const steps = Math.max(1, Number(replay.dataset.steps) || 1);

let valueChart = null;
let playheadStep = 0;  // read by the value plot's overlay (Chart.js resolves plugin options only on update)

function show(step) {
  const s = Math.min(steps, Math.max(0, step));
  playhead.style.left = `${(100 * s) / steps}%`;
  readout.textContent = `step ${Math.min(steps, Math.floor(s))} / ${steps}`;
  playheadStep = s;
  if (valueChart) valueChart.draw();
}

function seek(step) {
  if (!video) return;
  video.currentTime = Math.min(steps - 0.5, Math.max(0, step)) / hz + 1e-3;
  show(step);
}

// The MP4 is made in the background once the episode is verified (robots/replay.py): until it exists the server
// answers 202 with the job's progress, shown here as a bar; the video loads when it is ready.
const POLL_MS = 1000;

function setBar(bar, box, fraction) {
  const pct = Math.round(100 * Math.min(1, Math.max(0, fraction || 0)));
  bar.style.width = `${pct}%`;
  box.setAttribute("aria-valuenow", String(pct));
  return pct;
}

async function loadReplay() {
  const box = document.getElementById("replay-progress");
  const bar = document.getElementById("replay-bar");
  const text = box.querySelector('[data-field="replay-text"]');
  let reply;
  try {
    reply = await fetch(video.dataset.src, { headers: { Range: "bytes=0-0", Accept: "application/json" }, credentials: "same-origin" });
  } catch (err) {
    box.hidden = false;
    text.textContent = `The replay could not be loaded (${err.message}); retrying…`;
    setTimeout(loadReplay, 5 * POLL_MS);
    return;
  }
  if (reply.status === 200 || reply.status === 206) {
    box.hidden = true;
    video.src = video.dataset.src;
    return;
  }
  const job = await reply.json().catch(() => ({}));
  box.hidden = false;
  if (reply.status === 202) {
    const pct = setBar(bar, box.querySelector(".progress"), job.progress);
    text.textContent = job.state === "running" ? `Making the replay… ${pct}%` : "The replay is queued…";
    setTimeout(loadReplay, POLL_MS);
  } else {
    text.textContent = job.detail || `The replay could not be loaded (HTTP ${reply.status}).`;
    box.classList.add("error");
  }
}

if (video) {
  loadReplay();
  const tick = () => { show(video.currentTime * hz); if (!video.paused) requestAnimationFrame(tick); };
  video.addEventListener("timeupdate", () => show(video.currentTime * hz));
  video.addEventListener("play", () => requestAnimationFrame(tick));
  video.addEventListener("seeked", () => show(video.currentTime * hz));
  video.addEventListener("error", () => {
    replay.insertAdjacentHTML("afterbegin", '<p class="error small">The replay could not be loaded.</p>');
  });
  timeline.addEventListener("click", (ev) => {
    const box = timeline.getBoundingClientRect();
    seek(((ev.clientX - box.left) / box.width) * steps);
  });
  document.querySelectorAll("[data-seek]").forEach((b) => b.addEventListener("click", () => {
    seek(Number(b.dataset.seek));
    video.play();
  }));
} else {
  timeline.classList.add("static");
}
show(0);

// -- value plot ----------------------------------------------------------------------------------------------------

const SHADE = { operator: "rgba(123,75,214,0.18)", sim_operator: "rgba(224,160,48,0.22)" };

// Intervention segments as shaded bands behind the lines, and the playhead as a vertical line on top.
const episodeOverlay = {
  id: "episodeOverlay",
  beforeDatasetsDraw(chart, _args, opts) {
    const { ctx, chartArea, scales } = chart;
    ctx.save();
    for (const seg of opts.segments || []) {
      const x0 = Math.max(chartArea.left, scales.x.getPixelForValue(seg.start - 0.5));
      const x1 = Math.min(chartArea.right, scales.x.getPixelForValue(seg.end - 0.5));
      if (x1 <= x0) continue;
      ctx.fillStyle = SHADE[seg.source] || SHADE.operator;
      ctx.fillRect(x0, chartArea.top, Math.max(2, x1 - x0), chartArea.bottom - chartArea.top);
    }
    ctx.restore();
  },
  afterDatasetsDraw(chart) {
    if (!video) return;
    const { ctx, chartArea, scales } = chart;
    const x = scales.x.getPixelForValue(Math.min(steps - 1, playheadStep));
    if (x < chartArea.left || x > chartArea.right) return;
    ctx.save();
    ctx.strokeStyle = "#141a24";
    ctx.lineWidth = 1.5;
    ctx.beginPath(); ctx.moveTo(x, chartArea.top); ctx.lineTo(x, chartArea.bottom); ctx.stroke();
    ctx.restore();
  },
};

async function loadValue() {
  const plot = document.getElementById("value-plot");
  const note = document.getElementById("value-note");
  if (!plot) return;
  let d;
  try {
    d = await getJSON(plot.dataset.url);
  } catch (err) {
    note.textContent = `The value could not be loaded: ${err.message}`;
    return;
  }
  const progress = document.getElementById("value-progress");
  if (!d.available && d.reason === "rendering") {  // computed in the background: show how far, ask again
    progress.hidden = false;
    const pct = setBar(document.getElementById("value-bar"), progress, d.progress);
    note.textContent = d.state === "running" ? `Computing V(o_t)… ${pct}%` : "V(o_t) is queued for computation…";
    setTimeout(loadValue, POLL_MS);
    return;
  }
  progress.hidden = true;
  if (!d.available) { note.textContent = d.message; return; }
  note.hidden = true;
  document.getElementById("value-box").hidden = false;
  document.getElementById("value-source").textContent = `${d.source.label}${d.returns.some((r) => r !== null) ? "" : " · no return: the episode has no terminal outcome"}`;
  const Chart = setup();
  const segments = JSON.parse(document.getElementById("episode-segments").textContent || "[]");
  const pts = (ys) => ys.map((y, t) => ({ x: t, y }));
  const datasets = [line("V(o_t)", pts(d.values), "#2f6fed", { pointRadius: 0, cubicInterpolationMode: "default", tension: 0 })];
  if (d.returns.some((r) => r !== null)) {
    datasets.push(line(`return-to-go (${d.outcome})`, pts(d.returns), "#6b7585", { pointRadius: 0, borderDash: [5, 4], borderWidth: 1.5 }));
  }
  valueChart = new Chart(document.getElementById("chart-value"), {
    type: "line",
    data: { datasets },
    options: {
      parsing: true,
      scales: {
        x: { type: "linear", min: 0, max: Math.max(1, d.steps - 1), title: { display: true, text: "step" }, ticks: { maxTicksLimit: 10 } },
        y: { min: -1, max: 0, title: { display: true, text: "normalised return" }, ticks: { stepSize: 0.2, callback: (v) => v.toFixed(1) } },
      },
      plugins: {
        episodeOverlay: { segments },
        tooltip: { callbacks: { title: (items) => `step ${items[0].parsed.x}`,
          label: (c) => `${c.dataset.label}: ${c.parsed.y === null ? "–" : c.parsed.y.toFixed(3)}` } },
      },
      onClick: (ev, _els, chart) => {
        if (!video) return;
        const x = chart.scales.x.getValueForPixel(ev.x);
        if (Number.isFinite(x)) seek(x);
      },
    },
    plugins: [episodeOverlay],
  });
}

loadValue();
