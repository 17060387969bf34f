"""Learner configuration: frozen dataclasses with named presets; a training run stores its full config as JSON.

Pure core: stdlib only. ``get_preset("default")`` is sized for the 2-core development CPU (PLATFORM_NOTES: a ~0.5M
parameter CNN on 64x64 images with batch 64 trains at ~40 steps/s there); ``debug`` is tiny, for tests.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, TypeVar

# Meta-World's 39-d observation: hand xyz (0:3), gripper opening (3), object poses (4:18), the previous frame's copy
# of 0:18 (18:36), goal xyz (36:39). A real robot knows its own hand and gripper (proprioception) and nothing about
# the objects, so the policy sees 0:4 of it, never 4:18 / 22:36 (docs/policy.md "What the policy sees"). The goal is
# a task input only where a user states it as part of the task: reach/push/pick-place's target point (which the camera
# cannot see); for door, drawer, window and button tasks Meta-World's goal is the object's position plus an offset,
# i.e. object state, and the policy never gets it.
PROPRIO_ONLY = (0, 1, 2, 3)
GOAL = (36, 37, 38)
OBJECT_STATE = tuple(range(4, 18)) + tuple(range(22, 36))  # simulator object poses (now and one frame ago)
TARGET_TASK_ENVS = ("reach-v3", "push-v3", "pick-place-v3")  # environments whose goal is a user-given target

T = TypeVar("T")


class ConfigError(ValueError):
    """A config dict that does not describe a valid config (unknown field, wrong value)."""


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    name: str = "small_vla"  # registry key of the Policy implementation (learner.policy.POLICIES)
    image_size: int = 64  # the encoder's input is image_size x image_size; other camera sizes are resized to it
    # Which cameras the policy reads, by name, in order (one shared encoder; their features are concatenated): e.g.
    # ("corner3", "gripperPOV") for the scene and the wrist view. Empty: the robot's primary camera, whatever its name
    # (observation["image"]). Robots must record every camera named here (agent --extra-cameras).
    cameras: tuple[str, ...] = ()
    state_dim: int = 39  # length of the raw state vector the robot reports (Meta-World: 39)
    state_indices: tuple[int, ...] = PROPRIO_ONLY  # which entries of the raw state the policy always sees
    # Task-specification inputs: these raw-state entries reach the policy only on environments in task_input_envs
    # (elsewhere they are replaced by zeros after normalisation, so nothing of them gets through). A checkpoint
    # written before these fields existed reads them as () (from_dict's legacy defaults) and behaves as before.
    task_input_indices: tuple[int, ...] = GOAL
    task_input_envs: tuple[str, ...] = TARGET_TASK_ENVS
    action_dim: int = 4  # Meta-World: xyz delta + gripper, each in [-1, 1]
    horizon: int = 4  # H: the policy predicts the next H actions (an action chunk)
    conv_channels: tuple[int, ...] = (16, 32, 64, 128)  # one stride-2 3x3 conv per entry: 64 px -> 4 px
    image_features: int = 256  # width of the image embedding after the conv stack
    prompt_dim: int = 384  # width of the frozen sentence embedding (all-MiniLM-L6-v2: 384)
    prompt_features: int = 64  # the prompt embedding is projected to this width
    state_features: int = 64  # the normalised proprio state is projected to this width
    hidden: tuple[int, ...] = (256, 256)  # widths of the MLP head on [image, prompt, state]
    loss: str = "l1"  # "l1" or "mse" on normalised actions (L1 is sharper for saturated expert actions)
    # RECAP (docs/policy.md "RECAP"): a learned advantage-indicator embedding (rows: negative, positive, dropped) is
    # added to the head's input. Off for bc/hg_dagger and for every checkpoint written before it existed (their JSON
    # has no such key and reads as the default), so those policies build, load and act exactly as before.
    advantage_conditioning: bool = False
    guidance_beta: float = 1.0  # classifier-free guidance weight the robots use (1 = the conditional pass only)
    eval_guidance_beta: float = 1.0  # ... and the one evaluation uses (learner/evaluation.py)
    flow_steps: int = 10  # flow_vla: Euler steps from noise to an action chunk in act (pi0 uses 10)
    # Settings of a plug-in policy (docs/policy.md "Bring your own policy"): JSON values its class reads; the fields
    # above are the built-in small_vla's and a plug-in may ignore them.
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=True)

    def __post_init__(self):
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) for k in self.options):
            raise ConfigError("options must be a JSON object")
        try:
            size = len(json.dumps(dict(self.options)))
        except (TypeError, ValueError):
            raise ConfigError("options must hold JSON values only") from None
        if size > 16_384:
            raise ConfigError("options are limited to 16 KiB of JSON")
        object.__setattr__(self, "options", dict(self.options))
        if self.guidance_beta < 0 or self.eval_guidance_beta < 0:
            raise ConfigError("guidance_beta and eval_guidance_beta must be >= 0")
        if self.loss not in ("l1", "mse"):
            raise ConfigError(f"loss must be 'l1' or 'mse', not {self.loss!r}")
        object.__setattr__(self, "cameras", tuple(self.cameras))
        if len(self.cameras) > 5 or len(set(self.cameras)) != len(self.cameras) or not all(
                isinstance(c, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}", c) for c in self.cameras):
            raise ConfigError("cameras must be at most 5 distinct camera names ([A-Za-z0-9][A-Za-z0-9_-]*)")
        if not 1 <= self.flow_steps <= 100:
            raise ConfigError("flow_steps must be 1 to 100")
        if self.horizon < 1 or self.action_dim < 1 or self.image_size < 8:
            raise ConfigError("horizon, action_dim must be >= 1 and image_size >= 8")
        if any(not 0 <= i < self.state_dim for i in (*self.state_indices, *self.task_input_indices)):
            raise ConfigError(f"state_indices and task_input_indices must lie in [0, {self.state_dim})")
        if set(self.state_indices) & set(self.task_input_indices):
            raise ConfigError("an index cannot be both a state index and a task input")
        object.__setattr__(self, "task_input_envs", tuple(str(e) for e in self.task_input_envs))
        if self.image_size % (2 ** len(self.conv_channels)):
            raise ConfigError("image_size must be divisible by 2 ** len(conv_channels)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    algorithm: str = "hg_dagger"  # registry key = file name in learner/algorithms/ ("bc", "hg_dagger", "recap")
    batch_size: int = 64  # frames per learner step
    lr: float = 3e-4  # Adam learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay; 0 = plain Adam
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    steps: int = 12_000  # learner steps of a run (a run can also be stopped from outside)
    checkpoint_every_steps: int = 500  # call on_checkpoint every N steps (~12 s at 40 steps/s) ...
    checkpoint_every_s: float = 60.0  # ... or after this many seconds since the last one, whichever comes first
    sampler_a: float = 2.0  # a > 1 in w_on = exp(a*l_on) / (exp(a*l_on) + exp(l_off)); unpublished in SOP
    # "raw": the formula on the windowed losses as they are (SOP); "relative": on losses divided by their mean, which
    # makes it adapt whatever the loss scale (learner/sampler.py online_weight; the study's "sampler" row)
    sampler_losses: str = "raw"
    window: int = 200  # W: sliding window of learner steps over which online/offline losses are averaged
    clip: tuple[float, float] = (0.2, 0.8)  # w_on is clipped to this range when a task has both kinds of data
    seed: int = 0  # seeds sampling, augmentation and the policy's initial weights
    # torch intra-op threads. 1, although the development machine has 2 cores: the learner shares them with the server
    # and the simulated robots, and a 2-thread OpenMP team then waits on a busy core (measured on a loaded machine:
    # 34-220 ms a step with 2 threads, 40-50 ms with 1; docs/policy.md). Use 2+ on a machine of its own.
    num_threads: int = 1
    # Where the learner trains and evaluates: "" = the worker's SOP_DEVICE setting (default "cpu"); "cpu", "cuda",
    # "cuda:1". A run asking for CUDA on a worker without it fails with a clear message. Robots always act on the CPU.
    device: str = ""
    # Mixed precision on CUDA: "bf16" autocasts the forward passes to bfloat16 (no loss scaling needed); "off" keeps
    # float32. Ignored on the CPU.
    amp: str = "off"
    # Pin the learner's pace (learner steps per second; 0 = as fast as it goes). A study that compares fleet sizes
    # pins it below what the learner reaches on the busiest configuration, so that every fleet size trains at the same
    # rate and only the data differs (benchmarks/sop_study.py, Table B).
    max_steps_per_s: float = 0.0
    augment_shift: int = 4  # random-shift augmentation: pad by this many pixels and crop back; 0 disables
    prefetch: bool = True  # load the next batch in a background thread while the current one trains
    max_open_episodes: int = 256  # LRU bound on open episode files: ~0.55 MiB each (HDF5 handle + small columns)
    norm_max_episodes: int = 500  # normalisation stats are computed from at most this many episodes' columns
    # Published checkpoints carry an exponential moving average of the weights when > 0 (decay per learner step, with
    # the warm-up min(decay, (1 + t) / (10 + t))); the optimizer trains the raw weights. 0 publishes the raw weights.
    # Off by default: measured in the SOP experiment, 0.999 did not change the final success (docs/policy.md).
    ema_decay: float = 0.0
    # Data-parallel processes of a run (learner/distributed.py): the worker that claims the run trains as rank 0 and
    # starts world_size - 1 more on its host, each on its own batches, gradients averaged every step (one batch of
    # world_size x batch_size). 1: one process.
    world_size: int = 1
    # -- RECAP (algorithm "recap"; ignored by the others). docs/policy.md "RECAP" explains each. --
    c_fail: float = 1.0  # failure penalty at the last step, in units of the task's max episode length
    value_bins: int = 201  # B: bins of the distributional value function on [-1, 0]
    advantage_lookahead: int = 50  # N of the N-step advantage
    positive_share: float = 0.4  # per task, this share of (non-intervention) frames gets I = positive
    indicator_dropout: float = 0.3  # probability that a training sample's indicator is replaced by "dropped"
    guidance_beta: float = 1.0  # CFG weight written into the checkpoints' policy config: what the robots use
    # CFG weight evaluation uses. The same as the robots' by default: a checkpoint is measured as the fleet runs it
    # (pi*0.6 uses 1.5-2.5; the study sweeps it once on saved checkpoints, benchmarks/sop_study.py).
    eval_guidance_beta: float = 1.0
    value_mode: str = "refresh"  # "refresh" (pi*0.6): V keeps training on all data; "frozen": V fixed once ready
    value_lr: float = 3e-4  # Adam learning rate of the value network
    value_path: str = ""  # a pretrained value file (manage.py pretrain_value); "" = pretrain inside the run
    value_pretrain_steps: int = 2000  # in-run value pretraining (first learner steps) when value_path is ""
    value_refresh_every: int = 500  # refresh mode: recompute the cached values after this many value updates
    value_frames_per_step: int = 512  # at most this many frames (whole episodes, at least one) get new V(o) per step
    # per-task max episode length (task name, steps) for return normalisation; a task not listed uses the longest
    # episode of that task indexed so far (a timeout runs exactly max_steps, so that is exact once one timed out)
    task_max_steps: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "task_max_steps", tuple((str(t), int(n)) for t, n in self.task_max_steps))
        if self.value_mode not in ("frozen", "refresh"):
            raise ConfigError(f"value_mode must be 'frozen' or 'refresh', not {self.value_mode!r}")
        if not 0.0 < self.positive_share < 1.0 or not 0.0 <= self.indicator_dropout < 1.0:
            raise ConfigError("positive_share must lie in (0, 1) and indicator_dropout in [0, 1)")
        if self.value_bins < 2 or self.advantage_lookahead < 1 or self.c_fail < 0:
            raise ConfigError("value_bins must be >= 2, advantage_lookahead >= 1 and c_fail >= 0")
        if self.guidance_beta < 0 or self.eval_guidance_beta < 0:
            raise ConfigError("guidance betas must be >= 0")
        if self.sampler_losses not in ("raw", "relative"):
            raise ConfigError(f"sampler_losses must be 'raw' or 'relative', not {self.sampler_losses!r}")
        if self.amp not in ("off", "bf16"):
            raise ConfigError(f"amp must be 'off' or 'bf16', not {self.amp!r}")
        if self.device and not re.fullmatch(r"cpu|cuda(:[0-9]{1,2})?", self.device):
            raise ConfigError(f"device must be '', 'cpu', 'cuda' or 'cuda:N', not {self.device!r}")
        if self.sampler_a <= 1.0:
            raise ConfigError("sampler_a must be > 1 (the SOP formula favours online data at equal losses)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("ema_decay must lie in [0, 1) (0: publish the raw weights)")
        lo, hi = self.clip
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"clip must satisfy 0 <= lo <= hi <= 1, got {self.clip}")
        if self.batch_size < 1 or self.window < 1 or self.max_open_episodes < 1:
            raise ConfigError("batch_size, window and max_open_episodes must be >= 1")
        if self.max_steps_per_s < 0:
            raise ConfigError("max_steps_per_s must be >= 0 (0: unpinned)")
        if self.checkpoint_every_steps < 1 or self.checkpoint_every_s <= 0:
            raise ConfigError("checkpoint_every_steps must be >= 1 and checkpoint_every_s > 0")
        if not 1 <= self.world_size <= 64:
            raise ConfigError("world_size must be 1 to 64 processes")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named pair of configs; a run records both (``to_dict``) so that it can be reproduced."""

    name: str
    policy: PolicyConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "policy": to_dict(self.policy), "train": to_dict(self.train)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preset":
        return cls(str(data["name"]), from_dict(PolicyConfig, data["policy"]), from_dict(TrainConfig, data["train"]))


PRESETS: dict[str, Preset] = {
    # Sized for the 2-core CPU: ~0.5M parameters, 64x64 images, batch 64.
    "default": Preset("default", PolicyConfig(), TrainConfig()),
    # Without any task input: image + language + hand state only (reach then has no way to know its target).
    "no_goal": Preset("no_goal", PolicyConfig(task_input_indices=(), task_input_envs=()), TrainConfig()),
    # The SOP study's base policy (docs/experiment.md): the default network, pretrained for 3000 BC steps on few
    # demonstrations, so that the base is clearly imperfect (benchmarks/sop_study.py).
    "sop": Preset("sop", PolicyConfig(), TrainConfig(steps=3000)),
    # Tiny and fast, for tests: 16x16 images, two convs, 2-step chunks, batch 8, one thread, no background loading.
    "debug": Preset(
        "debug",
        PolicyConfig(
            image_size=16,
            conv_channels=(8, 8),
            image_features=16,
            prompt_features=8,
            state_features=8,
            hidden=(32,),
            horizon=2,
        ),
        TrainConfig(
            batch_size=8,
            steps=4,
            checkpoint_every_steps=2,
            window=10,
            num_threads=1,
            augment_shift=1,
            prefetch=False,
            max_open_episodes=4,
            value_bins=21,
            advantage_lookahead=3,
            value_pretrain_steps=2,
            value_refresh_every=2,
        ),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict (tuples become lists)."""
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


# Fields whose default changed meaning when they were added: a config written before them (an older checkpoint or run)
# reads them with these values, so it builds the network it was trained as.
_LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {
    "PolicyConfig": {"task_input_indices": (), "task_input_envs": ()},
}


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Inverse of ``to_dict``. Unknown fields fail loudly; missing fields take their defaults (older runs)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {name: value for name, value in _LEGACY_DEFAULTS.get(cls.__name__, {}).items() if name not in data}
    kwargs.update({name: tuple(value) if isinstance(value, list) else value for name, value in data.items()})
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
