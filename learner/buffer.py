"""The learner's frame index: per-frame metadata in memory, payloads read lazily from episode files when sampled.

Indexing an episode (through ``EpisodeReader``, which validates the file) reads its attributes, its control_source
column and its byte layout (where each frame's image chunk and the state/action columns lie). Images, states and
actions stay in the files until the sampler picks a frame; then the frame is read with a few ``pread`` calls on a
plain file descriptor (an LRU keeps descriptors open) and its image chunk is LZF-decoded straight into the batch,
with no HDF5 open: reading a frame costs the same whatever the number of episodes in the store (an HDF5 open per
frame, which a store larger than the LRU of open HDF5 files made the common case, cost ~0.3 ms). A file without such
a layout is read through HDF5 as before. Memory grows by ~26 bytes per indexed frame (index + layout) plus the LRUs'
bounds, never with payload size. Pure core: numpy, torch, h5py.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import os
import resource
import threading
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np
import torch

from robots.episode_file import IMAGE, EpisodeReader, FrameLayout
from robots.protocol import CONTROL_SOURCE_CODES, ControlSource, Split

POLICY_CODE = CONTROL_SOURCE_CODES[ControlSource.POLICY]
TRAINABLE_SPLITS = (Split.OFFLINE.value, Split.ONLINE.value)  # eval episodes are never trained on


@dataclasses.dataclass(frozen=True)
class EpisodeEntry:
    index: int  # position in FrameIndex.episodes
    path: Path
    episode_id: str
    task: str
    task_id: int
    prompt: str
    split: str  # "offline" or "online"
    steps: int
    offset: int  # global frame id of the episode's first frame; its frames are [offset, offset + steps)
    image_shape: tuple[int, int, int]
    outcome: str = ""  # protocol.Outcome value: success, failure, timeout, aborted (RECAP's rewards use it)
    env_id: str = ""  # the environment it ran in: decides the policy's task inputs (learner.policy.task_input_mask)
    # the index's cameras (FrameIndex.cameras), in order: (the dataset holding them, their frame shape) in this file
    cameras: tuple[tuple[str, tuple[int, int, int]], ...] = ()


def _file_access() -> h5py.h5p.PropFAID:
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)  # default close degree, as h5py.File: HDF5 wants them equal
    # No chunk cache: with random frames it never hits, and it grew by ~1 MiB per open file.
    fapl.set_cache(0, 0, 0, 1.0)
    return fapl


_FILE_ACCESS = _file_access()


class _OpenEpisode:
    """An episode in the LRU: the open file, its small state/action columns, and a fast one-frame image read.

    The file was fully validated by ``EpisodeReader`` when it was indexed, and a verified episode file is immutable,
    so a reopen only checks the shapes it relies on. With more episodes than the LRU holds most sampled frames reopen
    a file, so this path is lean: h5py's low-level API costs ~0.26 ms of CPU per reopen here, its high-level API
    ~0.6 ms and a validating ``EpisodeReader`` ~2.5 ms.
    """

    def __init__(self, entry: EpisodeEntry):
        self._fid = h5py.h5f.open(os.fsencode(entry.path), h5py.h5f.ACC_RDONLY, fapl=_FILE_ACCESS)
        try:
            self.states = self._read_all(b"observation/state")
            self.actions = self._read_all(b"action")
            self._image_id = h5py.h5d.open(self._fid, b"observation/image")
            self.frame_shape = tuple(self._image_id.shape[1:])
            if (self._image_id.shape[0], len(self.states), len(self.actions)) != (entry.steps,) * 3:
                raise ValueError(f"{entry.path} changed since it was indexed")
            self._file_space = self._image_id.get_space()
            self._mem_space = h5py.h5s.create_simple((1, *self.frame_shape))
            self._cameras = {}  # dataset -> (id, file space, memory space), opened on first use
        except Exception:
            self.close()
            raise

    def _read_all(self, name: bytes) -> np.ndarray:
        dataset = h5py.h5d.open(self._fid, name)
        out = np.empty(dataset.shape, np.float32)
        dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
        return out

    def read_image(self, i: int, out: np.ndarray) -> None:
        """Frame ``i`` into ``out``, a C-contiguous uint8 [1, H, W, 3] view (e.g. one row of the batch array): one
        chunk, ~60 us here, against ~190 us through h5py's high-level slicing."""
        self._file_space.select_hyperslab((i, 0, 0, 0), (1, *self.frame_shape))
        self._image_id.read(self._mem_space, self._file_space, out)

    def read_camera(self, dataset: str, i: int, out: np.ndarray) -> None:
        """Frame ``i`` of a camera's dataset (observation/image or observation/cameras/<name>) into ``out``."""
        if dataset == IMAGE:
            return self.read_image(i, out)
        if dataset not in self._cameras:
            ds = h5py.h5d.open(self._fid, dataset.encode())
            self._cameras[dataset] = (ds, ds.get_space(), h5py.h5s.create_simple((1, *ds.shape[1:])))
        ds, file_space, mem_space = self._cameras[dataset]
        file_space.select_hyperslab((i, 0, 0, 0), (1, *ds.shape[1:]))
        ds.read(mem_space, file_space, out)

    def read_rows(self, t: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """State row ``t`` and action rows ``t:end``."""
        return self.states[t], self.actions[t:end]

    def close(self) -> None:
        # Dropping the last references closes the dataset, then the file (CPython frees them right here). Not
        # FileID.close(): it walks every object h5py has open, which made it cost ~1.4 ms with 512 files open.
        self._image_id = self._file_space = self._mem_space = self._fid = self._cameras = None


@functools.cache
def _lzf_decompress():
    """h5py's own LZF decoder (the one its HDF5 filter uses), called directly on a chunk's bytes."""
    import h5py.h5z

    fn = ctypes.CDLL(h5py.h5z.__file__).lzf_decompress
    fn.restype = ctypes.c_uint
    fn.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
    return fn


class _DirectEpisode:
    """An episode read without HDF5: a file descriptor and the byte layout recorded when it was indexed
    (EpisodeReader.frame_layout, from a file that was fully validated then; verified files are immutable, and one
    whose size changed is refused). A frame is one pread for its image chunk (LZF-decoded into the caller's array),
    one for its state row and one for its action rows."""

    def __init__(self, entry: EpisodeEntry, layout: FrameLayout):
        self._fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            if os.fstat(self._fd).st_size != layout.file_size:
                raise ValueError(f"{entry.path} changed since it was indexed")
        except Exception:
            self.close()
            raise
        self.layout = layout
        self.frame_shape = layout.frame_shape
        self._state_row = 4 * layout.state_dim
        self._action_row = 4 * layout.action_dim

    def read_image(self, i: int, out: np.ndarray, chunks=None) -> None:
        """Frame ``i`` of the primary camera (or of the camera whose ``ImageChunks`` are given) into ``out``."""
        layout = chunks or self.layout
        frame_bytes = int(np.prod(layout.frame_shape))
        size = int(layout.sizes[i])
        data = os.pread(self._fd, size, int(layout.offsets[i]))
        if len(data) != size:
            raise ValueError("episode file truncated")
        if layout.raw[i]:
            if size != frame_bytes:
                raise ValueError("raw image chunk of the wrong size")
            out[...] = np.frombuffer(data, np.uint8).reshape(out.shape)
            return
        assert out.flags.c_contiguous and out.nbytes == frame_bytes and out.dtype == np.uint8
        if _lzf_decompress()(data, size, out.ctypes.data, frame_bytes) != frame_bytes:
            raise ValueError("image chunk does not decode to one frame")

    def read_camera(self, dataset: str, i: int, out: np.ndarray) -> None:
        if dataset == IMAGE:
            return self.read_image(i, out)
        return self.read_image(i, out, self.layout.cameras[dataset.rsplit("/", 1)[1]])

    def read_rows(self, t: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        state = os.pread(self._fd, self._state_row, self.layout.state_offset + t * self._state_row)
        n = (end - t) * self._action_row
        actions = os.pread(self._fd, n, self.layout.action_offset + t * self._action_row)
        if len(state) != self._state_row or len(actions) != n:
            raise ValueError("episode file truncated")
        return (np.frombuffer(state, np.float32),
                np.frombuffer(actions, np.float32).reshape(end - t, self.layout.action_dim))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _descriptor_budget() -> int:
    """How many episode files the direct reader keeps open: a quarter of the process's descriptor limit, at most
    4096 (each costs the kernel a file structure, no user memory)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(4096, (soft if soft != resource.RLIM_INFINITY else 65536) // 4))


class FrameIndex:
    """Frame-level metadata of every indexed episode, as numpy arrays indexed by global frame id.

    ``horizon`` is the action-chunk length that ``load_batch`` assembles. Frames come at the first indexed episode's
    camera size (the policy resizes to its input); frames of other sizes are resized to it so that a batch stacks.
    Append-only: a frame id, once given, keeps meaning the same frame, so a batch planned before an ``add_episode``
    is still valid after it.

    ``cameras`` (a policy's ``PolicyConfig.cameras``): the named cameras ``load_batch`` delivers as ``cameras``
    {name: frames}, each at its size in the first indexed episode, the first of them also as ``image``; an episode
    that did not record one of them is refused by ``add_episode``. Empty: the primary camera only, whatever its name.
    """

    def __init__(self, horizon: int, max_open_episodes: int = 512, cameras: tuple[str, ...] = ()):
        self.horizon = int(horizon)
        self.cameras = tuple(cameras)
        self.camera_shapes: dict[str, tuple[int, int, int]] = {}  # of the first episode; load_batch delivers these
        self.max_open_episodes = int(max_open_episodes)
        self.episodes: list[EpisodeEntry] = []
        self.tasks: list[str] = []
        self.version = 0  # bumped by every add; caches keyed on it (sampler groups, trainable masks)
        self.image_shape: Optional[tuple[int, int, int]] = None  # of the first episode; load_batch delivers this
        self.opens = 0  # episode files opened to read payloads (not counting indexing)
        self.frames_read = 0
        self._task_ids: dict[str, int] = {}
        self._by_episode_id: dict[str, EpisodeEntry] = {}
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._num_frames = 0
        self._arrays = _empty_arrays()
        self._lru: collections.OrderedDict[int, _OpenEpisode] = collections.OrderedDict()
        self._layouts: list[Optional[FrameLayout]] = []  # per episode; None: read through HDF5 (_OpenEpisode)
        self._direct: collections.OrderedDict[int, _DirectEpisode] = collections.OrderedDict()
        self.max_open_descriptors = _descriptor_budget()
        self._lock = threading.Lock()  # the LRU (a prefetch thread loads while the trainer thread indexes)
        self._arrays_lock = threading.Lock()  # pending chunks -> consolidated arrays

    # -- indexing ----------------------------------------------------------------------------------------------

    def add_episode(self, path: str | os.PathLike, outcome: Optional[str] = None) -> Optional[EpisodeEntry]:
        """Index one verified episode file. Returns None for eval episodes (never trained on); adding the same
        episode id twice returns the existing entry. Reads only attributes and the control_source column.
        ``outcome`` overrides the file's (an operator may relabel a stored episode in the database; files are never
        rewritten)."""
        path = Path(path)
        with EpisodeReader(path) as reader:
            meta = reader.meta
            if meta["episode_id"] in self._by_episode_id:
                return self._by_episode_id[meta["episode_id"]]
            if meta["split"] == Split.EVAL.value:
                return None
            if meta["split"] not in TRAINABLE_SPLITS:
                raise ValueError(f"{path}: unknown split {meta['split']!r}")
            source = np.asarray(reader.column("control_source"), dtype=np.uint8)
            layout = reader.frame_layout()
            try:
                cameras = tuple((reader.camera_dataset(c), tuple(meta["image_shape"]) if c == meta["camera"]
                                 else tuple(meta["cameras"][c])) for c in self.cameras)
            except KeyError as exc:
                raise ValueError(f"{path}: {exc.args[0]}; the policy reads {', '.join(self.cameras)}") from None
        task_id = self._task_ids.setdefault(meta["task"], len(self._task_ids))
        if task_id == len(self.tasks):
            self.tasks.append(meta["task"])
        steps = int(meta["steps"])
        entry = EpisodeEntry(
            index=len(self.episodes),
            path=path,
            episode_id=meta["episode_id"],
            task=meta["task"],
            task_id=task_id,
            prompt=meta["prompt"],
            split=meta["split"],
            steps=steps,
            offset=self.num_frames,
            image_shape=tuple(meta["image_shape"]),
            outcome=str(meta["outcome"] if outcome is None else outcome),
            env_id=str(meta["env_id"]),
            cameras=cameras,
        )
        if self.image_shape is None:
            self.image_shape = entry.cameras[0][1] if self.cameras else entry.image_shape
            self.camera_shapes = {name: shape for name, (_, shape) in zip(self.cameras, entry.cameras)}
        online = meta["split"] == Split.ONLINE.value
        chunk = (
            np.full(steps, entry.index, np.int32),
            np.arange(steps, dtype=np.int32),
            np.full(steps, task_id, np.int16),
            np.full(steps, online, bool),
            (source != POLICY_CODE) & online,
            source,
        )
        with self._arrays_lock:
            self._pending.append(chunk)
        self.episodes.append(entry)
        self._layouts.append(layout)
        self._by_episode_id[entry.episode_id] = entry
        self._num_frames += steps
        self.version += 1
        return entry

    @property
    def num_frames(self) -> int:
        return self._num_frames

    def __len__(self) -> int:
        return self.num_frames

    def _consolidated(self) -> dict[str, np.ndarray]:
        with self._arrays_lock:
            if self._pending:
                columns = list(zip(*self._pending))
                self._pending = []
                self._arrays = {
                    name: np.concatenate([self._arrays[name], *parts])
                    for name, parts in zip(_ARRAY_NAMES, columns)
                }
            return self._arrays

    # Per-frame arrays, all of length num_frames.
    @property
    def episode(self) -> np.ndarray:  # int32: index into self.episodes
        return self._consolidated()["episode"]

    @property
    def frame(self) -> np.ndarray:  # int32: step within the episode
        return self._consolidated()["frame"]

    @property
    def task(self) -> np.ndarray:  # int16: index into self.tasks
        return self._consolidated()["task"]

    @property
    def online(self) -> np.ndarray:  # bool: the episode's split is online (else offline)
        return self._consolidated()["online"]

    @property
    def intervention(self) -> np.ndarray:  # bool: a step of an ONLINE episode driven by an operator, not the policy
        return self._consolidated()["intervention"]

    @property
    def control_source(self) -> np.ndarray:  # uint8: protocol.CONTROL_SOURCE_CODES
        return self._consolidated()["control_source"]

    def nbytes(self) -> int:
        """Memory held by the per-frame arrays (the index's footprint, excluding open files)."""
        return sum(a.nbytes for a in self._consolidated().values())

    def prompts(self) -> list[str]:
        return sorted({e.prompt for e in self.episodes})

    def entry(self, episode_id: str) -> Optional[EpisodeEntry]:
        return self._by_episode_id.get(episode_id)

    # -- payload access ----------------------------------------------------------------------------------------

    def _open(self, episode: int) -> _OpenEpisode | _DirectEpisode:
        layout = self._layouts[episode]
        if layout is not None:
            return self._cached(self._direct, episode, self.max_open_descriptors,
                                lambda: _DirectEpisode(self.episodes[episode], layout))
        return self._cached(self._lru, episode, self.max_open_episodes, lambda: _OpenEpisode(self.episodes[episode]))

    def _cached(self, lru: collections.OrderedDict, episode: int, capacity: int, open_it):
        opened = lru.get(episode)
        if opened is not None:
            lru.move_to_end(episode)
            return opened
        opened = lru[episode] = open_it()
        self.opens += 1
        while len(lru) > capacity:
            lru.popitem(last=False)[1].close()
        return opened

    def load_batch(self, frame_ids: np.ndarray, label_mask: Optional[np.ndarray] = None) -> dict[str, Any]:
        """Read the sampled frames and assemble a training batch.

        Returns torch tensors: ``image`` uint8 [B, H, W, 3] (with ``cameras``: the first camera's), ``cameras``
        {name: uint8 [B, H, W, 3]} when the index has named cameras, ``state`` float32 [B, S], ``action`` float32
        [B, horizon, A] (the executed actions t..t+horizon-1, padded past the episode's end by repeating its last
        action), ``action_mask`` bool [B, horizon] (False for padding and, if ``label_mask`` (per global frame) is
        given, for steps that are not labels, e.g. autonomous steps after an intervention ends), ``task`` int64,
        ``online`` / ``intervention`` bool, ``control_source`` uint8, ``frame_id`` int64; plus ``prompt`` and ``env_id`` list[str].
        """
        frame_ids = np.asarray(frame_ids, dtype=np.int64)
        arrays = self._consolidated()
        b, h = len(frame_ids), self.horizon
        with self._lock:
            images = None
            states = actions = None
            extra: list[Optional[np.ndarray]] = [None] + [np.empty((b, *self.camera_shapes[c]), np.uint8)
                                                          for c in self.cameras[1:]]
            wanted = [self.image_shape] + [self.camera_shapes[c] for c in self.cameras[1:]]
            mask = np.zeros((b, h), bool)
            prompts: list[str] = [""] * b
            env_ids: list[str] = [""] * b
            for k in np.argsort(frame_ids, kind="stable"):  # group reads by episode
                gid = int(frame_ids[k])
                entry = self.episodes[int(arrays["episode"][gid])]
                t = int(arrays["frame"][gid])
                opened = self._open(entry.index)
                end = min(t + h, entry.steps)
                state, rows = opened.read_rows(t, end)
                if images is None:
                    images = extra[0] = np.empty((b, *self.image_shape), np.uint8)
                    states = np.empty((b, len(state)), np.float32)
                    actions = np.empty((b, h, rows.shape[1]), np.float32)
                for j, (dataset, shape) in enumerate(entry.cameras or ((IMAGE, entry.image_shape),)):
                    if shape == wanted[j]:
                        opened.read_camera(dataset, t, extra[j][k: k + 1])
                    else:
                        frame = np.empty((1, *shape), np.uint8)
                        opened.read_camera(dataset, t, frame)
                        extra[j][k] = resize_image(frame[0], wanted[j][:2])
                states[k] = state
                actions[k, : end - t] = rows
                actions[k, end - t:] = rows[-1]  # past the episode's end: its last action, repeated
                mask[k, : end - t] = True if label_mask is None else label_mask[entry.offset + t: entry.offset + end]
                prompts[k] = entry.prompt
                env_ids[k] = entry.env_id
            self.frames_read += b
        image = torch.from_numpy(images)
        cameras = {"cameras": {name: image if j == 0 else torch.from_numpy(extra[j])
                               for j, name in enumerate(self.cameras)}} if self.cameras else {}
        return {
            **cameras,
            "image": image,
            "state": torch.from_numpy(states),
            "action": torch.from_numpy(actions),
            "action_mask": torch.from_numpy(mask),
            "prompt": prompts,
            "env_id": env_ids,
            "task": torch.from_numpy(arrays["task"][frame_ids].astype(np.int64)),
            "online": torch.from_numpy(arrays["online"][frame_ids]),
            "intervention": torch.from_numpy(arrays["intervention"][frame_ids]),
            "control_source": torch.from_numpy(arrays["control_source"][frame_ids]),
            "frame_id": torch.from_numpy(frame_ids),
        }

    def collect_columns(
        self, frame_mask: np.ndarray, max_episodes: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """States, actions and environment ids of the frames in ``frame_mask`` from at most ``max_episodes`` episodes
        (drawn at random): the sample normalisation stats are fitted on. Reads only the small columns, never images."""
        arrays = self._consolidated()
        episodes = np.unique(arrays["episode"][frame_mask])
        # by episode id, not by indexing order (which follows upload times): the same data gives the same stats
        episodes = np.array(sorted(episodes, key=lambda e: self.episodes[int(e)].episode_id), dtype=np.int64)
        if len(episodes) > max_episodes:
            episodes = episodes[np.sort(rng.choice(len(episodes), size=max_episodes, replace=False))]
        states, actions, env_ids = [], [], []
        for e in episodes:
            entry = self.episodes[int(e)]
            keep = frame_mask[entry.offset: entry.offset + entry.steps]
            with EpisodeReader(entry.path) as reader:
                states.append(reader.column("observation/state")[keep])
                actions.append(reader.column("action")[keep])
            env_ids += [entry.env_id] * int(keep.sum())
        if not states:
            raise ValueError("no trainable frames to fit normalisation on")
        return np.concatenate(states), np.concatenate(actions), env_ids

    def episode_columns(self, episode: int) -> dict[str, np.ndarray]:
        """All frames of one episode at once (``image`` uint8 [T, H, W, 3] at the file's camera size: the camera
        ``load_batch`` delivers as ``image``, ``state`` float32 [T, S]): for batched passes over whole episodes (RECAP's
        value function, which trains on ``load_batch``'s ``image``). Reads through a validating ``EpisodeReader``, not
        the sampling LRU, so that it never evicts the files the sampler is using."""
        entry = self.episodes[int(episode)]
        dataset = entry.cameras[0][0] if entry.cameras else IMAGE
        with EpisodeReader(entry.path) as reader:
            images = np.ascontiguousarray(reader.column(dataset), dtype=np.uint8)
            states = np.asarray(reader.column("observation/state"), dtype=np.float32)
        if len(images) != entry.steps:
            raise ValueError(f"{entry.path} changed since it was indexed")
        return {"image": images, "state": states}

    def close(self) -> None:
        with self._lock:
            for lru in (self._lru, self._direct):
                while lru:
                    _, opened = lru.popitem()
                    opened.close()


_ARRAY_NAMES = ("episode", "frame", "task", "online", "intervention", "control_source")


def _empty_arrays() -> dict[str, np.ndarray]:
    dtypes = (np.int32, np.int32, np.int16, bool, bool, np.uint8)
    return {name: np.zeros(0, dtype) for name, dtype in zip(_ARRAY_NAMES, dtypes)}


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size[0], size[1], 3] with an antialiased bilinear (triangle) filter: the same result
    as the policy's torch resize to within one grey level. Plain numpy on purpose: it runs in the loader thread, and
    a torch op there would start a second OpenMP team that fights the update's threads for the cores."""
    x = image.astype(np.float32)
    if image.shape[0] != size[0]:
        idx, weight = _resize_taps(image.shape[0], size[0])
        x = sum(weight[:, j, None, None] * x[idx[:, j]] for j in range(idx.shape[1]))
    if image.shape[1] != size[1]:
        idx, weight = _resize_taps(image.shape[1], size[1])
        x = sum(weight[None, :, j, None] * x[:, idx[:, j]] for j in range(idx.shape[1]))
    return np.clip(np.asarray(x) + 0.5, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights [n_out, taps] of a triangle filter widened by the downscale factor."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (np.arange(n_out) + 0.5) * scale
    first = np.floor(centers - support).astype(np.int64)
    idx = first[:, None] + np.arange(2 * int(np.ceil(support)) + 1)[None, :]
    weight = np.maximum(0.0, 1.0 - np.abs((idx + 0.5 - centers[:, None]) / support))
    weight[(idx < 0) | (idx >= n_in)] = 0.0
    weight /= weight.sum(1, keepdims=True)
    keep = weight.any(0)
    return np.clip(idx[:, keep], 0, n_in - 1), weight[:, keep].astype(np.float32)
