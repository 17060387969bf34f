"""Recording episodes into the spool: payload + sidecar, readable by the shared episode file reader."""

import json

import numpy as np

from robots import episode_file
from robots.agent.agents import Agent, Decision, RandomAgent
from robots.agent import recorder
from robots.agent.recorder import EpisodeRecorder, SpoolWriter
from robots.agent.runtime import Runtime
from robots.agent.spool import Spool, sha256_of
from robots.protocol import CONTROL_SOURCE_CODES, ControlSource, Outcome

from .conftest import FakeEnvironment, assignment


def record(tmp_path, agent=None, max_steps=12, solve_at=None, collector=None, **env_kwargs):
    spool = Spool(tmp_path / "spool")
    spooled = []
    writer = SpoolWriter(spool, on_spooled=spooled.append).start()
    env = FakeEnvironment(solve_at=solve_at, **env_kwargs)
    subscribers = [EpisodeRecorder(writer)] + ([collector] if collector else [])
    runtime = Runtime(lambda env_id: env, agent or RandomAgent(seed=1), subscribers, control_hz=1000.0,
                      camera="fake-cam", robot_name=lambda: "robot-7")
    result = runtime.run_episode(assignment(max_steps=max_steps, split="offline"))
    writer.close(timeout=10)
    return spool, spooled, result


def test_recorder_spools_an_episode_that_the_episode_reader_round_trips(tmp_path, collector):
    spool, spooled, result = record(tmp_path, max_steps=12, solve_at=9, image_size=24, collector=collector)

    (episode_id,) = spooled
    with episode_file.EpisodeReader(spool.payload(episode_id)) as reader:
        data = reader.load()
        meta = reader.meta
    assert reader.steps == result.steps == 9
    assert data.images.shape == (9, 24, 24, 3) and data.images.dtype == np.uint8
    assert data.states.shape == (9, 39) and data.states.dtype == np.float32
    assert data.actions.shape == (9, 4) and data.actions.dtype == np.float32
    assert data.control_source.dtype == np.uint8
    assert set(data.control_source) == {CONTROL_SOURCE_CODES[ControlSource.POLICY]}
    np.testing.assert_array_equal(data.actions, np.stack([s.decision.action for s in collector.steps]))
    np.testing.assert_array_equal(data.images[:, 0, 0, 0], np.arange(9))  # the observation each action came from
    np.testing.assert_array_equal(data.timestamps, [s.timestamp for s in collector.steps])
    np.testing.assert_array_equal(data.rewards, np.arange(1, 10, dtype=np.float32))
    assert data.successes[-1] and not data.successes[:-1].any()
    assert meta["episode_id"] == episode_id and meta["robot"] == "robot-7" and meta["camera"] == "fake-cam"
    assert meta["policy"] == "random" and meta["policy_version"] == -1
    assert (meta["split"], meta["outcome"], meta["success"]) == ("offline", "success", True)
    assert meta["control_hz"] == 1000.0 and meta["ended_at"] >= meta["started_at"]


def test_the_sidecar_carries_the_upload_metadata_and_the_payloads_size_and_sha256(tmp_path):
    spool, (episode_id,), result = record(tmp_path, max_steps=6)

    sidecar = json.loads(spool.sidecar(episode_id).read_text())
    payload = spool.payload(episode_id)
    assert sidecar["size"] == payload.stat().st_size
    assert sidecar["sha256"] == sha256_of(payload)
    assert sidecar["id"] == episode_id and sidecar["steps"] == 6 and sidecar["outcome"] == "timeout"
    assert sidecar["policy_version"] is None  # -1 in the file means "not a checkpoint"
    assert set(sidecar) == {"id", "task", "prompt", "policy", "policy_version", "split", "started_at", "ended_at",
                            "steps", "outcome", "success", "control_hz", "camera", "size", "sha256", "interventions"}
    assert spool.complete_entries() == [episode_id]
    assert not list(spool.root.glob("*.tmp"))


class TakeoverAgent(Agent):
    """Random actions, with a simulated operator driving steps 3, 4 and 5."""

    name = "random"

    def __init__(self):
        self.inner = RandomAgent(seed=2)
        self.t = 0

    def reset(self, env_id, prompt):
        self.t = 0

    def act(self, observation):
        decision = self.inner.act(observation)
        self.t += 1
        if 4 <= self.t <= 6:
            return Decision(decision.action, ControlSource.SIM_OPERATOR, reason="stalled")
        return decision


def test_runs_of_non_policy_control_become_intervention_segments(tmp_path):
    spool, (episode_id,), _ = record(tmp_path, agent=TakeoverAgent(), max_steps=10)

    with episode_file.EpisodeReader(spool.payload(episode_id)) as reader:
        segments = reader.meta["segments"]
        sources = reader.column("control_source")
    assert [(s.start, s.end, s.source, s.reason) for s in segments] == [(3, 6, "sim_operator", "stalled")]
    assert list(sources) == [0, 0, 0, 2, 2, 2, 0, 0, 0, 0]
    assert json.loads(spool.sidecar(episode_id).read_text())["interventions"] == [
        {"start": 3, "end": 6, "source": "sim_operator", "operator": "", "reason": "stalled", "lease": None}
    ]


def test_an_episode_longer_than_the_preallocation_grows_its_buffers(tmp_path, monkeypatch, collector):
    monkeypatch.setattr(recorder, "INITIAL_ROWS", 4)
    spool, (episode_id,), _ = record(tmp_path, max_steps=11, collector=collector)

    with episode_file.EpisodeReader(spool.payload(episode_id)) as reader:
        data = reader.load()
    assert data.steps == 11
    np.testing.assert_array_equal(data.images[:, 0, 0, 0], np.arange(11))
    np.testing.assert_array_equal(data.actions, np.stack([s.decision.action for s in collector.steps]))


def test_an_episode_aborted_before_its_first_step_writes_nothing(tmp_path):
    spool = Spool(tmp_path / "spool")
    writer = SpoolWriter(spool).start()
    runtime = Runtime(lambda env_id: FakeEnvironment(), RandomAgent(), [EpisodeRecorder(writer)], control_hz=10.0)
    runtime.stop()

    result = runtime.run_episode(assignment())
    writer.close(timeout=5)

    assert result.outcome == Outcome.ABORTED and result.steps == 0
    assert list(spool.root.iterdir()) == [] and runtime.ended_ids == []


def test_recover_seals_payloads_whose_sidecar_was_never_written_and_drops_half_written_files(tmp_path):
    spool, (episode_id,), _ = record(tmp_path, max_steps=4)
    expected = json.loads(spool.sidecar(episode_id).read_text())
    spool.sidecar(episode_id).unlink()  # crashed between the payload and the sidecar
    (spool.root / "0123.h5.tmp").write_bytes(b"half an episode")
    (spool.root / "gone.json").write_text("{}")  # sidecar whose payload was already uploaded and deleted

    assert spool.recover() == [episode_id]

    assert json.loads(spool.sidecar(episode_id).read_text()) == expected
    assert sorted(p.name for p in spool.root.iterdir()) == sorted([f"{episode_id}.h5", f"{episode_id}.json"])


def test_recover_moves_an_unreadable_payload_to_rejected_instead_of_deleting_it(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.payload("bad").write_bytes(b"not hdf5")

    assert spool.recover() == []
    assert (spool.rejected / "bad.h5").read_bytes() == b"not hdf5"


def test_more_cameras_are_recorded_beside_the_primary(tmp_path, monkeypatch, collector):
    monkeypatch.setattr(recorder, "INITIAL_ROWS", 4)  # and they grow with the other columns
    spool, (episode_id,), _ = record(tmp_path, max_steps=9, collector=collector,
                                     extra_cameras={"gripperPOV": 12, "topview": 20})
    with episode_file.EpisodeReader(spool.payload(episode_id)) as reader:
        data = reader.load()
        assert reader.meta["cameras"] == {"gripperPOV": (12, 12, 3), "topview": (20, 20, 3)}
    assert set(data.cameras) == {"gripperPOV", "topview"}  # the primary is observation/image, not repeated
    np.testing.assert_array_equal(data.images[:, 0, 0, 0], np.arange(9))
    for name in data.cameras:
        np.testing.assert_array_equal(data.cameras[name][:, 0, 0, 0], np.arange(100, 109))
        np.testing.assert_array_equal(data.cameras[name], np.stack([s.observation["cameras"][name]
                                                                     for s in collector.steps]))
