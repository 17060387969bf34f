// Episode page: the timeline under the replay shows the playback position; clicking it (or a segment's
// "play from here") seeks. Steps map to video time through the episode's control rate (one frame per step).
const replay = document.getElementById("replay");
const video = document.getElementById("video");
const timeline = document.getElementById("timeline");
const playhead = document.getElementById("playhead");
const readout = document.getElementById("step-readout");
const hz = Number(replay.dataset.hz) || 10;
const steps = Math.max(1, Number(replay.dataset.steps) || 1);

function show(step) {
  const s = Math.min(steps, Math.max(0, step));
  playhead.style.left = `${(100 * s) / steps}%`;
  readout.textContent = `step ${Math.min(steps, Math.floor(s))} / ${steps}`;
}

function seek(step) {
  if (!video) return;
  video.currentTime = Math.min(steps - 0.5, Math.max(0, step)) / hz + 1e-3;
  show(step);
}

if (video) {
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
