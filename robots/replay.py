"""Episode replays made in the background (docs/console.md, "Episode replays"): the MP4 of a verified episode's camera
frames, and (learner/pages.py) its value plot.

A request never waits for an encoder: when an episode is verified, ingest queues its MP4 (``queue_video``), and a
page that asks before it is ready gets ``202`` with the job's progress, which the episode page shows as a progress bar
and polls. The work runs in a Celery task (``robots.render_episode_video``) that records its progress in a
``MediaJob`` row, so every web node sees it; the finished file goes to storage (``videos/<episode>-<sha>.mp4``: this
host's DATA_DIR/videos, and the bucket with ``SOP_STORAGE=s3``). A job whose worker died is run again: Celery
redelivers it (acks late), and a request that finds it silent for STALE_S queues it anew.
"""

from __future__ import annotations

import fractions
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from django.db import IntegrityError, transaction
from django.utils import timezone

from sop_web import storage

from . import hotsql
from .episode_file import EpisodeFileError, EpisodeReader
from .models import Episode, MediaJob

log = logging.getLogger(__name__)

STALE_S = 120.0  # a queued or running job not heard from for this long is queued again
PROGRESS_EVERY_S = 0.5  # how often a running job writes its progress


def video_key(episode: Episode) -> str:
    return f"videos/{episode.pk}-{(episode.payload_sha256 or 'nosha')[:12]}.mp4"


def video_path(episode: Episode) -> Path:
    """Where this host keeps (or caches) the episode's MP4."""
    return storage.local_path(video_key(episode))


def payload_file(episode: Episode) -> Path:
    """A local file with a verified episode's bytes: the stored file, or (object storage) this host's cache copy,
    fetched on first use and checked against the verified size and sha256 (storage.StorageError if it cannot be)."""
    return storage.ensure_local(storage.episode_key(episode.payload_path), sha256=episode.payload_sha256,
                                size=episode.payload_size)


def control_hz(episode: Episode) -> float:
    return episode.control_hz if episode.control_hz and math.isfinite(episode.control_hz) else 10.0


# ---------------------------------------------------------------- jobs


def job_view(job: Optional[MediaJob]) -> dict:
    if job is None:
        return {"state": "none", "progress": 0.0, "error": ""}
    return {"state": job.state, "progress": round(job.progress, 3), "error": job.error}


def queue(episode: Episode, kind: str, key: str, task: str, args: list, send: bool = True) -> MediaJob:
    """The job making ``key`` for ``episode``; queued (the Celery ``task`` sent after the commit; ``send=False``: the
    caller is that task) if there is none yet, if the last one failed or went silent more than STALE_S ago, or if it
    is done but its result is not here (callers ask only when they found none: a cache evicted, another host)."""
    job = MediaJob.objects.filter(episode_id=episode.pk, kind=kind, key=key).first()
    if job is None:
        try:
            with transaction.atomic():
                job = MediaJob.objects.create(episode_id=episode.pk, kind=kind, key=key)
        except IntegrityError:  # another request queued it this instant
            return MediaJob.objects.get(episode_id=episode.pk, kind=kind, key=key)
    elif job.state != MediaJob.State.DONE and (timezone.now() - job.updated_at).total_seconds() < STALE_S:
        return job  # in progress, or failed a moment ago (the page says why; it is tried again later)
    else:
        MediaJob.objects.filter(pk=job.pk).update(state=MediaJob.State.QUEUED, progress=0.0, error="",
                                                  updated_at=timezone.now())
        job.refresh_from_db()
    if send:
        _send_on_commit(task, args)
    return job


def _send(task: str, args: list) -> None:
    from celery import current_app

    current_app.send_task(task, args=args)


def _send_on_commit(task: str, args: list) -> None:
    transaction.on_commit(lambda: _send(task, args), robust=True)


class Progress:
    """A job's progress, written at most every PROGRESS_EVERY_S (a frame loop calls it per frame)."""

    def __init__(self, job_id: int, clock: Callable[[], float] = time.monotonic):
        self.job_id, self.clock, self._at = job_id, clock, float("-inf")

    def __call__(self, fraction: float) -> None:
        now = self.clock()
        if now - self._at >= PROGRESS_EVERY_S:
            self._at = now
            MediaJob.objects.filter(pk=self.job_id).update(progress=min(max(fraction, 0.0), 0.999),
                                                           updated_at=timezone.now())

    def alive(self) -> None:
        """A step without a fraction (a download, an upload) ended: the job is not stale."""
        MediaJob.objects.filter(pk=self.job_id).update(updated_at=timezone.now())


def run(job_id: int, work: Callable[[MediaJob, Progress], None]) -> Optional[MediaJob]:
    """Run ``work`` for the job (claimed with a conditional update: a redelivered task does not run a finished job
    twice); done or failed afterwards, with the error for the page."""
    job = MediaJob.objects.select_related("episode", "episode__task").filter(pk=job_id).first()
    if job is None or job.state == MediaJob.State.DONE:
        return job
    MediaJob.objects.filter(pk=job.pk).update(state=MediaJob.State.RUNNING, progress=0.0, error="",
                                              updated_at=timezone.now())
    try:
        work(job, Progress(job.pk))
    except Exception as exc:  # whatever it is, the job ends (failed, with the reason for the page), never "running"
        if isinstance(exc, (EpisodeFileError, storage.StorageError, OSError, ValueError)):
            log.warning("%s of episode %s failed: %s", job.kind, job.episode_id, exc)
        else:
            log.exception("%s of episode %s failed", job.kind, job.episode_id)
        MediaJob.objects.filter(pk=job.pk).update(state=MediaJob.State.FAILED, error=str(exc)[:500] or type(exc).__name__,
                                                  updated_at=timezone.now())
    else:
        MediaJob.objects.filter(pk=job.pk).update(state=MediaJob.State.DONE, progress=1.0, updated_at=timezone.now())
    job.refresh_from_db()
    return job


# ---------------------------------------------------------------- the MP4


def queue_video(episode: Episode, send: bool = True) -> Optional[MediaJob]:
    """Queue the episode's MP4 (after the surrounding commit), unless it exists. None for an episode without frames."""
    if episode.status != Episode.Status.VERIFIED or not episode.payload_path:
        return None
    return queue(episode, MediaJob.Kind.VIDEO, video_key(episode), VIDEO_TASK, [str(episode.pk)], send=send)


VIDEO_TASK = "robots.render_episode_video"
VALUE_TASK = "learner.render_episode_value"  # learner/tasks.py: V(o_t) of the newest value function, if there is one


def queue_replays(episode: Episode, new: bool = False) -> None:
    """A verified episode: its MP4, and its value plot (the learner's task does nothing without a value function).

    ``new``: the episode was verified this instant, so no job of it can exist (jobs are made for verified episodes
    only): one INSERT instead of a look-up first (ingest's hot path). A conflict would mean one does; the task then
    finds it, as a redelivered task does."""
    if new and episode.status == Episode.Status.VERIFIED and episode.payload_path:
        hotsql.insert(MediaJob(episode_id=episode.pk, kind=MediaJob.Kind.VIDEO, key=video_key(episode)),
                      ignore_conflicts=True)
        # one message from the web process (a broker round trip is ~2-4 ms of an upload's time): the media worker
        # sends the value task when it takes this one (robots/tasks.py)
        _send_on_commit(VIDEO_TASK, [str(episode.pk), True])
        return
    queue_video(episode)
    _send_on_commit(VALUE_TASK, [str(episode.pk)])


def send_value_task(episode_id: str) -> None:
    """The value plot's task, sent now (the media worker's half of queue_replays)."""
    _send(VALUE_TASK, [episode_id])


def video_ready(episode: Episode) -> Optional[Path]:
    """The local MP4 if it exists here, or could be fetched from the bucket; else None."""
    path = video_path(episode)
    if path.exists():
        return path
    if storage.is_remote() and MediaJob.objects.filter(episode_id=episode.pk, kind=MediaJob.Kind.VIDEO,
                                                       key=video_key(episode), state=MediaJob.State.DONE).exists():
        try:
            return storage.ensure_local(video_key(episode))
        except storage.StorageError as exc:
            log.warning("the MP4 of episode %s is not in the bucket: %s", episode.pk, exc)
    return None


def render_video(episode_id: str) -> Optional[MediaJob]:
    """The Celery task's body: encode the MP4 of ``episode_id`` with progress, store it."""
    episode = Episode.objects.filter(pk=episode_id).first()
    if episode is None:
        return None
    job = queue_video(episode, send=False)  # the row (a redelivered or a direct call finds the existing one)
    if job is None:
        return None

    def work(job: MediaJob, progress: Progress) -> None:
        target = video_path(episode)
        if not target.exists():
            source = payload_file(episode)  # a download with object storage: the job says it is alive around it
            progress.alive()
            encode_episode_video(source, target, control_hz(episode), progress=progress)
        progress.alive()
        storage.upload(video_key(episode), target)

    return run(job.pk, work)


def _codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_episode_video(source: Path, target: Path, fps: float,
                         progress: Callable[[float], None] = lambda fraction: None) -> Path:
    """Encode the episode's camera frames as an MP4 at its control rate; an episode with more cameras shows them side
    by side, the primary first, each scaled to the primary's height. Written to a temp file beside ``target`` and
    renamed, so that concurrent requests never serve (or write into) a half-written file."""
    import av

    target.parent.mkdir(parents=True, exist_ok=True)
    rate = fractions.Fraction(fps).limit_denominator(1000)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".part.mp4", dir=target.parent)
    os.close(fd)
    try:
        with EpisodeReader(source) as reader:
            h, w = reader.meta["image_shape"][:2]
            w = sum(_width_at(shape, h) for shape in _shapes(reader))
            scale = max(1, min(8, math.ceil(256 / max(h, w))))  # small camera images are upscaled (nearest)
            out_h, out_w = h * scale + (h * scale) % 2, w * scale + (w * scale) % 2  # yuv420p needs even sizes
            codec = _codec()
            with av.open(tmp, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
                stream = container.add_stream(codec, rate=rate)
                stream.width, stream.height, stream.pix_fmt = out_w, out_h, "yuv420p"
                if codec == "libx264":
                    stream.options = {"crf": "20", "preset": "veryfast", "tune": "animation"}
                else:
                    stream.bit_rate = 2_000_000
                for i, image in enumerate(_frames(reader)):
                    if scale > 1:
                        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
                    if image.shape[0] != out_h or image.shape[1] != out_w:
                        image = np.pad(image, ((0, out_h - image.shape[0]), (0, out_w - image.shape[1]), (0, 0)),
                                       mode="edge")
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                    frame.pts = i
                    for packet in stream.encode(frame):
                        container.mux(packet)
                    progress((i + 1) / max(reader.steps, 1))
                for packet in stream.encode():
                    container.mux(packet)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _shapes(reader) -> list[tuple]:
    return [tuple(reader.meta["image_shape"]), *(tuple(s) for s in reader.meta["cameras"].values())]


def _width_at(shape: tuple, height: int) -> int:
    return max(1, round(shape[1] * height / shape[0]))


def _frames(reader, block: int = 64):
    """The episode's camera frames (side by side when it has more cameras), read ``block`` at a time: a long episode
    never sits in memory whole."""
    datasets = ["observation/image", *(f"observation/cameras/{name}" for name in reader.meta["cameras"])]
    h = reader.meta["image_shape"][0]
    for start in range(0, reader.steps, block):
        views = [reader.column(name, start, start + block) for name in datasets]
        if len(views) == 1:
            yield from views[0]
            continue
        scaled = []
        for frames in views:  # nearest-neighbour to the primary's height
            fh, fw = frames.shape[1:3]
            width = _width_at((fh, fw), h)
            scaled.append(frames[:, (np.arange(h) * fh) // h][:, :, (np.arange(width) * fw) // width])
        yield from np.concatenate(scaled, axis=2)

