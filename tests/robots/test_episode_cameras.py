"""More cameras in an episode file (observation/cameras/<name>, docs/episode_format.md): written, read frame by frame
and by byte layout, checked in the sandboxed child, and refused when they break the schema like any other image."""

import h5py
import numpy as np
import pytest

from robots.episode_file import (
    MAX_EXTRA_CAMERAS,
    EpisodeFileError,
    EpisodeReader,
    inspect_file,
    write_episode,
)
from robots.payload_check import PayloadChecker

from .factories import episode_data


def with_cameras(steps=5, **sizes):
    data = episode_data(steps=steps)
    rng = np.random.default_rng(1)
    data.cameras = {name: rng.integers(0, 255, (steps, side, side + 2, 3), dtype=np.uint8)
                    for name, side in sizes.items()}
    return data


def test_more_cameras_round_trip_at_their_own_sizes(tmp_path):
    data = with_cameras(gripperPOV=6, corner=10)
    write_episode(tmp_path / "e.h5", data)
    with EpisodeReader(tmp_path / "e.h5") as reader:
        assert reader.meta["cameras"] == {"corner": (10, 12, 3), "gripperPOV": (6, 8, 3)}
        loaded = reader.load()
        frame = reader.frame(3)
        assert reader.camera_dataset("corner3") == "observation/image"
        assert reader.camera_dataset("corner") == "observation/cameras/corner"
        with pytest.raises(KeyError, match="was not recorded in this episode .*corner3, corner, gripperPOV"):
            reader.camera_dataset("behind")
        layout = reader.frame_layout()
    for name, frames in data.cameras.items():
        np.testing.assert_array_equal(loaded.cameras[name], frames)
        np.testing.assert_array_equal(frame["cameras"][name], frames[3])
        chunks = layout.chunks(name)
        assert chunks.frame_shape == frames.shape[1:] and len(chunks.offsets) == 5
    np.testing.assert_array_equal(loaded.images, data.images)


def test_a_file_without_more_cameras_reads_as_before(tmp_path):
    write_episode(tmp_path / "e.h5", episode_data())
    with h5py.File(tmp_path / "e.h5") as f:
        assert "cameras" not in f["observation"]
    assert inspect_file(tmp_path / "e.h5")["cameras"] == {}


def test_the_sandboxed_checker_returns_the_cameras(tmp_path):
    write_episode(tmp_path / "e.h5", with_cameras(gripperPOV=6))
    with PayloadChecker() as checker:
        assert checker.check(tmp_path / "e.h5")["cameras"] == {"gripperPOV": (6, 8, 3)}


@pytest.mark.parametrize("cameras, message", [
    ({"corner3": 6}, "is the primary camera"),
    ({"../x": 6}, "is not"),
    ({f"c{i}": 4 for i in range(MAX_EXTRA_CAMERAS + 1)}, "besides the primary"),
])
def test_the_writer_refuses_bad_camera_sets(tmp_path, cameras, message):
    data = episode_data()
    data.cameras = {name: np.zeros((5, side, side, 3), np.uint8) for name, side in cameras.items()}
    with pytest.raises(EpisodeFileError, match=message):
        write_episode(tmp_path / "e.h5", data)


def test_the_writer_refuses_a_camera_with_other_rows(tmp_path):
    data = episode_data()
    data.cameras = {"gripperPOV": np.zeros((4, 8, 8, 3), np.uint8)}
    with pytest.raises(EpisodeFileError, match="gripperPOV"):
        write_episode(tmp_path / "e.h5", data)


def _damaged(tmp_path, damage):
    write_episode(tmp_path / "e.h5", with_cameras(gripperPOV=6))
    with h5py.File(tmp_path / "e.h5", "r+") as f:
        damage(f)
    return tmp_path / "e.h5"


@pytest.mark.parametrize("damage, message", [
    # a camera named like the primary is a second copy of observation/image
    (lambda f: f.move("observation/cameras/gripperPOV", "observation/cameras/corner3"), "is the primary camera"),
    (lambda f: f["observation/cameras"].create_dataset("bad name", data=np.zeros((5, 4, 4, 3), np.uint8),
                                                       chunks=(1, 4, 4, 3)), "is not"),
    (lambda f: [f["observation/cameras"].create_dataset(f"c{i}", data=np.zeros((5, 4, 4, 3), np.uint8),
                                                        chunks=(1, 4, 4, 3)) for i in range(MAX_EXTRA_CAMERAS)],
     "allows 1 to"),
    (lambda f: f["observation/cameras"].__setitem__("wrist", h5py.SoftLink("/observation/image")), "a soft link"),
    (lambda f: f["observation/cameras"].__setitem__("wrist", h5py.ExternalLink("other.h5", "/x")), "an external link"),
    (lambda f: f["observation/cameras"].create_dataset("wrist", data=np.zeros((5, 4, 4, 3), np.uint8)),
     "one frame per chunk"),
    (lambda f: f["observation/cameras"].create_dataset("wrist", data=np.zeros((5, 4, 4, 3), np.uint8),
                                                       chunks=(1, 4, 4, 3), compression="gzip"), "gzip"),
    (lambda f: f["observation/cameras"].create_dataset("wrist", data=np.zeros((4, 4, 4, 3), np.uint8),
                                                       chunks=(1, 4, 4, 3)), "with 5 rows"),
    (lambda f: f["observation/cameras"].create_dataset("wrist", data=np.zeros((5, 4, 4), np.uint8),
                                                       chunks=(1, 4, 4)), "4 dimensions"),
    (lambda f: f["observation/cameras"].create_dataset("wrist", shape=(5, 1000, 1000, 3), dtype=np.uint8,
                                                       chunks=(1, 1000, 1000, 3)), "chunks written"),
    (lambda f: f["observation/cameras"].create_group("nested"), "is not a dataset"),
    (lambda f: (f.__delitem__("observation/cameras/gripperPOV")), "allows 1 to"),
    (lambda f: f["observation/cameras"].attrs.__setitem__("x", 1), "has attributes"),
])
def test_a_hostile_camera_is_refused_in_the_sandbox_too(tmp_path, damage, message):
    path = _damaged(tmp_path, damage)
    with pytest.raises(EpisodeFileError, match=message):
        inspect_file(path)
    with PayloadChecker() as checker, pytest.raises(EpisodeFileError, match=message):
        checker.check(path)
