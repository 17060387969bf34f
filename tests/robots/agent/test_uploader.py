"""The uploader against a real (tiny, in-process) HTTP server implementing the upload contract's status codes."""

import shutil
import time

import pytest

from robots.agent.backoff import Backoff
from robots.agent.uploader import Result, Uploader
from robots.agent.spool import Spool

from .fake_server import EpisodeStore, serve_http
from .test_recorder import record

TOKEN = "sop_uploader-test-token"


@pytest.fixture
def store():
    """The server side of the contract, served over HTTP on a free loopback port."""
    store = EpisodeStore(TOKEN)
    server = serve_http(store)
    store.url = "http://%s:%d" % server.server_address
    yield store
    server.shutdown()
    server.server_close()


@pytest.fixture
def entry(tmp_path):
    """A spool holding one complete episode of ~20 steps; returns (spool, episode_id)."""
    spool, (episode_id,), _ = record(tmp_path, max_steps=20, image_size=48)
    return spool, episode_id


def make_uploader(store, spool, chunk_bytes=8 * 1024, token=TOKEN):
    return Uploader(spool, store.url, token, chunk_bytes=chunk_bytes, timeout_s=5,
                    backoff=Backoff(0.01, 0.05))


def entry_files(spool, episode_id):
    return spool.payload(episode_id).exists(), spool.sidecar(episode_id).exists()


def test_it_uploads_in_chunks_and_deletes_the_entry_only_once_verified(store, entry):
    spool, episode_id = entry
    local = spool.payload(episode_id).read_bytes()
    sidecar = spool.read_sidecar(episode_id)
    uploader = make_uploader(store, spool)

    assert uploader.upload(episode_id) is Result.VERIFIED

    assert store.episodes[episode_id]["meta"] == sidecar  # the POST body is the sidecar
    assert entry_files(spool, episode_id) == (False, False)
    assert bytes(store.episodes[episode_id]["data"]) == local
    puts = [offset for method, _, offset in store.requests if method == "PUT"]
    assert len(puts) == -(-len(local) // (8 * 1024)) and puts == sorted(puts) and puts[0] == 0


@pytest.mark.parametrize("status", [500, 503, 401, 403, 404, 400])
def test_it_never_deletes_an_entry_after_an_error_reply(store, entry, status):
    spool, episode_id = entry
    store.inject("PUT", status)
    uploader = make_uploader(store, spool)

    assert uploader.upload(episode_id) is Result.RETRY
    assert entry_files(spool, episode_id) == (True, True)
    assert uploader.upload(episode_id) is Result.VERIFIED  # resumes from the bytes the server acknowledged


def test_it_never_deletes_an_entry_the_server_received_but_has_not_verified(store, entry):
    spool, episode_id = entry
    store.verify = False  # all bytes arrive, the server never says "verified"
    uploader = make_uploader(store, spool)

    for _ in range(3):
        assert uploader.upload(episode_id) is Result.RETRY
    assert entry_files(spool, episode_id) == (True, True)
    assert store.episodes[episode_id]["status"] == "uploading"


def test_it_keeps_the_entry_when_the_server_is_unreachable(entry):
    spool, episode_id = entry
    uploader = Uploader(spool, "http://127.0.0.1:9", TOKEN, timeout_s=1)  # discard port: connection refused

    assert uploader.upload(episode_id) is Result.RETRY
    assert entry_files(spool, episode_id) == (True, True)


def test_a_wrong_token_is_refused_and_the_entry_kept(store, entry):
    spool, episode_id = entry

    assert make_uploader(store, spool, token="sop_wrong").upload(episode_id) is Result.RETRY
    assert entry_files(spool, episode_id) == (True, True)
    assert store.requests[0][0] == "POST" and store.episodes == {}


def test_it_resumes_from_the_servers_offset_after_a_409(store, entry):
    spool, episode_id = entry
    local = spool.payload(episode_id).read_bytes()
    uploader = make_uploader(store, spool)
    store.inject("PUT", 503)  # the first chunk is not acknowledged ...
    assert uploader.upload(episode_id) is Result.RETRY
    # ... then the server actually has 8 KiB, but announces offset 0: the PUT at 0 gets a 409 with the real offset.
    store.episodes[episode_id]["data"] = bytearray(local[:8192])
    store.inject("POST", 200, {"id": episode_id, "status": "uploading", "offset": 0,
                               "upload_url": f"/api/robot/episodes/{episode_id}/payload"})
    store.requests.clear()

    assert uploader.upload(episode_id) is Result.VERIFIED

    puts = [offset for method, _, offset in store.requests if method == "PUT"]
    assert len(local) > 8192 and puts[:2] == [0, 8192]
    assert bytes(store.episodes[episode_id]["data"]) == local


def test_a_checksum_mismatch_rewrites_a_stale_sidecar_and_never_deletes(store, entry):
    spool, episode_id = entry
    metadata = spool.read_sidecar(episode_id)
    true_sha = metadata["sha256"]
    spool.write_sidecar(episode_id, {**metadata, "sha256": "0" * 64})  # e.g. written before a late fix-up
    uploader = make_uploader(store, spool)

    assert uploader.upload(episode_id) is Result.RETRY  # the server's 422
    assert entry_files(spool, episode_id) == (True, True)
    assert spool.read_sidecar(episode_id)["sha256"] == true_sha

    assert uploader.upload(episode_id) is Result.VERIFIED


def test_a_checksum_mismatch_with_a_correct_sidecar_retries_from_scratch(store, entry):
    spool, episode_id = entry
    store.inject("PUT", 422, {"code": "checksum_mismatch", "detail": "bytes corrupted in transit", "offset": 0})
    uploader = make_uploader(store, spool)

    assert uploader.upload(episode_id) is Result.RETRY
    assert entry_files(spool, episode_id) == (True, True)
    assert uploader.upload(episode_id) is Result.VERIFIED


def test_an_episode_too_large_for_the_server_moves_to_rejected_with_its_data(store, entry):
    spool, episode_id = entry
    store.max_size = 1000
    payload = spool.payload(episode_id).read_bytes()

    assert make_uploader(store, spool).upload(episode_id) is Result.REJECTED

    assert entry_files(spool, episode_id) == (False, False)
    assert (spool.rejected / f"{episode_id}.h5").read_bytes() == payload
    assert (spool.rejected / f"{episode_id}.json").exists()
    assert spool.complete_entries() == []


@pytest.mark.parametrize("method, status, code", [("POST", 409, "conflict"), ("PUT", 422, "invalid_payload")])
def test_refusals_that_a_retry_cannot_fix_move_the_entry_to_rejected(store, entry, method, status, code):
    spool, episode_id = entry
    store.inject(method, status, {"code": code, "detail": "refused"})

    assert make_uploader(store, spool).upload(episode_id) is Result.REJECTED
    assert entry_files(spool, episode_id) == (False, False)
    assert sorted(p.name for p in spool.rejected.iterdir()) == [f"{episode_id}.h5", f"{episode_id}.json"]


def test_a_413_on_a_chunk_halves_the_chunk_size_instead_of_rejecting(store, entry):
    spool, episode_id = entry
    store.inject("PUT", 413, {"code": "too_large", "detail": "chunk exceeds the per-request limit"})
    size = spool.payload(episode_id).stat().st_size
    uploader = make_uploader(store, spool, chunk_bytes=1024 * 1024)

    assert uploader.upload(episode_id) is Result.VERIFIED
    assert size > 128 * 1024 and uploader.chunk_bytes == size // 2
    assert [offset for method, _, offset in store.requests if method == "PUT"][:3] == [0, 0, size // 2]


def test_an_episode_the_server_already_has_is_deleted_without_sending_it_again(store, entry, tmp_path):
    spool, episode_id = entry
    backup = tmp_path / "backup"
    backup.mkdir()
    for path in (spool.payload(episode_id), spool.sidecar(episode_id)):
        shutil.copy(path, backup / path.name)
    uploader = make_uploader(store, spool)
    assert uploader.upload(episode_id) is Result.VERIFIED
    for path in backup.iterdir():  # e.g. the agent crashed after the verified reply, before deleting
        shutil.copy(path, spool.root / path.name)
    store.requests.clear()

    assert uploader.upload(episode_id) is Result.VERIFIED

    assert [method for method, _, _ in store.requests] == ["POST"]
    assert entry_files(spool, episode_id) == (False, False)


def test_the_background_thread_uploads_what_the_spool_holds_retrying_with_backoff(store, tmp_path):
    spool, ids = Spool(tmp_path / "spool"), []
    for i in range(2):
        s, (episode_id,), _ = record(tmp_path / str(i), max_steps=5)
        for path in (s.payload(episode_id), s.sidecar(episode_id)):
            shutil.move(path, spool.root / path.name)
        ids.append(episode_id)
    store.inject("POST", 503)
    store.inject("POST", 502)
    verified = []
    uploader = Uploader(spool, store.url, TOKEN, backoff=Backoff(0.01, 0.05), on_verified=verified.append)
    uploader.start()  # finds what the spool already holds
    try:
        deadline = time.monotonic() + 10
        while uploader.pending and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        uploader.stop(timeout=5)

    assert sorted(verified) == sorted(ids) and uploader.pending == 0
    assert list(spool.root.glob("*.h5")) == []
