"""Record scripted-expert demonstrations into a spool directory, with the robot agent's own runtime and recorder.

Pure core (no Django), so ``collect_demos`` can run it in worker processes; the command then ingests the spooled
files through the same service functions the upload API uses.
"""

from __future__ import annotations

import functools
import logging
import random
import uuid
from pathlib import Path

from robots.agent.agents import ScriptedExpertAgent
from robots.agent.environment import MetaWorldEnvironment
from robots.agent.recorder import EpisodeRecorder, SpoolWriter
from robots.agent.runtime import Runtime
from robots.agent.seeding import seeded_builds
from robots.agent.spool import Spool
from robots.protocol import Split, TaskAssigned

# Offline collection does not need real time: a rate far above what the simulator manages means "as fast as it goes".
AS_FAST_AS_POSSIBLE_HZ = 1000.0


def record(spool_dir: str, task: str, env_id: str, prompts: list[str], max_steps: int, episodes: int, *,
           noise: float, seed: int, image_size: int, camera: str, robot: str, recover: bool = False,
           extra_cameras: tuple[str, ...] = ()) -> int:
    """Run ``episodes`` expert episodes of one task; each lands in ``spool_dir`` as a complete spool entry.

    ``recover``: the scripted expert uses the supervisors of ``robots.agent.supervisors`` where a task has one, as the
    simulated operator does (``collect_demos --expert recovering``)."""
    logging.getLogger("robots.agent").setLevel(logging.WARNING)
    rng = random.Random(seed)
    ids = random.Random(f"{seed}/{robot}/{task}/episode-ids")  # reproducible ids: the learner orders frames by them
    writer = SpoolWriter(Spool(Path(spool_dir))).start()
    runtime = Runtime(
        seeded_builds(functools.partial(MetaWorldEnvironment, camera=camera, image_size=image_size,
                                        extra_cameras=tuple(extra_cameras)), seed, "demos", robot),
        ScriptedExpertAgent(noise=noise, seed=seed, recover=recover),
        [EpisodeRecorder(writer)],
        control_hz=AS_FAST_AS_POSSIBLE_HZ,
        camera=camera,
        robot_name=lambda: robot,
        new_episode_id=lambda: str(uuid.UUID(int=ids.getrandbits(128), version=4)),
    )
    for _ in range(episodes):
        runtime.run_episode(TaskAssigned(task=task, env_id=env_id, prompt=rng.choice(prompts), max_steps=max_steps,
                                         split=Split.OFFLINE.value))
    runtime.stop()
    writer.close()  # waits until every episode is complete in the spool
    return episodes
