"""The episode payload: written atomically, read lazily, and corrupt or truncated files are refused."""

import json

import h5py
import numpy as np
import pytest

from robots.episode_file import EpisodeFileError, EpisodeReader, Segment, write_episode

from .factories import episode_data


def test_an_episode_survives_a_write_read_round_trip(tmp_path):
    data = episode_data(segments=[Segment(1, 3, "operator", "alice", "about to miss the handle", lease=7)])
    data.control_source[1:3] = 1  # the operator drove steps 1 and 2
    write_episode(tmp_path / "e.h5", data)
    with EpisodeReader(tmp_path / "e.h5") as reader:
        loaded = reader.load()
        assert reader.steps == 5 and reader.meta["image_shape"] == (8, 8, 3)
    assert loaded.meta == data.meta
    assert loaded.segments == data.segments
    for name in ("images", "states", "actions", "control_source", "rewards", "successes", "timestamps"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(data, name))
    assert not (tmp_path / "e.h5.tmp").exists()


def test_one_frame_is_read_without_loading_the_episode(tmp_path):
    data = episode_data(steps=7)
    write_episode(tmp_path / "e.h5", data)
    with EpisodeReader(tmp_path / "e.h5") as reader:
        assert reader._f["observation/image"].chunks == (1, 8, 8, 3)  # one chunk per frame
        frame = reader.frame(4)
        np.testing.assert_array_equal(frame["image"], data.images[4])
        np.testing.assert_array_equal(frame["action"], data.actions[4])
        assert frame["timestamp"] == pytest.approx(0.4)
        np.testing.assert_array_equal(reader.column("action", 2, 5), data.actions[2:5])
        with pytest.raises(IndexError):
            reader.frame(7)


def test_random_bytes_are_not_an_episode(tmp_path):
    (tmp_path / "junk.h5").write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(EpisodeFileError):
        EpisodeReader(tmp_path / "junk.h5")


def test_a_truncated_file_is_refused(tmp_path):
    write_episode(tmp_path / "e.h5", episode_data())
    raw = (tmp_path / "e.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EpisodeFileError):
        EpisodeReader(tmp_path / "cut.h5")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.attrs.__delitem__("task"), "missing attribute 'task'"),
        (lambda f: f.attrs.__setitem__("format", "other"), "format"),
        (lambda f: f.__delitem__("action"), "missing dataset 'action'"),
        (lambda f: f.attrs.__setitem__("steps", 6), "with 6 rows"),
        (lambda f: f.attrs.__setitem__("interventions", json.dumps([{"start": 3, "end": 9, "source": "operator"}])),
         "outside the episode"),
        (lambda f: f.attrs.__setitem__("interventions", "not json"), "bad interventions"),
    ],
)
def test_a_file_with_a_broken_schema_is_refused(tmp_path, damage, message):
    write_episode(tmp_path / "e.h5", episode_data())
    with h5py.File(tmp_path / "e.h5", "r+") as f:
        damage(f)
    with pytest.raises(EpisodeFileError, match=message):
        EpisodeReader(tmp_path / "e.h5")


def test_the_writer_refuses_inconsistent_arrays(tmp_path):
    data = episode_data()
    data.rewards = data.rewards[:3]
    with pytest.raises(EpisodeFileError, match="rewards"):
        write_episode(tmp_path / "e.h5", data)
    with pytest.raises(EpisodeFileError, match="outside"):
        write_episode(tmp_path / "e.h5", episode_data(segments=[Segment(4, 6, "operator")]))
    assert not (tmp_path / "e.h5").exists()
