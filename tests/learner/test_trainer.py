import dataclasses

import numpy as np
import pytest
import torch

from learner.algorithms import build_algorithm
from learner.buffer import FrameIndex
from learner.checkpoints import load_checkpoint, save_checkpoint
from learner.policy import build_policy
from learner.trainer import Trainer


def _index(paths, horizon=2, reverse=False):
    index = FrameIndex(horizon=horizon, max_open_episodes=4)
    for path in reversed(paths) if reverse else paths:
        index.add_episode(path)
    return index


def _trainer(config, policy_config, paths, embedder, **kwargs):
    policy = build_policy(policy_config, embedder, seed=config.seed)
    return Trainer(config, _index(paths, policy_config.horizon), policy, build_algorithm(config), **kwargs)


def _assert_same_state(a: Trainer, b: Trainer):
    for (name, x), (_, y) in zip(a.policy.state_dict().items(), b.policy.state_dict().items()):
        assert torch.equal(x, y), name
    sa, sb = a.algorithm.optimizer.state_dict(), b.algorithm.optimizer.state_dict()
    for k in sa["state"]:
        for key in sa["state"][k]:
            assert torch.equal(torch.as_tensor(sa["state"][k][key]), torch.as_tensor(sb["state"][k][key]))
    assert a.step == b.step
    assert a.rng.bit_generator.state == b.rng.bit_generator.state
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    np.testing.assert_array_equal(a.window.means(), b.window.means())


@pytest.mark.parametrize("prefetch,ema_decay", [(False, 0.0), (True, 0.0), (True, 0.99)])
def test_training_resumes_exactly_where_it_stopped(
    prefetch, ema_decay, tmp_path, episodes, tiny_policy_config, tiny_train_config, fake_embedder
):
    config = dataclasses.replace(tiny_train_config, prefetch=prefetch, ema_decay=ema_decay)
    straight = _trainer(config, tiny_policy_config, episodes, fake_embedder)
    straight.run(4)

    first = _trainer(config, tiny_policy_config, episodes, fake_embedder)
    first.run(2)
    first.save_state(tmp_path / "trainer.safetensors")
    first.close()
    # the index is rebuilt from the same files in another order: frames and tasks are matched by id and name
    resumed = Trainer.resume(tmp_path / "trainer.safetensors", _index(episodes, reverse=True), embedder=fake_embedder)
    assert resumed.step == 2
    resumed.run(4)

    assert resumed.index.tasks != straight.index.tasks
    for (name, x), (_, y) in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().items()):
        assert torch.equal(x, y), name
    assert resumed.rng.bit_generator.state == straight.rng.bit_generator.state
    means = {t: straight.metrics()["tasks"][t] for t in straight.index.tasks}
    assert {t: resumed.metrics()["tasks"][t] for t in straight.index.tasks} == means
    if ema_decay:  # the moving average of the published weights survives the resume too
        for n in straight.ema:
            assert torch.equal(straight.ema[n], resumed.ema[n]), n
    straight.close(), resumed.close()


def test_a_resumed_run_matches_its_saved_state(tmp_path, episodes, tiny_policy_config, tiny_train_config,
                                                fake_embedder):
    trainer = _trainer(tiny_train_config, tiny_policy_config, episodes, fake_embedder)
    trainer.run(3)
    trainer.save_state(tmp_path / "s.safetensors")
    resumed = Trainer.resume(tmp_path / "s.safetensors", _index(episodes), embedder=fake_embedder)
    _assert_same_state(trainer, resumed)


def test_the_checkpoint_hook_runs_every_n_steps_and_every_t_seconds(episodes, tiny_policy_config, tiny_train_config,
                                                                     fake_embedder):
    calls, now = [], [0.0]
    config = dataclasses.replace(tiny_train_config, checkpoint_every_steps=3, checkpoint_every_s=100.0)
    trainer = _trainer(config, tiny_policy_config, episodes, fake_embedder, on_checkpoint=calls.append,
                       clock=lambda: now[0])
    trainer.run(7)
    assert calls == [3, 6]
    now[0] = 150.0  # a slow step: the time limit triggers before the step count does
    trainer.train_step()
    assert calls == [3, 6, 8]


def test_the_step_interval_counts_across_rounds_shorter_than_it(tmp_path, episodes, tiny_policy_config,
                                                                 tiny_train_config, fake_embedder):
    """A run trained in rounds of 2 steps with checkpoints every 3 steps still publishes at 3 and 6: each resume
    continues the count from the last checkpoint instead of starting it again (then no round would ever reach 3)."""
    calls = []
    config = dataclasses.replace(tiny_train_config, checkpoint_every_steps=3, checkpoint_every_s=1e9)
    trainer = _trainer(config, tiny_policy_config, episodes, fake_embedder, on_checkpoint=calls.append)
    for round_end in (2, 4, 6, 8):
        trainer.run(round_end)
        trainer.save_state(tmp_path / "state.safetensors")
        trainer.close()
        trainer = Trainer.resume(tmp_path / "state.safetensors", _index(episodes), embedder=fake_embedder,
                                 on_checkpoint=calls.append)
    trainer.close()
    assert calls == [3, 6]


def test_training_fits_normalisation_embeds_prompts_and_lowers_the_loss(
    tmp_path, episodes, tiny_policy_config, tiny_train_config, fake_embedder
):
    config = dataclasses.replace(tiny_train_config, batch_size=16, lr=3e-3)
    saved = []
    trainer = _trainer(config, tiny_policy_config, episodes, fake_embedder)
    trainer.on_checkpoint = lambda step: saved.append(
        save_checkpoint(tmp_path, trainer.policy, version=len(saved) + 1, algorithm=config.algorithm, step=step)
    )
    first = trainer.train_step()["loss"]
    trainer.run(60)
    metrics = trainer.metrics()
    assert trainer.policy.normalization_fitted
    assert sorted(fake_embedder.calls) == ["push the target", "reach the target"]
    assert np.mean([metrics["tasks"][t]["loss_offline"] for t in ("reach", "push")]) < first
    assert metrics["timing"]["steps"] == 60 and 0 < metrics["timing"]["sample_load_share"] < 1
    assert 0.2 <= metrics["tasks"]["reach"]["w_on"] <= 0.8
    assert len(saved) == 30 and load_checkpoint(saved[-1].path).policy.prompts.prompts() == [
        "push the target", "reach the target"]


def test_new_episodes_are_picked_up_between_steps(tmp_path, episodes, tiny_policy_config, tiny_train_config,
                                                  fake_embedder):
    from .conftest import OPERATOR, make_episode

    offline = [p for p in episodes if "-off-" in p.name]
    trainer = _trainer(tiny_train_config, tiny_policy_config, offline, fake_embedder)
    trainer.run(2)
    assert trainer.metrics()["tasks"]["reach"]["w_on"] == 0.0  # no online data yet: all offline
    trainer.index.add_episode(make_episode(tmp_path / "new.h5", task="reach", split="online", seed=99,
                                           segments=((1, 5, OPERATOR),)))
    trainer.run(3)
    assert trainer.metrics()["tasks"]["reach"]["online_frames"] == 4
    assert trainer.metrics()["tasks"]["reach"]["w_on"] > 0


def test_the_moving_average_is_what_checkpoints_publish_and_the_raw_weights_keep_training(
    tmp_path, episodes, tiny_policy_config, tiny_train_config, fake_embedder
):
    config = dataclasses.replace(tiny_train_config, ema_decay=0.9)
    trainer = _trainer(config, tiny_policy_config, episodes, fake_embedder)
    start = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.run(6)
    raw = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    # The average by hand: from the starting weights, decay min(0.9, (1 + t) / (10 + t)) at step t.
    # (Reproduced from the raw weights after each step: run a twin step by step.)
    twin = _trainer(config, tiny_policy_config, episodes, fake_embedder)
    expected = dict(start)
    for t in range(6):
        twin.train_step()
        decay = min(0.9, (1 + t) / (10 + t))
        expected = {n: decay * expected[n] + (1 - decay) * p.detach() for n, p in twin.policy.named_parameters()}
    for n in raw:
        torch.testing.assert_close(trainer.ema[n], expected[n])
        assert not torch.equal(trainer.ema[n], raw[n]) or torch.equal(raw[n], start[n])

    with trainer.published_weights() as policy:
        saved = save_checkpoint(tmp_path / "ckpt", policy, version=1)
    for n, p in trainer.policy.named_parameters():
        assert torch.equal(p, raw[n]), n  # the raw weights are back
    loaded = load_checkpoint(saved.path, expected_sha256=saved.sha256).policy
    for n, p in loaded.named_parameters():
        assert torch.equal(p, trainer.ema[n]), n

    with pytest.raises(RuntimeError), trainer.published_weights():
        raise RuntimeError("a failed write")
    for n, p in trainer.policy.named_parameters():
        assert torch.equal(p, raw[n]), n  # also after an exception
    trainer.close(), twin.close()


def test_without_a_moving_average_checkpoints_publish_the_raw_weights(episodes, tiny_policy_config,
                                                                      tiny_train_config, fake_embedder):
    trainer = _trainer(dataclasses.replace(tiny_train_config, ema_decay=0.0), tiny_policy_config, episodes,
                       fake_embedder)
    trainer.run(2)
    assert trainer.ema is None
    with trainer.published_weights() as policy:
        assert policy is trainer.policy
    trainer.close()
