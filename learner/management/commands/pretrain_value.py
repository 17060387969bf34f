"""``python manage.py pretrain_value --tasks reach,drawer-open``: offline pretraining of RECAP's value function.

Trains the distributional value function V(o, prompt) (learner/value.py) on ALL verified training episodes of the
tasks (demonstrations, autonomous steps, interventions; eval episodes never) in this process, with a progress bar,
and writes it to ``CHECKPOINT_DIR/value/value-<tasks>-<time>.safetensors`` (or ``--output``). A RECAP run uses it
with the config override ``value_path`` (``services.start_run("recap", tasks, overrides={"value_path": PATH})``);
without one a RECAP run pretrains its value function in its first ``value_pretrain_steps`` learner steps instead.
Return normalisation uses each task's ``max_steps`` from the database, recorded in the file.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from learner import checkpoints as ckpt
from learner import services
from learner.algorithms.recap import RECAP
from learner.buffer import FrameIndex
from learner.config import get_preset
from learner.models import Checkpoint
from learner.policy import Normalization, build_policy
from learner.sampler import build_groups, sample_frames
from learner.value import ValueFunction, save_value, train_value
from robots import ingest, protocol
from robots.models import Episode, Task


class Command(BaseCommand):
    help = "Pretrain RECAP's value function on all verified training episodes and save it for RECAP runs."

    def add_arguments(self, parser):
        parser.add_argument("--tasks", required=True, help="comma-separated task names")
        parser.add_argument("--steps", type=int, default=2000, help="value updates (default 2000)")
        parser.add_argument("--preset", default="default", help="learner/config.py preset (batch size, bins, c_fail)")
        parser.add_argument("--checkpoint", type=int, help="policy version whose prompts, normalisation and encoders "
                                                           "start the value net (default: the deployed one)")
        parser.add_argument("--output", help="file to write (default: CHECKPOINT_DIR/value/...)")
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args, **opts):
        names = [t.strip() for t in opts["tasks"].split(",") if t.strip()]
        tasks = list(Task.objects.filter(name__in=names))
        if not tasks or len(tasks) != len(set(names)):
            known = sorted(Task.objects.values_list("name", flat=True))
            raise CommandError(f"unknown tasks in {names}; known: {known}")
        preset = get_preset(opts["preset"])
        config = dataclasses.replace(preset.train, algorithm="recap", seed=opts["seed"],
                                     task_max_steps=tuple((t.name, t.max_steps) for t in tasks))
        torch.set_num_threads(config.num_threads)

        index = FrameIndex(horizon=preset.policy.horizon, max_open_episodes=config.max_open_episodes)
        episodes = (Episode.objects.filter(task__in=tasks, status=Episode.Status.VERIFIED)
                    .exclude(split=protocol.Split.EVAL.value).order_by("verified_at"))
        for episode in tqdm(episodes, desc="indexing", unit="episode"):
            try:
                index.add_episode(ingest.payload_file(episode), outcome=episode.outcome or None)
            except Exception as exc:  # one unusable file must not stop the rest
                self.stderr.write(f"skipping episode {episode.pk}: {exc}")
        if not len(index):
            raise CommandError("no verified training episodes for these tasks (collect_demos first)")

        if opts["checkpoint"]:
            row = Checkpoint.objects.filter(version=opts["checkpoint"]).first()
            if row is None:
                raise CommandError(f"no checkpoint v{opts['checkpoint']}")
        else:
            row = services.current_checkpoint()
        if row is not None:
            policy = ckpt.load_checkpoint(services.checkpoint_local(row), expected_sha256=row.sha256,
                                          expected_size=row.size).policy
        else:
            policy = build_policy(preset.policy, seed=config.seed)
        policy.prompts.ensure(index.prompts())
        everything = np.ones(index.num_frames, bool)
        if not policy.normalization_fitted:
            states, actions, env_ids = index.collect_columns(everything, config.norm_max_episodes,
                                                             np.random.default_rng(config.seed))
            policy.set_normalization(Normalization.fit(policy.config, states, actions, env_ids))

        recap = RECAP(config)
        recap.trainable_mask(index)  # the value targets' returns come from this index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            value = ValueFunction.from_policy(policy, config.value_bins)
        groups = build_groups(index.task, index.online, everything, len(index.tasks))
        rng = np.random.default_rng(config.seed)
        # Half online where a task has both kinds of data, else all of the kind it has (a task with demos only).
        w_on = np.array([0.5 if len(on) and len(off) else float(len(on) > 0) for off, on in groups])

        def next_batch():
            return index.load_batch(sample_frames(rng, groups, w_on, config.batch_size))

        counts = {name: int((index.task == m).sum()) for m, name in enumerate(index.tasks)}
        self.stdout.write(f"{len(index.episodes)} episodes, frames per task: {counts}")
        started = time.monotonic()
        with tqdm(total=opts["steps"], desc="pretraining value", unit="step") as bar:
            def progress(step, loss):
                bar.update(step - bar.n)
                if step % 50 == 0 and math.isfinite(loss):
                    bar.set_postfix(loss=f"{loss:.4f}")

            loss = train_value(value, next_batch, lambda b: recap.returns_for(b["frame_id"].numpy()), opts["steps"],
                               config.value_lr, generator=torch.Generator().manual_seed(config.seed),
                               augment_shift=config.augment_shift, progress=progress)
        index.close()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"value-{'-'.join(sorted(names))}-{stamp}.safetensors"
        path = opts["output"] or settings.CHECKPOINT_DIR / "value" / name
        save_value(path, value, {
            "c_fail": config.c_fail, "task_max_steps": dict(config.task_max_steps), "steps": opts["steps"],
            "tasks": sorted(names), "base_checkpoint": row.version if row is not None else None,
            "episodes": len(index.episodes), "final_loss": loss, "train_s": round(time.monotonic() - started, 1),
        })
        self.stdout.write(self.style.SUCCESS(
            f"value function written to {path} (final loss {loss:.4f}); use it in a RECAP run with the override "
            f'{{"value_path": "{path}"}}'))
