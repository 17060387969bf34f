"""Checkpoint updates: background download from a real HTTP server, verification, and the swap between episodes."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest

from robots import episode_file
from robots.agent.backoff import Backoff
from robots.agent.learned import PolicyAgent
from robots.agent.policy_updates import CURRENT, CURRENT_META, LearnedPolicy, PolicyUpdates
from robots.agent.recorder import EpisodeRecorder, SpoolWriter
from robots.agent.runtime import Runtime, Subscriber
from robots.agent.spool import Spool
from robots.protocol import PolicyUpdated, RobotState

from .conftest import Collector, FakeEmbedder, FakeEnvironment, assignment
from .fake_server import CheckpointFiles, serve_files

TOKEN = "sop_checkpoint-test"


@pytest.fixture
def files():
    """The server's checkpoint downloads: a real HTTP server on loopback."""
    store = CheckpointFiles(TOKEN)
    server = serve_files(store)
    store.url = "http://127.0.0.1:%d" % server.server_address[1]
    yield store
    server.shutdown()


@pytest.fixture
def updates(files, tmp_path):
    """A started downloader against ``files``, with quick retries."""
    made = []

    def make(**kwargs) -> PolicyUpdates:
        options = dict(attempts=3, backoff=Backoff(0.01, 0.05), embedder=FakeEmbedder(), timeout_s=5.0)
        options.update(kwargs)
        made.append(PolicyUpdates(tmp_path / "spool" / "policies", files.url, TOKEN, **options).start())
        return made[-1]

    yield make
    for u in made:
        u.stop(5)


def publish(files: CheckpointFiles, saved, *, data: bytes | None = None, sha256: str | None = None,
            size: int | None = None) -> PolicyUpdated:
    """Serve a saved checkpoint (or other bytes in its place) and return the announcement the server would send."""
    version = saved.meta["version"]
    url = f"/api/checkpoints/{version}/file"
    files.put(url, saved.path.read_bytes() if data is None else data)
    return PolicyUpdated(version=version, url=url, size=size or saved.size, sha256=sha256 or saved.sha256)


def wait_until(condition, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def running(provider: LearnedPolicy, updates: PolicyUpdates, version: int) -> None:
    """Deliver at an episode boundary, as the runtime does, and check who runs next."""
    agent = provider.next_agent()
    assert agent is not None and agent.policy_version == version and agent.name == f"v{version}"


def test_a_published_checkpoint_is_downloaded_with_the_robot_token_verified_and_kept(files, updates, make_checkpoint):
    u = updates()
    provider = LearnedPolicy(u)
    assert provider.next_agent() is None  # --fallback idle: nothing to run yet

    u.offer(publish(files, make_checkpoint(1)))
    wait_until(lambda: u.staged_version == 1, what="v1 staged")
    running(provider, u, 1)

    assert files.requests == [("/api/checkpoints/1/file", f"Bearer {TOKEN}")]
    assert u.error is None and u.loaded_versions == [1]
    kept = sorted(p.name for p in u.directory.iterdir())
    assert kept == [CURRENT_META, CURRENT]  # the download became current; no temp files left

    # A restarted agent starts with it before the server says anything.
    again = PolicyUpdates(u.directory, files.url, TOKEN, embedder=FakeEmbedder())
    restarted = LearnedPolicy(again)
    assert restarted.restore() == 1 and restarted.current.policy_version == 1
    again.stop()


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "wrong checksum", "not a checkpoint"])
def test_a_bad_download_is_rejected_removed_and_the_old_policy_kept(files, updates, make_checkpoint, damage):
    u = updates()
    provider = LearnedPolicy(u)
    u.offer(publish(files, make_checkpoint(1)))
    wait_until(lambda: u.staged_version == 1, what="v1 staged")
    running(provider, u, 1)

    good = make_checkpoint(2)
    raw = good.path.read_bytes()
    if damage == "corrupt":  # a flipped byte in the weights: the announced sha256 no longer matches
        message = publish(files, good, data=raw[:-100] + bytes([raw[-100] ^ 0xFF]) + raw[-99:])
    elif damage == "truncated":  # the connection ended early
        message = publish(files, good, data=raw[: len(raw) // 2])
    elif damage == "wrong checksum":  # the server announced another sha256
        message = publish(files, good, sha256="0" * 64)
    else:  # size and sha256 match the announcement, but the bytes are no safetensors checkpoint
        junk = b"\x00" * 4096
        message = publish(files, good, data=junk, sha256=hashlib.sha256(junk).hexdigest(), size=len(junk))
    u.offer(message)
    wait_until(lambda: u.error is not None, what="the download to be given up")

    assert u.error.startswith("v2: ")
    assert files.paths_requested().count("/api/checkpoints/2/file") == 3  # retried, then given up
    assert u.loaded_versions == [1] and u.staged_version is None
    running(provider, u, 1)  # the next episode still runs v1
    assert sorted(p.name for p in u.directory.iterdir()) == [CURRENT_META, CURRENT]  # the bad file is gone

    # The same announcement again (say, after a reconnect) is another chance, and a good file clears the error.
    files.put(message.url, raw)
    u.offer(PolicyUpdated(version=2, url=message.url, size=good.size, sha256=good.sha256))
    wait_until(lambda: u.staged_version == 2, what="v2 staged")
    assert u.error is None
    running(provider, u, 2)


def test_a_failed_download_is_retried_with_backoff(files, updates, make_checkpoint):
    u = updates()
    files.fail(2)
    u.offer(publish(files, make_checkpoint(1)))
    wait_until(lambda: u.staged_version == 1, what="v1 staged")
    assert files.paths_requested() == ["/api/checkpoints/1/file"] * 3 and u.error is None


def test_the_token_is_only_sent_to_the_server_it_belongs_to(files, updates, make_checkpoint):
    u = updates(attempts=1)
    saved = make_checkpoint(1)
    u.offer(PolicyUpdated(version=1, url="http://elsewhere.example/f", size=saved.size, sha256=saved.sha256))
    wait_until(lambda: u.error is not None, what="the url to be refused")
    assert "not a path on the server" in u.error and files.requests == []


def test_a_new_version_swaps_only_at_the_next_episode_boundary(files, updates, make_checkpoint, tmp_path):
    u = updates()
    v1, v2 = make_checkpoint(1), make_checkpoint(2)
    u.offer(publish(files, v1))
    wait_until(lambda: u.staged_version == 1, what="v1 staged")
    update = publish(files, v2)

    class DeliverMidEpisode(Subscriber):
        """At step 3 of the first episode the server publishes v2; the step waits until v2 is verified and staged,
        so the rest of this episode runs while a newer policy is ready."""

        def __init__(self):
            self.episodes = 0

        def on_episode_start(self, episode):
            self.episodes += 1

        def on_step(self, episode, step):
            if self.episodes == 1 and step.index == 3:
                u.offer(update)
                wait_until(lambda: u.staged_version == 2, what="v2 staged")

    collector = Collector()
    writer = SpoolWriter(Spool(tmp_path / "spool")).start()
    env = FakeEnvironment()
    runtime = Runtime(lambda env_id: env, LearnedPolicy(u), [collector, DeliverMidEpisode(), EpisodeRecorder(writer)],
                      control_hz=500.0)
    runtime.run_episode(assignment(max_steps=10))
    runtime.run_episode(assignment(max_steps=10))
    writer.close()

    (first, _), (second, _) = collector.ended
    assert (first.policy_version, first.policy, second.policy_version, second.policy) == (1, "v1", 2, "v2")
    # Every action of an episode came from that episode's weights, also those after v2 was staged mid-episode.
    reference = {1: PolicyAgent(u.loader(v1.path, expected_sha256=v1.sha256, expected_size=v1.size,
                                         embedder=FakeEmbedder()).policy, 1),
                 2: PolicyAgent(u.loader(v2.path, expected_sha256=v2.sha256, expected_size=v2.size,
                                         embedder=FakeEmbedder()).policy, 2)}
    for version, steps in ((1, collector.steps[:10]), (2, collector.steps[10:])):
        reference[version].reset("fake-v0", "do fake-task")
        for step in steps:
            np.testing.assert_allclose(step.decision.action, reference[version].act(step.observation).action,
                                       atol=1e-6)
        assert not np.allclose(steps[5].decision.action, reference[3 - version].policy.act(
            steps[5].observation, "do fake-task")[0])  # the two versions really act differently
    # The recorded files say which version ran them.
    recorded = {}
    for path in (tmp_path / "spool").glob("*.h5"):
        with episode_file.EpisodeReader(path) as reader:
            recorded[reader.meta["episode_id"]] = (reader.meta["policy_version"], reader.meta["policy"])
    assert recorded == {first.id: (1, "v1"), second.id: (2, "v2")}


def test_only_the_newest_of_several_updates_during_an_episode_is_loaded(files, updates, make_checkpoint):
    u = updates()
    provider = LearnedPolicy(u)
    files.delay_s = 0.3  # a slow link: each download is still in flight when the next announcement arrives
    messages = [publish(files, make_checkpoint(v)) for v in (2, 3, 4)]
    for message in messages:
        u.offer(message)
        time.sleep(0.05)
    wait_until(lambda: u.staged_version == 4, what="v4 staged")

    assert u.loaded_versions == [4]  # v2 and v3 were abandoned, never parsed
    running(provider, u, 4)
    assert provider.next_agent().policy_version == 4  # and it stays


def test_a_rollback_to_an_older_version_is_honoured(files, updates, make_checkpoint):
    u = updates()
    provider = LearnedPolicy(u)
    v1, v2, v3 = (publish(files, make_checkpoint(v)) for v in (1, 2, 3))
    u.offer(v2)
    wait_until(lambda: u.staged_version == 2, what="v2 staged")
    running(provider, u, 2)

    # The server rolls back to v1 after v2: its latest message wins, not the highest number.
    u.offer(v1)
    wait_until(lambda: u.staged_version == 1, what="v1 staged")
    running(provider, u, 1)

    # v3 is published, then withdrawn (back to the running v1) before an episode boundary: v3 never runs.
    u.offer(v3)
    wait_until(lambda: u.staged_version == 3, what="v3 staged")
    u.offer(v1)
    assert u.staged_version is None
    running(provider, u, 1)
    wait_until(lambda: not any(p.name.startswith("v3-") for p in u.directory.iterdir()), what="v3 removed")


def test_the_expert_fallback_runs_until_the_first_checkpoint_and_idle_waits(files, updates, make_checkpoint):
    from robots.agent.agents import RandomAgent

    fallback = RandomAgent(seed=0)
    assert LearnedPolicy(updates(), fallback=fallback).next_agent() is fallback

    u = updates()
    env = FakeEnvironment()
    runtime = Runtime(lambda env_id: env, LearnedPolicy(u), control_hz=500.0, idle_poll_s=0.01, max_episodes=1)
    runtime.assign(assignment(max_steps=5))
    control = threading.Thread(target=runtime.run)
    control.start()
    try:
        time.sleep(0.2)
        assert env.resets == 0 and runtime.snapshot().state == RobotState.IDLE  # a task, but no policy: idle
        u.offer(publish(files, make_checkpoint(1)))
        control.join(10)
        assert not control.is_alive() and env.resets == 1
        assert runtime.snapshot().policy_version == 1
    finally:
        runtime.stop()
        control.join(5)


def test_a_damaged_kept_checkpoint_is_not_restored(files, updates, make_checkpoint):
    u = updates()
    u.offer(publish(files, make_checkpoint(1)))
    wait_until(lambda: u.staged_version == 1, what="v1 staged")
    LearnedPolicy(u).next_agent()
    current = u.directory / CURRENT
    current.write_bytes(current.read_bytes()[:-10])

    again = PolicyUpdates(u.directory, files.url, TOKEN, embedder=FakeEmbedder())
    assert LearnedPolicy(again).restore() is None
    assert not current.exists() and not (u.directory / CURRENT_META).exists()
    again.stop()


def test_a_policy_that_reads_a_camera_this_robot_lacks_is_refused_and_the_old_one_kept(files, updates,
                                                                                       make_checkpoint):
    u = updates(cameras=("corner3",))
    provider = LearnedPolicy(u)
    u.offer(publish(files, make_checkpoint(1, cameras=("corner3",))))
    wait_until(lambda: u.staged_version == 1, what="v1 staged")
    running(provider, u, 1)

    u.offer(publish(files, make_checkpoint(2, cameras=("corner3", "gripperPOV"))))
    wait_until(lambda: u.error is not None, what="v2 refused")
    assert "reads cameras ['corner3', 'gripperPOV']; this robot does not record ['gripperPOV']" in u.error
    assert "--extra-cameras gripperPOV" in u.error
    running(provider, u, 1)  # the robot keeps what it runs

    wider = updates(cameras=("corner3", "gripperPOV"))  # a robot that records the wrist view takes it
    wider.offer(publish(files, make_checkpoint(3, cameras=("corner3", "gripperPOV"))))
    wait_until(lambda: wider.staged_version == 3, what="v3 staged")
