"""Object storage (SOP_STORAGE=s3) against a real S3-protocol server process: episodes, checkpoints, trainer states.

The local backend is what every other test runs on; here the same code paths run with a bucket behind them.
"""

from __future__ import annotations

import asyncio
import hashlib

import boto3
import httpx
import pytest
from django.test import Client

from learner import services
from learner.buffer import FrameIndex
from learner.models import Checkpoint
from learner.trainer import Trainer
from robots import fleet, ingest
from robots.models import Episode, Task
from sop_web import storage
from sop_web.asgi import application
from tests.learner.conftest import FakeEmbedder, trainer  # noqa: F401  (trainer: a fixture)
from tests.robots.factories import announcement, bearer, episode_bytes, episode_data

pytestmark = pytest.mark.django_db(transaction=True)

EPISODES = "/api/robot/episodes/"


@pytest.fixture
def areas(settings, tmp_path):
    """This 'host's' local areas (the cache under object storage)."""
    settings.PAYLOAD_DIR = tmp_path / "host-a" / "payloads"
    settings.CHECKPOINT_DIR = tmp_path / "host-a" / "checkpoints"
    return tmp_path


def bucket_object(env: dict, key: str) -> bytes:
    client = boto3.client("s3", endpoint_url=env["SOP_S3_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    return client.get_object(Bucket=env["SOP_S3_BUCKET"], Key=key)["Body"].read()


def put_object(env: dict, key: str, body: bytes) -> None:
    client = boto3.client("s3", endpoint_url=env["SOP_S3_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    client.put_object(Bucket=env["SOP_S3_BUCKET"], Key=key, Body=body)


async def send(token: str, body: dict, offset, chunk: bytes):
    """Announce the episode (the robot's POST), then PUT ``chunk`` at ``offset`` unless it is None: both replies."""
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        opened = await http.post(EPISODES, json=body, headers=bearer(token))
        if offset is None:
            return opened, None
        headers = {**bearer(token), "Upload-Offset": str(offset), "Content-Type": "application/octet-stream"}
        return opened, await http.put(f"{EPISODES}{body['id']}/payload", content=chunk, headers=headers)


def test_keys_never_leave_the_store():
    for bad in ("", "/etc/passwd", "payloads/../secret_key", "payloads/./x", "payloads//x", "payloads",
                "elsewhere/x.h5", "payloads\\..\\x", "payloads/x\0"):
        with pytest.raises(ValueError):
            storage.local_path(bad)


def test_a_corrupt_or_torn_object_is_never_read(s3_storage, areas):
    source = areas / "blob"
    source.write_bytes(b"weights" * 1000)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    storage.upload("checkpoints/blob", source)
    # Another host (empty cache) reads it: fetched once, checked.
    assert storage.ensure_local("checkpoints/blob", sha256=sha, size=7000).read_bytes() == b"weights" * 1000
    storage.local_path("checkpoints/blob").unlink()
    put_object(s3_storage, "checkpoints/blob", b"weightz" * 1000)  # rot in the bucket: same size, other bytes
    with pytest.raises(storage.StorageError, match="sha256"):
        storage.ensure_local("checkpoints/blob", sha256=sha, size=7000)
    put_object(s3_storage, "checkpoints/blob", b"weights" * 999)  # torn
    with pytest.raises(storage.StorageError, match="bytes"):
        storage.ensure_local("checkpoints/blob", sha256=sha, size=7000)
    assert not storage.local_path("checkpoints/blob").exists()
    assert [p.name for p in storage.local_path("checkpoints/blob").parent.iterdir()] == [], "no temp file left"
    with pytest.raises(storage.StorageError, match="not in the bucket"):
        storage.ensure_local("checkpoints/never-stored", sha256=sha, size=7000)


@pytest.fixture
def upload(areas):
    """A robot, its task and one episode to upload: (token, announcement body, payload bytes)."""
    _, token = fleet.register_robot("sim-01")
    Task.objects.create(name="drawer-open", env_id="drawer-open-v3", prompts=["open the drawer"], max_steps=150)
    data = episode_data()
    payload = episode_bytes(areas, data)
    return token, announcement(data, payload), payload


def test_an_episode_is_verified_into_the_bucket_and_read_back_through_a_cache(s3_storage, areas, upload, settings):
    token, body, payload = upload

    opened, done = asyncio.run(send(token, body, 0, payload))
    assert opened.status_code == 201 and done.status_code == 200 and done.json()["status"] == "verified"
    episode = Episode.objects.get(pk=body["id"])
    key = storage.episode_key(episode.payload_path)
    assert bucket_object(s3_storage, key) == payload, "the verified bytes are in the bucket"

    # A worker host with an empty cache indexes it: one download, checked against the row's sha256.
    settings.PAYLOAD_DIR = areas / "host-b" / "payloads"
    assert not storage.local_path(key).exists()
    path = ingest.payload_file(episode)
    assert path.read_bytes() == payload and path.is_relative_to(areas / "host-b")
    index = FrameIndex(horizon=2)
    index.add_episode(path)
    assert len(index) == episode.steps


def test_an_unreachable_bucket_loses_no_upload(s3_storage, upload, settings):
    token, body, payload = upload
    live = settings.SOP_S3_ENDPOINT_URL

    settings.SOP_S3_ENDPOINT_URL = "http://127.0.0.1:9"  # nothing listens: the bucket is down
    _, failed = asyncio.run(send(token, body, 0, payload))
    assert failed.status_code == 503 and failed.json()["code"] == "storage_unavailable"
    assert Episode.objects.get(pk=body["id"]).status == Episode.Status.UPLOADING
    settings.SOP_S3_ENDPOINT_URL = live  # back: the robot's next announcement finishes the upload
    resumed, _ = asyncio.run(send(token, body, None, b""))
    assert resumed.json()["status"] == "verified", resumed.text
    episode = Episode.objects.get(pk=body["id"])
    assert bucket_object(s3_storage, storage.episode_key(episode.payload_path)) == payload


def test_checkpoints_go_to_the_bucket_and_robots_download_them_from_it_without_their_token(
        s3_storage, areas, trainer, settings):
    published = services.publish_checkpoint(None, trainer)
    weights = bucket_object(s3_storage, storage.checkpoint_key(published.path))
    assert hashlib.sha256(weights).hexdigest() == published.sha256 and len(weights) == published.size
    assert bucket_object(s3_storage, storage.checkpoint_key(published.path).replace(".safetensors", ".json"))

    robot, token = fleet.register_robot("arm-1")
    answer = Client(HTTP_AUTHORIZATION=f"Bearer {token}").get(f"/api/robot/checkpoints/{published.version}")
    assert answer.status_code == 302
    signed = answer["Location"]
    assert signed.startswith(settings.SOP_S3_ENDPOINT_URL) and "X-Amz-Signature=" in signed
    fetched = httpx.get(signed)  # no Authorization header: the signature is the credential
    assert fetched.status_code == 200 and hashlib.sha256(fetched.content).hexdigest() == published.sha256
    assert Client().get(f"/api/robot/checkpoints/{published.version}").status_code == 401, "still robots only"

    # Evaluation on another host: the weights come from the bucket, verified.
    settings.CHECKPOINT_DIR = areas / "host-b" / "checkpoints"
    assert services.checkpoint_local(published).read_bytes() == weights


def test_a_robot_follows_the_redirect_and_keeps_its_token_at_home(s3_storage, areas, trainer, tmp_path):
    """PolicyUpdates against the real app through a transport that records every request's host and headers."""
    from robots.agent.policy_updates import PolicyUpdates

    published = services.publish_checkpoint(None, trainer)
    robot, token = fleet.register_robot("arm-1")
    seen: list[tuple[str, bool]] = []
    django_client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, "authorization" in request.headers))
        if request.url.host == "server.test":
            answer = django_client.get(request.url.path)
            return httpx.Response(answer.status_code, headers=dict(answer.items()),
                                  content=b"".join(answer.streaming_content) if answer.streaming else answer.content)
        return httpx.get(str(request.url))  # the S3 server, for real

    updates = PolicyUpdates(tmp_path / "spool", "http://server.test", token, embedder=FakeEmbedder(),
                            transport=httpx.MockTransport(handler))
    message = services.policy_message(published)
    updates.offer(message)  # announced (the download thread is not started: the fetch runs here)
    loaded = updates._fetch(1, message)
    assert loaded.version == published.version and loaded.sha256 == published.sha256
    assert seen[0] == ("server.test", True)
    assert seen[1] == ("127.0.0.1", False), "the token never goes to the storage host"


def test_a_run_resumes_on_another_host_from_the_trainer_state_in_the_bucket(s3_storage, areas, trainer, settings):
    first_host = settings.CHECKPOINT_DIR / "runs" / "run-1" / "trainer.safetensors"
    first_host.parent.mkdir(parents=True)
    services.save_trainer_state(trainer, first_host)
    key = storage.key_of(first_host)
    assert storage.pull_mutable(key) == first_host, "the writer's own copy is current: nothing is fetched"

    settings.CHECKPOINT_DIR = areas / "host-b" / "checkpoints"
    second_host = storage.pull_mutable(key)
    assert second_host is not None and second_host.read_bytes() == first_host.read_bytes()
    resumed = Trainer.resume(second_host, trainer.index, embedder=FakeEmbedder())
    assert resumed.step == trainer.step

    trainer.train_step()  # host A goes on and writes a newer state; host B must not resume from its stale copy
    settings.CHECKPOINT_DIR = areas / "host-a" / "checkpoints"
    services.save_trainer_state(trainer, first_host)
    settings.CHECKPOINT_DIR = areas / "host-b" / "checkpoints"
    assert storage.pull_mutable(key).read_bytes() == first_host.read_bytes()
    assert Trainer.resume(second_host, trainer.index, embedder=FakeEmbedder()).step == trainer.step


def test_orphaned_checkpoints_are_swept_from_the_bucket(s3_storage, areas, trainer):
    kept = services.publish_checkpoint(None, trainer)
    orphan = areas / "orphan.safetensors"
    orphan.write_bytes(b"a worker died before its row committed")
    storage.upload("checkpoints/policy-v9-deadbeef.safetensors", orphan)
    assert services.cleanup_orphan_checkpoints(min_age_s=-1) == 1
    names = [key for key, _ in storage.list_keys("checkpoints")]
    assert storage.checkpoint_key(kept.path) in names
    assert "checkpoints/policy-v9-deadbeef.safetensors" not in names
    assert Checkpoint.objects.count() == 1


def test_readiness_checks_the_bucket(s3_storage, areas, settings):
    assert Client().get("/readyz").json()["checks"]["storage"]["ok"] is True
    settings.SOP_S3_BUCKET = "sop-test-no-such-bucket"
    answer = Client().get("/readyz")
    assert answer.status_code == 503 and answer.json()["checks"]["storage"]["ok"] is False
