"""One data-parallel rank above 0 (learner/distributed.py), started by the worker that trains the run:
``python -m learner.ddp_rank --state S --episodes E --rank R --world-size N --init-method tcp://...``.

No database and no Django: it resumes the trainer state rank 0 wrote for this round, indexes the episode files listed
in ``--episodes`` (re-read whenever rank 0 rewrites it), draws its own batches (sampler seeded with the rank) and
steps in lockstep with rank 0 until rank 0 says stop. It never saves or publishes anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("learner.ddp_rank")


def _add_new(index, listed: list, seen: set[str]) -> None:
    for path, outcome in listed:
        if path in seen:
            continue
        seen.add(path)
        try:
            index.add_episode(path, outcome=outcome or None)
        except Exception as exc:  # noqa: BLE001 - as rank 0 (services._index_for): skip a file that is not usable
            log.warning("episode %s is not usable for training: %s", path, exc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m learner.ddp_rank")
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--episodes", required=True, type=Path)
    p.add_argument("--rank", required=True, type=int)
    p.add_argument("--world-size", required=True, type=int)
    p.add_argument("--init-method", required=True)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {args.rank} %(levelname)s %(message)s")

    from learner import distributed
    from learner.buffer import FrameIndex
    from learner.checkpoints import load_trainer_state
    from learner.config import TrainConfig, from_dict
    from learner.trainer import Trainer

    _, meta = load_trainer_state(args.state)
    config = from_dict(TrainConfig, meta["train_config"])
    index = FrameIndex(horizon=int(meta["policy"]["policy_config"]["horizon"]),
                       max_open_episodes=config.max_open_episodes,
                       cameras=tuple(meta["policy"]["policy_config"].get("cameras", ())))
    seen: set[str] = set()
    mtime = args.episodes.stat().st_mtime_ns
    _add_new(index, json.loads(args.episodes.read_text()), seen)
    trainer = Trainer.resume(args.state, index, overrides={"device": args.device})
    trainer._pending_ids = None  # rank 0's planned batch is rank 0's
    # its own batches: the sampler's and the augmentations' streams differ per rank, and per round (the step)
    trainer.rng = np.random.Generator(np.random.PCG64([config.seed, args.rank, trainer.step]))
    trainer.generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([config.seed, args.rank, trainer.step]).generate_state(1)[0]))
    distributed.init(args.rank, args.world_size, args.init_method, distributed.backend_for(args.device))
    steps = 0
    try:
        while distributed.agree(False):  # rank 0 decides; this rank's vote is ignored
            now = args.episodes.stat().st_mtime_ns
            if now != mtime:  # rank 0 indexed more episodes
                mtime = now
                _add_new(index, json.loads(args.episodes.read_text()), seen)
            trainer.train_step()
            steps += 1
    finally:
        trainer.close()
        distributed.shutdown()
    log.info("rank %d trained %d steps in lockstep (step %d); params %s", args.rank, steps, trainer.step,
             distributed.params_digest(trainer.policy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
