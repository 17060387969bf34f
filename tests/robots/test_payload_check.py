"""Hostile episode payloads: inspect_file / EpisodeReader refuse them, and robots.payload_check runs the checks in a
sandboxed child that may crash or hang without harming the server.

Every attack here was accepted by the previous EpisodeReader (these tests were run against the reader of the commit
before the checks, with the messages ignored), except where a test says otherwise; nested JSON made it raise
RecursionError and damaged files KeyError / OSError instead of EpisodeFileError.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from robots import episode_file, protocol
from robots.episode_file import (
    EpisodeFileError,
    EpisodeReader,
    Limits,
    Segment,
    inspect_file,
    write_episode,
)
from robots.payload_check import PayloadChecker

from .factories import episode_data

SECRET = b"SECRET_KEY=django-insecure-0123456789abcdef"


@pytest.fixture(scope="module")
def checker():
    with PayloadChecker() as c:
        yield c


def valid_file(tmp_path: Path, name: str = "e.h5", **kwargs) -> Path:
    path = tmp_path / name
    write_episode(path, episode_data(**kwargs))
    return path


def refused(path: Path, match: str, limits: Limits = episode_file.DEFAULT_LIMITS) -> None:
    """Refused by inspect_file and by EpisodeReader, with an EpisodeFileError saying ``match``."""
    with pytest.raises(EpisodeFileError, match=match):
        inspect_file(path, limits)
    with pytest.raises(EpisodeFileError, match=match):
        EpisodeReader(path, limits)


def replace_dataset(path: Path, name: str, **create) -> None:
    """Recreate one dataset of a valid file with other creation options (same data unless ``shape`` is given)."""
    with h5py.File(path, "r+") as f:
        data = f[name][()]
        del f[name]
        if "shape" not in create:
            create["data"] = data
        f.create_dataset(name, **create)


def low_level_dataset(path: Path, name: str, dcpl, data: np.ndarray) -> None:
    """Recreate a dataset from a hand-made creation property list (layouts and filters h5py's API refuses)."""
    with h5py.File(path, "r+") as f:
        del f[name]
        space = h5py.h5s.create_simple(data.shape)
        dsid = h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(data.dtype), space, dcpl=dcpl)
        h5py.Dataset(dsid)[...] = data


def set_attribute(path: Path, key: str, value) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs[key] = value


def set_interventions(path: Path, segments, codes=None) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs["interventions"] = segments if isinstance(segments, str) else json.dumps(segments)
        if codes is not None:
            f["control_source"][...] = np.asarray(codes, dtype=np.uint8)


def bomb(path: Path, steps: int, side: int, state_dim: int = 39) -> Path:
    """A ~10 KB file that declares ``steps`` steps of side x side images and writes none of them."""
    source = valid_file(path.parent, "bomb-source.h5")
    with h5py.File(source, "r") as src, h5py.File(path, "w", libver="latest") as f:
        for key, value in src.attrs.items():
            f.attrs[key] = value
        f.attrs["steps"] = steps
        f.create_dataset("observation/image", shape=(steps, side, side, 3), dtype="u1", chunks=(1, side, side, 3),
                         compression="lzf")
        f.create_dataset("observation/state", shape=(steps, state_dim), dtype="f4")
        f.create_dataset("action", shape=(steps, 4), dtype="f4")
        for name, dtype in (("control_source", "u1"), ("reward", "f4"), ("success", bool), ("timestamp", "f8")):
            f.create_dataset(name, shape=(steps,), dtype=dtype)
    assert path.stat().st_size < 20_000
    return path


# ---------------------------------------------------------------------------------------------- the reference


def test_the_reference_writers_file_passes_and_round_trips_through_the_checker(tmp_path, checker):
    data = episode_data(steps=6, segments=[Segment(1, 3, "operator", "alice", "about to miss", lease=4),
                                           Segment(4, 6, "sim_operator", "", "stalled")])
    data.control_source[:] = [0, 1, 1, 0, 2, 2]
    write_episode(tmp_path / "e.h5", data)
    meta = inspect_file(tmp_path / "e.h5")
    assert checker.check(tmp_path / "e.h5") == meta
    assert json.loads(json.dumps(meta)) == {**meta, "image_shape": list(meta["image_shape"])}
    assert meta["segments"] == [
        {"start": 1, "end": 3, "source": "operator", "operator": "alice", "reason": "about to miss", "lease": 4},
        {"start": 4, "end": 6, "source": "sim_operator", "operator": "", "reason": "stalled", "lease": None},
    ]
    assert (meta["steps"], meta["image_shape"], meta["state_dim"], meta["action_dim"]) == (6, (8, 8, 3), 4, 4)
    with EpisodeReader(tmp_path / "e.h5") as reader:
        assert reader.meta == {**meta, "segments": data.segments}
        assert reader.load().segments == data.segments


def test_a_realistic_episode_with_random_frames_passes(tmp_path):
    """Random frames do not compress: h5py stores those LZF chunks raw (filter skipped, mask 1), which is fine."""
    data = episode_data(steps=40)
    data.images = np.random.default_rng(0).integers(0, 255, (40, 96, 96, 3), dtype=np.uint8)
    data.images[::2] = 7  # and these compress
    write_episode(tmp_path / "e.h5", data)
    assert inspect_file(tmp_path / "e.h5")["image_shape"] == (96, 96, 3)


def test_it_accepts_uncompressed_images_and_chunked_small_datasets(tmp_path):
    """Non-Python robot writers may chunk the small datasets or skip LZF."""
    path = valid_file(tmp_path)
    replace_dataset(path, "observation/image", chunks=(1, 8, 8, 3))
    replace_dataset(path, "observation/state", chunks=(2, 4))
    replace_dataset(path, "timestamp", chunks=(5,))
    assert inspect_file(path)["steps"] == 5


def test_the_format_constants_match_the_protocol():
    assert episode_file.SEGMENT_SOURCES == {
        s.value: code for s, code in protocol.CONTROL_SOURCE_CODES.items() if s != protocol.ControlSource.POLICY}
    assert episode_file.POLICY_CODE == protocol.CONTROL_SOURCE_CODES[protocol.ControlSource.POLICY]
    assert episode_file.OUTCOMES == {o.value for o in protocol.Outcome}
    assert episode_file.SPLITS == {s.value for s in protocol.Split}


# ---------------------------------------------------------------------------------------------- 1. other files


def test_it_refuses_external_raw_storage_and_never_shows_the_secret(tmp_path, checker):
    secret = tmp_path / "secret_key"
    secret.write_bytes(SECRET * 10)
    path = valid_file(tmp_path)
    replace_dataset(path, "action", shape=(5, 4), dtype="f4", external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
    refused(path, "external raw storage")
    with pytest.raises(EpisodeFileError) as refusal:
        checker.check(path)
    assert "external raw storage" in str(refusal.value)
    for text in (str(refusal.value), json.dumps(checker.last_stats)):
        assert "SECRET" not in text and "django-insecure" not in text


@pytest.mark.parametrize("member, link, kind", [
    ("action", lambda other: h5py.SoftLink("/observation/state"), "a soft link"),
    ("reward", lambda other: h5py.ExternalLink(str(other), "/reward"), "an external link"),
    ("observation", lambda other: h5py.ExternalLink(str(other), "/observation"), "an external link"),
])
def test_it_refuses_soft_and_external_links(tmp_path, member, link, kind):
    other = valid_file(tmp_path, "other.h5")
    path = valid_file(tmp_path)
    with h5py.File(path, "r+") as f:
        del f[member]
        f[member] = link(other)
    refused(path, f"'/{member}' is {kind}")


def test_it_refuses_a_virtual_dataset(tmp_path):
    other = valid_file(tmp_path, "other.h5")
    path = valid_file(tmp_path)
    layout = h5py.VirtualLayout(shape=(5, 4), dtype="f4")
    layout[:] = h5py.VirtualSource(str(other), "action", shape=(5, 4))
    with h5py.File(path, "r+") as f:
        del f["action"]
        f.create_virtual_dataset("action", layout)
    refused(path, "virtual dataset")


# ---------------------------------------------------------------------------------------------- 2. filters


@pytest.mark.parametrize("name, create, message", [
    ("reward", dict(chunks=(5,), compression="gzip"), "gzip"),
    ("observation/state", dict(chunks=(5, 4), shuffle=True), "shuffle"),
    ("timestamp", dict(chunks=(5,), fletcher32=True), "fletcher32"),
    ("reward", dict(chunks=(5,), scaleoffset=2), "scaleoffset"),
    ("action", dict(chunks=(5, 4), compression="lzf"), "lzf"),
    ("observation/image", dict(chunks=(1, 8, 8, 3), compression="gzip"), "gzip"),
    ("observation/image", dict(chunks=(1, 8, 8, 3), compression="lzf", shuffle=True), "shuffle, lzf"),
])
def test_it_refuses_filters_other_than_lzf_on_images(tmp_path, name, create, message):
    path = valid_file(tmp_path)
    replace_dataset(path, name, **create)
    refused(path, f"uses the filter\\(s\\) {message}")


@pytest.mark.parametrize("filter_id, options, message", [
    (h5py.h5z.FILTER_NBIT, (), "nbit"),
    (h5py.h5z.FILTER_SZIP, (h5py.h5z.SZIP_NN_OPTION_MASK, 4), "szip"),
    (31999, (1, 2), "unknown filter 31999"),
])
def test_it_refuses_nbit_szip_and_unknown_filters(tmp_path, filter_id, options, message):
    if filter_id == h5py.h5z.FILTER_SZIP and not h5py.h5z.filter_avail(filter_id):
        pytest.skip("this libhdf5 has no szip")
    path = valid_file(tmp_path)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((5,))
    dcpl.set_filter(filter_id, h5py.h5z.FLAG_OPTIONAL, options)
    low_level_dataset(path, "control_source", dcpl, np.zeros(5, np.uint8))
    refused(path, message)


def test_it_refuses_the_compact_layout(tmp_path):
    path = valid_file(tmp_path)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.COMPACT)
    low_level_dataset(path, "reward", dcpl, np.zeros(5, np.float32))
    refused(path, "compact layout")


# ---------------------------------------------------------------------------------------------- 3. shapes


@pytest.mark.parametrize("create, message", [
    (dict(chunks=(2, 8, 8, 3), compression="lzf"), "expected one frame per chunk"),
    (dict(chunks=(1, 4, 8, 3), compression="lzf"), "expected one frame per chunk"),
    (dict(), "must be chunked one frame per chunk"),
])
def test_it_refuses_image_chunks_that_are_not_one_frame(tmp_path, create, message):
    path = valid_file(tmp_path)
    replace_dataset(path, "observation/image", **create)
    refused(path, message)


@pytest.mark.parametrize("limits, message", [
    (Limits(max_image_side=4), "images are 8x8x3"),
    (Limits(max_state_dim=3), "state dimension 4"),
    (Limits(max_action_dim=3), "action dimension 4"),
    (Limits(max_steps=4), "steps is 5"),
    (Limits(max_decoded_bytes=1000), "more than the 1000 allowed"),
])
def test_it_enforces_the_configured_limits(tmp_path, limits, message):
    """(The old reader had no limits at all.)"""
    refused(valid_file(tmp_path), message, limits)


# ---------------------------------------------------------------------------------------------- 4. bombs


@pytest.mark.parametrize("steps, side, message", [
    (10**9, 96, "steps is 1000000000"),  # declares 27 TB
    (100_000, 1024, "declares 314572800000 bytes, more than the 2147483648 allowed"),  # 314 GB
    (50_000, 96, "has 0 of its 50000 chunks written"),  # 1.4 GB, within the limits, but nothing stored
])
def test_it_refuses_an_allocation_bomb_quickly_without_allocating(tmp_path, checker, steps, side, message):
    path = bomb(tmp_path / "bomb.h5", steps, side)
    started = time.monotonic()
    with pytest.raises(EpisodeFileError, match=message):
        checker.check(path)
    assert time.monotonic() - started < 1.0
    assert checker.last_stats["child_maxrss_kb"] < 150_000  # the child's peak RSS: its imports, nothing more


def test_it_refuses_a_contiguous_dataset_that_was_never_written(tmp_path):
    path = valid_file(tmp_path)
    replace_dataset(path, "reward", shape=(5,), dtype="f4")  # declared, never allocated
    refused(path, "declares 20 bytes but the file stores 0")


def test_it_refuses_image_chunks_that_are_missing_or_oversized(tmp_path):
    path = valid_file(tmp_path)
    replace_dataset(path, "observation/image", shape=(5, 8, 8, 3), dtype="u1", chunks=(1, 8, 8, 3),
                    compression="lzf")
    with h5py.File(path, "r+") as f:
        f["observation/image"][:3] = 1  # chunks 3 and 4 never written
    refused(path, "has 3 of its 5 chunks written")
    with h5py.File(path, "r+") as f:
        image = f["observation/image"].id
        image.write_direct_chunk((3, 0, 0, 0), b"\0" * 100, filter_mask=1)  # "raw" but not the raw size
        image.write_direct_chunk((4, 0, 0, 0), b"\0" * 100)
    refused(path, r"chunk at \(3, 0, 0, 0\) is stored unfiltered with 100 bytes")
    with h5py.File(path, "r+") as f:
        f["observation/image"].id.write_direct_chunk((3, 0, 0, 0), b"\0" * 50_000)  # "LZF" of 50 KB for 192 bytes
    refused(path, r"chunk at \(3, 0, 0, 0\) stores 50000 bytes, more than its 192 raw bytes")


def test_it_refuses_a_dataset_that_points_outside_the_file(tmp_path):
    """A contiguous dataset's address patched past the end (HDF5 refuses to open it; we say so cleanly)."""
    path = valid_file(tmp_path)
    with h5py.File(path, "r") as f:
        offset, size = f["timestamp"].id.get_offset(), f["timestamp"].nbytes
    raw = bytearray(path.read_bytes())
    at = raw.find(offset.to_bytes(8, "little") + size.to_bytes(8, "little"))
    assert at > 0
    raw[at:at + 8] = (len(raw) * 4).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    refused(path, "'/timestamp' cannot be opened|outside the file")


# ---------------------------------------------------------------------------------------------- 5. the schema


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.create_dataset("extra", data=np.zeros(5)), "unexpected member '/extra'"),
    (lambda f: f.create_dataset("observation/depth", data=np.zeros(5)), "unexpected member '/observation/depth'"),
    (lambda f: f.__setitem__("mytype", np.dtype("<f4")), "unexpected member '/mytype'"),
    (lambda f: f.__setitem__("alias", f["action"]), "unexpected member '/alias'"),
    (lambda f: f["action"].attrs.__setitem__("units", "m/s"), "'/action' has attributes"),
    (lambda f: f["observation"].attrs.__setitem__("note", 1), "'/observation' has attributes"),
])
def test_it_refuses_members_and_attributes_outside_the_schema(tmp_path, damage, message):
    path = valid_file(tmp_path)
    with h5py.File(path, "r+") as f:
        damage(f)
    refused(path, message)


def test_it_refuses_a_success_column_with_values_other_than_0_and_1(tmp_path):
    path = valid_file(tmp_path)
    with h5py.File(path, "r+") as f:
        f["success"][...] = np.array([7, 0, 0, 0, 1], np.uint8).view(bool)
    refused(path, "'success' holds values other than 0 and 1")


# ---------------------------------------------------------------------------------------------- 6. attributes


@pytest.mark.parametrize("key, value, message", [
    ("robot", "sim-01\n", "robot 'sim-01\\\\n' is not a lowercase identifier"),
    ("robot", "Sim-01", "not a lowercase identifier"),
    ("task", "t" * 101, "not a lowercase identifier"),
    ("episode_id", str(uuid.uuid4()).upper(), "not a lowercase UUID"),
    ("episode_id", str(uuid.uuid4()) + "\n", "not a lowercase UUID"),
    ("prompt", "p" * 501, "prompt has 501 characters"),
    ("camera", "c" * 101, "camera has 101 characters"),
    ("policy", "x" * 5000, "takes 5000 bytes, more than 4096"),
    ("camera", np.bytes_(b"x" * 10_000), "takes 10000 bytes, more than 4096"),  # fixed-length: refused unread
    ("interventions", " " * (3 * 1024**2), "more than 2097152"),
    ("outcome", "exploded", "outcome 'exploded' is not one of"),
    ("split", "training", "split 'training' is not one of"),
    ("outcome_source", "god", "outcome_source 'god' is not one of"),
    ("control_hz", 0.0, r"control_hz 0.0 outside \(0, 1000\]"),
    ("control_hz", 5000.0, "control_hz 5000.0 outside"),
    ("control_hz", float("nan"), "not a finite number"),
    ("started_at", float("inf"), "not a finite number"),
    ("started_at", 4e9, "is after ended_at"),
    ("policy_version", -2, "policy_version -2 < -1"),
    ("policy_version", "3", "'policy_version' must be an integer"),
    ("success", 1, "'success' must be a bool"),
    ("started_at", "yesterday", "'started_at' must be a float"),
    ("robot", np.array(["sim-01", "sim-02"], dtype=h5py.string_dtype()), "must be a scalar"),
    ("steps", np.array([5, 5]), "must be a scalar"),
    ("homepage", "http://evil.example", "unknown attribute 'homepage'"),
])
def test_it_refuses_attributes_outside_the_schema(tmp_path, key, value, message):
    path = valid_file(tmp_path)
    set_attribute(path, key, value)
    refused(path, message)


def test_it_refuses_attributes_that_are_not_utf8(tmp_path):
    path = valid_file(tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs.create("prompt", b"open the \xff drawer", dtype=h5py.string_dtype("utf-8"))
    refused(path, "attribute 'prompt' is not valid UTF-8")


def test_it_refuses_a_wrong_format_version(tmp_path):
    """(The old reader refused this one too.)"""
    path = valid_file(tmp_path)
    set_attribute(path, "format_version", 2)
    refused(path, "unsupported format_version 2")


# ---------------------------------------------------------------------------------------------- 7. interventions


def op(start, end, **fields):
    return {"start": start, "end": end, "source": "operator", **fields}


@pytest.mark.parametrize("segments, codes, message", [
    ("[" * 100_000 + "]" * 100_000, None, "JSON nested 100000 deep"),  # the old reader raised RecursionError
    ([op(0, 1)] * 10_001, None, "10001 intervention segments, more than 10000"),
    ([op(True, 2)], [1, 1, 0, 0, 0], "start and end must be integers"),
    ([op(0, 1.5)], [1, 0, 0, 0, 0], "start and end must be integers"),
    ('[{"start": 0, "end": NaN, "source": "operator"}]', None, "bad interventions attribute: NaN"),
    ('[{"start": 0, "start": 1, "end": 2, "source": "operator"}]', None, "duplicate key"),
    ([{"start": 0, "end": 2, "source": "policy"}], [0, 0, 0, 0, 0], "source 'policy' is not one of"),
    ([op(0, 3), op(2, 4)], [1, 1, 1, 1, 0], r"\[0, 3\) and \[2, 4\) overlap"),
    ([op(0, 2, operator="o" * 151)], [1, 1, 0, 0, 0], "operator has more than 150"),
    ([op(0, 2, reason="r" * 501)], [1, 1, 0, 0, 0], "reason has more than 500"),
    ([op(0, 2, lease=0)], [1, 1, 0, 0, 0], "lease must be null or an integer >= 1"),
    ([op(0, 2, lease="7")], [1, 1, 0, 0, 0], "lease must be null or an integer >= 1"),
    ([op(0, 2, lease=True)], [1, 1, 0, 0, 0], "lease must be null or an integer >= 1"),
    ([op(0, 2, evil=1)], [1, 1, 0, 0, 0], "unknown fields \\['evil'\\]"),
    ({"start": 0}, None, "not a JSON list"),
    ([op(1, 3)], [0, 0, 0, 0, 0], "step 1 has code 0, the interventions say 1"),
    ([], [0, 0, 7, 0, 0], r"control_source\[2\] is 7"),
    ([], [0, 0, 1, 0, 0], "step 2 has code 1, the interventions say 0"),
    ([{"start": 1, "end": 3, "source": "sim_operator"}], [0, 1, 1, 0, 0], "step 1 has code 1, the .* say 2"),
])
def test_it_refuses_interventions_outside_the_schema(tmp_path, segments, codes, message):
    path = valid_file(tmp_path)
    set_interventions(path, segments, codes)
    refused(path, message)


def test_the_lease_of_a_takeover_is_optional_and_round_trips(tmp_path):
    path = valid_file(tmp_path)
    set_interventions(path, [op(0, 2, operator="alice"), op(3, 4, lease=12)], [1, 1, 0, 1, 0])
    with EpisodeReader(path) as reader:  # a segment without "lease" (files written before it) reads as None
        assert reader.meta["segments"] == [Segment(0, 2, "operator", "alice"), Segment(3, 4, "operator", lease=12)]


def test_the_writer_refuses_what_the_reader_would_refuse(tmp_path):
    data = episode_data(segments=[Segment(1, 3, "operator")])
    data.control_source[:] = 0  # says the policy drove
    with pytest.raises(EpisodeFileError, match="control_source disagrees"):
        write_episode(tmp_path / "e.h5", data)
    data = episode_data(robot="Robot 1")
    with pytest.raises(EpisodeFileError, match="not a lowercase identifier"):
        write_episode(tmp_path / "e.h5", data)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- robustness


def test_damaged_files_give_episode_file_errors_and_nothing_else(tmp_path):
    """Byte flips all over a valid file: libhdf5 and numpy errors all become EpisodeFileError."""
    good = valid_file(tmp_path).read_bytes()
    rng = np.random.default_rng(1)
    for i in range(60):
        raw = bytearray(good)
        for at in rng.integers(0, len(raw), size=3):
            raw[at] ^= int(rng.integers(1, 256))
        path = tmp_path / f"flip{i}.h5"
        path.write_bytes(bytes(raw))
        try:
            inspect_file(path)
        except EpisodeFileError:
            pass


# ---------------------------------------------------------------------------------------------- the child


def test_the_child_limits_its_own_resources(tmp_path, checker):
    checker.check(valid_file(tmp_path))
    limits = Path(f"/proc/{checker.pid}/limits").read_text()
    rows = {line[:26].strip(): line[26:].split() for line in limits.splitlines()[1:]}
    assert rows["Max address space"][:2] == [str(1024**3)] * 2
    assert rows["Max file size"][:2] == ["0", "0"]
    assert rows["Max open files"][:2] == ["16", "16"]
    assert rows["Max core file size"][:2] == ["0", "0"]


def test_a_child_that_dies_mid_check_fails_that_check_and_the_next_one_succeeds(tmp_path, checker):
    good = valid_file(tmp_path)
    checker.check(good)
    stuck = tmp_path / "stuck.h5"
    os.mkfifo(stuck)  # opening it blocks: the child is mid-check for as long as we like
    pid = checker.pid
    result = {}

    def run():
        try:
            checker.check(stuck, timeout_s=20)
        except EpisodeFileError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    os.kill(pid, signal.SIGSEGV)  # as libhdf5 would on a crafted file
    thread.join(10)
    assert result["error"] == "the payload checker crashed on this file (killed by SIGSEGV)"
    assert checker.check(good)["steps"] == 5 and checker.pid != pid


def overrun_a_global_heap_object(path: Path, content: bytes) -> None:
    """Make the size of the global heap object holding ``content`` (a variable-length string attribute) run past
    its collection. libhdf5 2.0.0 then spins forever reading ANY string attribute of the file (found by fuzzing)."""
    raw = bytearray(path.read_bytes())
    heap = raw.find(b"GCOL")
    at, end = heap + 16, heap + int.from_bytes(raw[heap + 8:heap + 16], "little")
    while at < end:
        index, size = int.from_bytes(raw[at:at + 2], "little"), int.from_bytes(raw[at + 8:at + 16], "little")
        if index == 0:
            raise AssertionError(f"no heap object holds {content!r}")
        if raw[at + 16:at + 16 + size] == content:
            raw[at + 8:at + 16] = (size + 210).to_bytes(8, "little")
            path.write_bytes(bytes(raw))
            return
        at += 16 + (size + 7) // 8 * 8


def test_a_check_that_times_out_kills_the_child(tmp_path, checker):
    good = valid_file(tmp_path)
    checker.check(good)
    pid = checker.pid
    hang = valid_file(tmp_path, "hang.h5")
    overrun_a_global_heap_object(hang, b"online")
    started = time.monotonic()
    with pytest.raises(EpisodeFileError, match=r"timed out on this file \(after 0.5 s\)"):
        checker.check(hang, timeout_s=0.5)
    assert time.monotonic() - started < 3
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    assert checker.check(good)["steps"] == 5


def test_a_child_that_refused_a_file_is_not_reused(tmp_path, checker):
    good = valid_file(tmp_path)
    checker.check(good)
    first = checker.pid
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(1000))
    with pytest.raises(EpisodeFileError, match="not an HDF5 file"):
        checker.check(tmp_path / "junk.h5")
    assert checker.pid is None
    checker.check(good)
    assert checker.pid not in (None, first)


def test_a_child_that_died_while_idle_is_replaced_without_failing_a_file(tmp_path, checker):
    good = valid_file(tmp_path)
    checker.check(good)
    pid = checker.pid
    os.kill(pid, signal.SIGKILL)
    while checker.pid == pid:  # reaped by poll()
        time.sleep(0.01)
    assert checker.check(good)["steps"] == 5
