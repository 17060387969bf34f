import os
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from learner.buffer import FrameIndex, resize_image
from robots.episode_file import EpisodeReader

from .conftest import OPERATOR, POLICY, SIM_OPERATOR, make_episode


@pytest.fixture
def spy(monkeypatch):
    """Records every HDF5 file opened and every EpisodeReader column read; whole-frame reads are forbidden."""
    record = SimpleNamespace(opened=[], columns=[])
    real_open, real_column = h5py.h5f.open, EpisodeReader.column

    def open_file(name, *args, **kwargs):  # every HDF5 file open goes through here, h5py.File's too
        record.opened.append(os.fsdecode(name))
        return real_open(name, *args, **kwargs)

    def column(self, name, start=0, stop=None):
        record.columns.append((str(self.path), name))
        return real_column(self, name, start, stop)

    def frame(self, i):
        raise AssertionError("the buffer reads columns and single image chunks, never whole frames")

    monkeypatch.setattr(h5py.h5f, "open", open_file)
    monkeypatch.setattr(EpisodeReader, "column", column)
    monkeypatch.setattr(EpisodeReader, "frame", frame)
    return record


def test_the_index_holds_per_frame_metadata(episodes):
    index = FrameIndex(horizon=2)
    for path in episodes:
        index.add_episode(path)
    assert len(index) == 8 * 6 and index.tasks == ["reach", "push"]
    assert index.online.sum() == 4 * 6
    assert index.intervention.sum() == 4 * 2  # offline demos are demonstrations, not interventions
    online_interventions = index.intervention & index.online
    assert set(index.frame[online_interventions]) == {2, 3}
    assert set(index.control_source[online_interventions]) == {OPERATOR, SIM_OPERATOR}
    assert set(index.control_source[index.online & ~index.intervention]) == {POLICY}
    assert index.prompts() == ["push the target", "reach the target"]


def test_indexing_reads_only_attributes_and_the_control_source_column(episodes, spy):
    index = FrameIndex(horizon=2)
    for path in episodes:
        index.add_episode(path)
    assert {name for _, name in spy.columns} == {"control_source"}
    assert sorted(spy.opened) == sorted(map(str, episodes))  # each file once, to read its attributes


def test_only_sampled_episodes_are_ever_opened_for_payloads_and_never_through_hdf5(episodes, spy):
    index = FrameIndex(horizon=2)
    for path in episodes:
        index.add_episode(path)
    spy.opened, spy.columns = [], []
    wanted = index.episodes[3]
    batch = index.load_batch(np.array([wanted.offset + 1, wanted.offset + 4]))
    assert spy.opened == [] and spy.columns == []  # the recorded byte layout: preads, no HDF5 open
    assert batch["image"].shape == (2, 16, 16, 3) and index.opens == 1 and list(index._direct) == [wanted.index]
    index.load_batch(np.array([wanted.offset]))
    assert index.opens == 1  # still open in the LRU


def test_the_lrus_bound_the_number_of_open_files(episodes, monkeypatch):
    index = FrameIndex(horizon=2, max_open_episodes=2)
    index.max_open_descriptors = 3
    for path in episodes:
        index.add_episode(path)
    for entry in index.episodes:
        index.load_batch(np.array([entry.offset]))
    assert len(index._direct) == 3 and index.opens == len(episodes)
    # files without a usable layout go through HDF5, in their own LRU
    monkeypatch.setattr(EpisodeReader, "frame_layout", lambda self: None)
    hdf5 = FrameIndex(horizon=2, max_open_episodes=2)
    for path in episodes:
        hdf5.add_episode(path)
    for entry in hdf5.episodes:
        hdf5.load_batch(np.array([entry.offset]))
    assert len(hdf5._lru) == 2 and not hdf5._direct and hdf5.opens == len(episodes)


def test_direct_reads_give_exactly_what_hdf5_gives(episodes, monkeypatch):
    direct = FrameIndex(horizon=3)
    for path in episodes:
        direct.add_episode(path)
    monkeypatch.setattr(EpisodeReader, "frame_layout", lambda self: None)
    hdf5 = FrameIndex(horizon=3)
    for path in episodes:
        hdf5.add_episode(path)
    ids = np.random.default_rng(0).integers(0, len(direct), 40)
    a, b = direct.load_batch(ids), hdf5.load_batch(ids)
    for key in ("image", "state", "action", "action_mask", "task", "online", "intervention", "frame_id"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)


def test_an_incompressible_frame_stored_raw_is_read_too(tmp_path):
    path = make_episode(tmp_path / "noise.h5", steps=5, image_size=16)
    with h5py.File(path, "r+") as f:  # random pixels: LZF cannot shrink them, so HDF5 stores the chunks as they are
        noise = np.random.default_rng(1).integers(0, 256, f["observation/image"].shape, dtype=np.uint8)
        f["observation/image"][...] = noise
    index = FrameIndex(horizon=1)
    index.add_episode(path)
    assert index._layouts[0].raw.all()
    np.testing.assert_array_equal(index.load_batch(np.arange(5))["image"].numpy(), noise)


def test_a_file_changed_since_it_was_indexed_is_refused(tmp_path):
    path = make_episode(tmp_path / "a.h5", steps=6, image_size=16)
    index = FrameIndex(horizon=1)
    index.add_episode(path)
    with open(path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ValueError, match="changed since it was indexed"):
        index.load_batch(np.array([0]))


def test_the_index_footprint_does_not_grow_with_image_size(tmp_path):
    small, large = FrameIndex(horizon=2), FrameIndex(horizon=2)
    small.add_episode(make_episode(tmp_path / "a.h5", steps=20, image_size=8))
    large.add_episode(make_episode(tmp_path / "b.h5", steps=20, image_size=64))
    assert small.nbytes() == large.nbytes() < 20 * 16


def test_a_batch_carries_the_frames_their_action_chunks_and_flags(episodes):
    index = FrameIndex(horizon=3)
    for path in episodes:
        index.add_episode(path)
    entry = index.episodes[2]  # reach, online, operator at steps 2-3
    ids = np.array([entry.offset + 5, entry.offset + 2, entry.offset])
    batch = index.load_batch(ids)
    with EpisodeReader(entry.path) as reader:
        data = reader.load()
    np.testing.assert_array_equal(batch["image"][1].numpy(), data.images[2])
    np.testing.assert_array_equal(batch["state"][0].numpy(), data.states[5])
    np.testing.assert_array_equal(batch["action"][1].numpy(), data.actions[2:5])
    # the last frame's chunk is padded by repeating the final action, and the padding is masked
    np.testing.assert_array_equal(batch["action"][0].numpy(), data.actions[[5, 5, 5]])
    assert batch["action_mask"][0].tolist() == [True, False, False]
    assert batch["intervention"].tolist() == [False, True, False]
    assert batch["online"].tolist() == [True] * 3 and batch["task"].tolist() == [0] * 3
    assert batch["prompt"] == ["reach the target"] * 3


def test_a_label_mask_hides_chunk_steps_that_are_not_labels(episodes):
    index = FrameIndex(horizon=4)
    for path in episodes:
        index.add_episode(path)
    entry = index.episodes[2]  # intervention at steps 2-3, then the policy drives again
    labels = ~index.online | index.intervention
    batch = index.load_batch(np.array([entry.offset + 2]), labels)
    assert batch["action_mask"][0].tolist() == [True, True, False, False]


def test_eval_episodes_are_not_indexed_and_duplicates_are_ignored(tmp_path):
    index = FrameIndex(horizon=2)
    assert index.add_episode(make_episode(tmp_path / "eval.h5", split="eval")) is None
    path = make_episode(tmp_path / "demo.h5")
    first = index.add_episode(path)
    assert index.add_episode(path) is first and len(index) == 6 and len(index.episodes) == 1


def test_frames_from_a_camera_of_another_size_are_resized_to_stack(tmp_path):
    index = FrameIndex(horizon=2)
    a = index.add_episode(make_episode(tmp_path / "a.h5", image_size=16))
    b = index.add_episode(make_episode(tmp_path / "b.h5", image_size=24, seed=1))
    batch = index.load_batch(np.array([a.offset, b.offset]))
    assert batch["image"].shape == (2, 16, 16, 3)


def test_normalisation_columns_come_only_from_trainable_frames(episodes, spy):
    index = FrameIndex(horizon=2)
    for path in episodes:
        index.add_episode(path)
    spy.columns = []
    states, actions, env_ids = index.collect_columns(~index.online, 100, np.random.default_rng(0))
    assert states.shape == (4 * 6, 39) and actions.shape == (4 * 6, 4)
    assert sorted(set(env_ids)) == ["push-v3", "reach-v3"] and len(env_ids) == 4 * 6
    assert "observation/image" not in {name for _, name in spy.columns}


def test_the_loader_resize_matches_the_policy_resize():
    import torch
    import torch.nn.functional as F

    image = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    ours = resize_image(image, (64, 64))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    theirs = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    theirs = theirs[0].permute(1, 2, 0).round().clamp(0, 255).numpy()
    assert np.abs(ours.astype(int) - theirs).max() <= 1
