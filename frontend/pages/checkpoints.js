// The checkpoints table (Training page, run page) follows new checkpoints and their evaluations without a reload:
// every 10 s while the tab is visible the page is fetched again and the table replaced when it changed (not while
// the pointer or the keyboard is on it, so a click never lands on a row that moved).
import { localise } from "./localtime.js";

const POLL_MS = 10000;

async function refresh() {
  const table = document.querySelector("table.checkpoints");
  if (!table || document.hidden || table.matches(":hover") || table.contains(document.activeElement)) return;
  try {
    const resp = await fetch(location.href, { headers: { Accept: "text/html" }, credentials: "same-origin" });
    if (!resp.ok || resp.redirected) return;
    const fresh = new DOMParser().parseFromString(await resp.text(), "text/html").querySelector("table.checkpoints");
    if (!fresh) return;
    localise(fresh);
    if (fresh.innerHTML !== table.innerHTML) table.innerHTML = fresh.innerHTML;
    table.dataset.refreshedAt = new Date().toISOString();
  } catch {
    // offline for a moment: the next poll tries again
  }
}

setInterval(refresh, POLL_MS);
