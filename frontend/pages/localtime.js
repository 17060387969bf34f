// Every <time datetime data-format> the server rendered in UTC (the `when` template filter) is shown in the browser's
// time zone, like the live console's clocks, with the zone's name; the UTC value stays in the tooltip.
const pad = (n) => String(n).padStart(2, "0");
const zone = new Intl.DateTimeFormat(undefined, { timeZoneName: "short" }).formatToParts(new Date())
  .find((p) => p.type === "timeZoneName")?.value || "";

export function localText(date, format) {
  const parts = { Y: date.getFullYear(), m: pad(date.getMonth() + 1), d: pad(date.getDate()), H: pad(date.getHours()),
                  i: pad(date.getMinutes()), s: pad(date.getSeconds()) };
  return format.replace(/[YmdHis]/g, (c) => parts[c]);
}

export function localise(root = document) {
  root.querySelectorAll("time[datetime][data-format]").forEach((el) => {
    const date = new Date(el.getAttribute("datetime"));
    if (Number.isNaN(date.getTime())) return;
    if (!el.title) el.title = el.textContent.trim();
    el.textContent = `${localText(date, el.dataset.format)}${zone ? " " + zone : ""}`;
  });
}

if (typeof document !== "undefined") localise();
