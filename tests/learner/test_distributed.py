"""Data-parallel training (learner/distributed.py): averaged gradients make every rank take the same step, equal to
one process on the union of their batches; a run with world_size 2 trains through the worker's real path (a second
process started by the round, gloo on the CPU) in lockstep, ends with identical weights on both ranks and publishes
each checkpoint version once."""

from __future__ import annotations

import re

import pytest
import torch
import torch.multiprocessing as mp
from django.core.management import call_command

from learner import distributed, services
from learner.checkpoints import load_checkpoint
from learner.config import ConfigError, TrainConfig
from learner.models import Checkpoint, TrainingRun
from robots.models import Task

from . import ddp_worker


def test_averaged_gradients_step_every_rank_like_one_process_on_the_whole_batch(tmp_path):
    init_method = f"tcp://127.0.0.1:{distributed.free_port()}"
    mp.spawn(ddp_worker.linear_step, args=(2, init_method, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    single = torch.nn.Linear(3, 2)
    data = torch.arange(24, dtype=torch.float32).view(8, 3) / 10
    torch.nn.functional.mse_loss(single(data), torch.ones(8, 2)).backward()
    torch.optim.SGD(single.parameters(), lr=0.5).step()
    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name])  # bitwise the same on both ranks
        torch.testing.assert_close(ranks[0][name], value)  # and the step one process takes on both halves


def test_world_size_is_bounded():
    with pytest.raises(ConfigError):
        TrainConfig(world_size=0)
    assert TrainConfig().world_size == 1


@pytest.mark.django_db
def test_a_two_process_run_trains_in_lockstep_and_publishes_each_version_once(payload_dir, checkpoint_dir):
    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=100)
    call_command("collect_demos", "--tasks", "reach", "--episodes", "2", "--workers", "1", "--image-size", "16")
    run = services.start_run("bc", [task], preset="debug", from_scratch=True, total_steps=40, enqueue=False,
                             overrides={"world_size": 2, "checkpoint_every_steps": 20})
    claimed = services.claim_run(run.pk, "worker-a")
    assert services.run_round(claimed, round_s=120) == "done"
    assert TrainingRun.objects.get(pk=run.pk).step == 40
    steps = list(Checkpoint.objects.filter(run=run).order_by("version").values_list("step", flat=True))
    assert steps == [20, 40]  # rank 0 alone publishes: one version per checkpoint
    rank_log = (services.trainer_state_path(run).parent / "ddp" / "rank-1.log").read_text()
    found = re.search(r"rank 1 trained (\d+) steps in lockstep \(step (\d+)\); params ([0-9a-f]{64})", rank_log)
    assert found, rank_log[-2000:]
    assert (int(found.group(1)), int(found.group(2))) == (40, 40)
    state = services.trainer_state_path(run).parent / "ddp" / "round.safetensors"
    assert state.exists()
    # rank 0's final weights (the last checkpoint publishes the raw weights: ema_decay is 0) are rank 1's, bitwise
    last = Checkpoint.objects.filter(run=run).order_by("-version").first()
    assert distributed.params_digest(load_checkpoint(checkpoint_dir / last.path).policy) == found.group(3)
