"""The seed tree: named streams that never repeat placements across task switches and keep evaluation held out."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from robots.agent.seeding import robot_key, seeded_builds, stream_seed


def test_streams_are_reproducible_and_independent():
    assert stream_seed(3, "episodes", "r1", "reach-v3", 0) == stream_seed(3, "episodes", "r1", "reach-v3", 0)
    seeds = {stream_seed(3, s, "r1", "reach-v3", 0) for s in ("demos", "episodes", "eval")}
    seeds |= {stream_seed(3, "episodes", r, "reach-v3", n) for r in ("r1", "r2") for n in (0, 1, 2)}
    seeds |= {stream_seed(4, "episodes", "r1", "reach-v3", 0)}
    assert len(seeds) == 3 + 6 - 1 + 1  # ("episodes", "r1", reach, 0) is in both sets
    assert all(0 <= s < 2**31 for s in seeds)
    assert stream_seed(None, "eval") != stream_seed(None, "eval")  # no root: fresh entropy
    with pytest.raises(ValueError, match="unknown seed stream"):
        stream_seed(1, "evaluation")


def test_every_build_of_a_task_gets_a_new_seed():
    seen = []
    make = seeded_builds(lambda env_id, seed: seen.append((env_id, seed)) or seed, 11, "episodes", "r1")
    first = [make("reach-v3"), make("push-v3"), make("reach-v3"), make("reach-v3")]
    assert len(set(first)) == 4, "a task switch back to reach must not reuse reach's first seed"
    again = seeded_builds(lambda env_id, seed: seed, 11, "episodes", "r1")
    assert [again("reach-v3"), again("push-v3"), again("reach-v3")] == first[:3], "and a run replays exactly"
    assert robot_key("token-a") != robot_key("token-b") and "token" not in robot_key("token-a")


def placements(env, n: int) -> list[tuple]:
    out = []
    for _ in range(n):
        state = env.reset()["state"]
        out.append(tuple(np.round(np.concatenate([state[4:7], state[36:39]]), 5)))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_task_switches_do_not_repeat_placements_and_evaluation_is_held_out():
    from robots.agent.environment import MetaWorldEnvironment

    build = functools.partial(MetaWorldEnvironment, image_size=16)
    online = seeded_builds(build, 5, "episodes", robot_key("t"))
    demos = seeded_builds(build, 5, "demos", "demo-robot")
    seen = []
    for env_id in ("reach-v3", "window-open-v3", "reach-v3", "window-open-v3"):  # the runtime rebuilds on a switch
        env = online(env_id)
        seen += [(env_id, p) for p in placements(env, 3)]
        env.close()
    assert len(set(seen)) == len(seen), "an online placement repeated after a task switch"
    demo_env, eval_env = demos("reach-v3"), build("reach-v3", seed=stream_seed(5, "eval", "reach-v3"))
    demo, held_out = set(placements(demo_env, 5)), set(placements(eval_env, 5))
    demo_env.close()
    eval_env.close()
    online_reach = {p for env_id, p in seen if env_id == "reach-v3"}
    assert not held_out & (demo | online_reach), "evaluation placements must be disjoint from demos and online"
