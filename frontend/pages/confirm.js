// Forms with data-confirm ask before they submit (stop a run, roll the fleet back). Also: the "steps" input of the
// start-run form is only enabled when "Fixed number of steps" is chosen.
// (Delegated: the checkpoints table is replaced while the page is open, frontend/pages/checkpoints.js.)
document.addEventListener("submit", (ev) => {
  const form = ev.target.closest ? ev.target.closest("form[data-confirm]") : null;
  if (form && !window.confirm(form.dataset.confirm)) ev.preventDefault();
});

const start = document.getElementById("start-run");
if (start) {
  const steps = start.querySelector('input[name="steps"]');
  const sync = () => {
    const fixed = start.querySelector('input[name="mode"]:checked')?.value === "steps";
    steps.disabled = !fixed;
    if (fixed && !steps.value) steps.focus();
  };
  start.querySelectorAll('input[name="mode"]').forEach((r) => r.addEventListener("change", sync));
  sync();
}
