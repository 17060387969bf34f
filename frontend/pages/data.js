// Data page: the exports table follows its background jobs (GET /api/exports/ every 2 s while one is queued or
// running): a progress bar, then the download link.
import { esc } from "../console/ui.js";

const table = document.getElementById("exports");
const POLL_MS = 2000;

function size(bytes) {
  if (!bytes) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i += 1; }
  return `${bytes.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function stateCell(e) {
  if (e.state === "running" || e.state === "queued") {
    const pct = Math.round(100 * (e.progress || 0));
    return `<span class="badge ${e.state}">${e.state}</span>
      <div class="progress" role="progressbar" aria-label="export ${e.id}" aria-valuemin="0" aria-valuemax="100" aria-valuenow="${pct}"><div class="bar" style="width:${pct}%"></div></div>`;
  }
  if (e.state === "failed") return `<span class="badge failed">failed</span> <span class="small error">${esc(e.error)}</span>`;
  if (e.state === "expired") return `<span class="badge stopped">expired</span> <span class="small muted">deleted after its retention; export again</span>`;
  return `<span class="badge done">done</span> <span class="small muted">${e.frames} frames</span>`;
}

async function refresh() {
  let list;
  try {
    const reply = await fetch(table.dataset.url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    list = await reply.json();
  } catch (err) {
    setTimeout(refresh, 5 * POLL_MS);
    return;
  }
  for (const e of list) {
    const row = table.querySelector(`tr[data-export="${e.id}"]`);
    if (!row) continue;
    row.cells[3].textContent = e.episodes;
    row.cells[4].innerHTML = stateCell(e);
    row.cells[5].innerHTML = e.download_url ? `<a href="${esc(e.download_url)}" data-testid="download">.tar</a> <span class="small muted">${size(e.size)}</span>` : "–";
  }
  if (list.some((e) => e.state === "queued" || e.state === "running")) setTimeout(refresh, POLL_MS);
}

refresh();
