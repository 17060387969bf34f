"""collect_demos records expert episodes with the agent's runtime and ingests them through the upload services."""

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from robots.episode_file import EpisodeReader
from robots.models import Episode, Task

pytestmark = pytest.mark.django_db


def test_it_stores_verified_offline_demonstrations(payload_dir):
    Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=120)
    call_command("collect_demos", "--tasks", "reach", "--episodes", "2", "--workers", "1", "--image-size", "32")

    episodes = Episode.objects.filter(task__name="reach")
    assert episodes.count() == 2
    for ep in episodes:
        assert ep.split == "offline" and ep.status == Episode.Status.VERIFIED and ep.success
        assert ep.robot.name == "demo-collector" and ep.policy_name == "scripted-expert"
        with EpisodeReader(settings.PAYLOAD_DIR / ep.payload_path) as reader:
            assert reader.meta["split"] == "offline"
            assert reader.steps == ep.steps
            assert reader.frame(0)["image"].shape == (32, 32, 3)


def test_a_seed_gives_the_same_demonstrations_and_a_rerun_stores_nothing_twice(payload_dir, capsys):
    """Episode ids and placements come from the seed tree, so the learner's frame order (by episode id) and hence
    pretraining are reproducible; re-running a seed finds its demonstrations stored and says so."""
    Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=120)
    args = ("collect_demos", "--tasks", "reach", "--episodes", "2", "--workers", "1", "--image-size", "16")
    call_command(*args, "--seed", "7")
    first = sorted(str(pk) for pk in Episode.objects.values_list("pk", flat=True))
    call_command(*args, "--seed", "7")
    assert sorted(str(pk) for pk in Episode.objects.values_list("pk", flat=True)) == first
    assert "2 of them were stored already" in capsys.readouterr().out
    call_command(*args, "--seed", "8")
    assert Episode.objects.count() == 4


def test_it_refuses_unknown_tasks():
    with pytest.raises(CommandError, match="unknown task"):
        call_command("collect_demos", "--tasks", "no-such-task", "--episodes", "1")


def test_expert_recovering_records_door_open_with_the_supervisor(payload_dir):
    """The supervisor descends onto the handle only once over it, so its demonstration differs from Meta-World's."""
    import numpy as np

    from robots.agent.supervisors import DoorOpenSupervisor

    Task.objects.create(name="door-open", env_id="door-open-v3", prompts=["open the door"], max_steps=150)
    call_command("collect_demos", "--tasks", "door-open", "--episodes", "1", "--workers", "1", "--image-size", "16",
                 "--expert", "recovering")
    episode = Episode.objects.get(task__name="door-open")
    assert episode.split == "offline" and episode.success
    supervisor = DoorOpenSupervisor()
    with EpisodeReader(settings.PAYLOAD_DIR / episode.payload_path) as reader:
        for i in range(reader.steps):
            frame = reader.frame(i)
            expected = np.clip(supervisor.get_action(frame["state"].astype(np.float64)), -1, 1)
            np.testing.assert_allclose(frame["action"], expected, atol=1e-5)
