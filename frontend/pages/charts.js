// Shared Chart.js look for the console pages (Chart is the UMD global from static/vendor/chart.umd.js).
export const COLORS = ["#2f6fed", "#1f9d55", "#c98a00", "#d64545", "#7b4bd6", "#0f9bb0", "#e0669b", "#6b7585",
  "#8a5a00", "#3c8d2f"];
export const OUTCOME_COLORS = { success: "#1f9d55", failure: "#d64545", timeout: "#c98a00", aborted: "#9aa3b2" };

export function setup() {
  const Chart = window.Chart;
  Chart.defaults.font.family = getComputedStyle(document.documentElement).fontFamily;
  Chart.defaults.font.size = 12;
  Chart.defaults.color = "#6b7585";
  Chart.defaults.borderColor = "#eceef2";
  Chart.defaults.maintainAspectRatio = false;
  Chart.defaults.animation = false;
  Chart.defaults.plugins.legend.labels.boxWidth = 12;
  Chart.defaults.plugins.legend.labels.boxHeight = 12;
  Chart.defaults.plugins.tooltip.mode = "index";
  Chart.defaults.plugins.tooltip.intersect = false;
  Chart.defaults.scale.ticks.maxRotation = 0;
  Chart.defaults.scale.ticks.autoSkipPadding = 12;
  return Chart;
}

export const pct = (x, digits = 0) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(digits)}%`);

export const percentAxis = (title) => ({
  min: 0, max: 1, title: { display: !!title, text: title },
  ticks: { callback: (v) => `${Math.round(v * 100)}%` },
});

export function line(label, data, color, extra = {}) {
  return { label, data, borderColor: color, backgroundColor: color, borderWidth: 2, pointRadius: 2,
    pointHoverRadius: 4, cubicInterpolationMode: "monotone", spanGaps: true, ...extra };
}

export async function getJSON(url) {
  const resp = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  if (resp.status === 401 || resp.status === 403) { window.location.reload(); throw new Error("logged out"); }
  if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
  return resp.json();
}
