"""A simulated supervisor for headless runs: it takes over from the policy when the robot stops making progress and
hands back once it has driven it out of trouble, as a human does in HG-DAgger.

``SimulatedOperatorGate`` wraps the policy's agent the way openpi's ``ActionChunkBroker`` wraps a policy: the runtime
sees one ``Agent``. While the gate drives, its steps are ``Decision(source=SIM_OPERATOR, operator="sim-operator",
reason=...)``, which the recorder turns into intervention segments; the policy's name and version stay the episode's.

The rule (``TakeoverRule``, measured in docs/agent.md) reads progress from Meta-World's 39-d state: hand xyz (0:3),
object xyz (4:7), goal xyz (36:39). Progress is any of these distances beating its best so far in the episode by
``min_progress`` (hand-object, hand-object in the table plane, object-goal, hand-goal; reach tasks: hand-goal only), or
the hand having moved ``active_motion`` net over the last ``patience`` steps (the experts' first move is often away from
everything, e.g. up and behind a drawer handle). ``patience`` steps without progress -> take over for
``takeover_steps``, then hand back; after ``handbacks`` hand-backs the next takeover lasts to the end of the episode.
Late in the episode (``late_fraction`` of ``max_steps``) ``late_patience`` steps without progress are enough, and the
operator then finishes the episode. Persistent divergence (``divergence``): the expert is asked every step; when the
policy's hand motion differs from the expert's by more than ``divergence`` on average over ``patience`` steps the
operator takes over, and it hands back only once the policy's proposals no longer diverge. The gate never adds steps
(the runtime ends the episode at ``max_steps``) and never acts over an operator who already drives (a step the inner
agent marks as not the policy's passes through).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable, Optional

import numpy as np

from robots.protocol import ControlSource

from .agents import Agent, Decision
from .environment import Observation
from .runtime import AgentProvider, Episode, Subscriber

log = logging.getLogger(__name__)

SIM_OPERATOR = "sim-operator"  # the operator name on its steps and intervention segments
METAWORLD_STATE_DIM = 39


@dataclasses.dataclass(frozen=True)
class TakeoverRule:
    patience: int = 15  # steps without progress before the operator takes over
    min_progress: float = 0.01  # metres a distance must beat its best so far by to count as progress
    active_motion: float = 0.06  # metres of net hand motion over ``patience`` steps that also count as progress
    takeover_steps: int = 20  # the operator drives at least this long (long enough to recover), then hands back
    handbacks: int = 1  # hand-backs per episode; the takeover after the last one lasts to the end of the episode
    late_fraction: float = 0.6  # from this fraction of max_steps on, ``late_patience`` applies; 0 disables
    late_patience: int = 5  # late in the episode: steps without progress before the operator finishes the episode
    # Persistent divergence: the mean distance between the policy's and the expert's hand motion (xyz of actions in
    # [-1, 1], so 0..3.46) over the last ``patience`` steps above this -> take over, however busy the robot looks (a
    # policy heading the wrong way "makes progress" on some distance). 0 disables. 1.6: measured on a BC base
    # (docs/agent.md), failing door-open episodes average 1.2-1.5 early and 2.8-3.0 at worst, successes at most 1.45.
    divergence: float = 1.6

    def __post_init__(self):
        if self.patience < 1 or self.takeover_steps < 1 or self.late_patience < 1 or self.handbacks < 0:
            raise ValueError("patience, takeover_steps and late_patience must be >= 1, handbacks >= 0")
        if (not 0.0 <= self.late_fraction <= 1.0 or self.min_progress < 0 or self.active_motion <= 0
                or self.divergence < 0):
            raise ValueError("late_fraction must be in [0, 1], min_progress >= 0, active_motion > 0, divergence >= 0")


def metaworld_distances(env_id: str, state: np.ndarray) -> np.ndarray:
    """Distances whose decrease is progress on a Meta-World task (metres)."""
    if state.shape[0] < METAWORLD_STATE_DIM:
        raise ValueError(f"the simulated operator reads Meta-World's {METAWORLD_STATE_DIM}-d state, got {state.shape}")
    hand, obj, goal = state[0:3], state[4:7], state[36:39]
    if env_id.startswith("reach"):  # the object in reach tasks is a bystander
        return np.array([np.linalg.norm(hand - goal)])
    return np.array([
        np.linalg.norm(hand - obj),
        np.linalg.norm(hand[:2] - obj[:2]),
        np.linalg.norm(obj - goal),
        np.linalg.norm(hand - goal),
    ])


class SimulatedOperatorGate(Agent, Subscriber):
    """``inner`` (the policy) drives until it stalls; then ``expert`` drives as the simulated operator.

    Also a ``Subscriber``: add it to the runtime's subscribers so that it learns each episode's ``max_steps`` (without
    it the late rule is off). ``inner`` may be replaced between episodes (``GatedProvider`` does, at a policy swap).
    """

    def __init__(
        self,
        inner: Agent,
        expert: Agent,
        rule: TakeoverRule = TakeoverRule(),
        *,
        distances: Callable[[str, np.ndarray], np.ndarray] = metaworld_distances,
        operator: str = SIM_OPERATOR,
    ):
        self.inner = inner
        self.expert = expert
        self.rule = rule
        self.distances = distances
        self.operator = operator
        self.takeovers = 0  # in the current episode
        self.operated_steps = 0  # in the current episode
        self._max_steps: Optional[int] = None
        self._env_id = ""
        self._reset_episode()

    # The episode is the policy's: its name and version are reported, the operator's steps are marked per step.
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def policy_version(self) -> Optional[int]:  # type: ignore[override]
        return self.inner.policy_version

    @property
    def driving(self) -> bool:
        return self._since is not None

    def _reset_episode(self) -> None:
        self._t = 0
        self._best: Optional[np.ndarray] = None
        self._last_progress = 0
        self._hands: collections.deque[np.ndarray] = collections.deque(maxlen=self.rule.patience + 1)
        self._gaps: collections.deque[float] = collections.deque(maxlen=self.rule.patience)  # |policy - expert| xyz
        self._since: Optional[int] = None  # step the current takeover began, None while the policy drives
        self._to_end = False
        self._reason = ""
        self._handbacks = 0
        self.takeovers = 0
        self.operated_steps = 0

    def reset(self, env_id: str, prompt: str) -> None:
        self.inner.reset(env_id, prompt)
        self.expert.reset(env_id, prompt)
        self._env_id = env_id
        self._max_steps = None
        self._reset_episode()

    def on_episode_start(self, episode: Episode) -> None:
        self._max_steps = episode.max_steps

    def skipped(self, steps: int) -> None:
        """A human drove ``steps`` steps (``teleop.OperatorGate``): keep the step count in line with the episode's, end
        a takeover of ours (the human overrode it) and give the policy a fresh progress window from here."""
        self._t += steps
        self._since, self._last_progress = None, self._t
        self._best = None
        self._hands.clear()
        self._gaps.clear()
        self.inner.skipped(steps)
        self.expert.skipped(steps)

    def act(self, observation: Observation) -> Decision:
        t = self._t
        self._t += 1
        # The policy is always asked, also while the operator drives: a stateful policy stays in step, and a step it
        # marks as someone else's (a human already driving) is never overridden.
        decision = self.inner.act(observation)
        if ControlSource(decision.source) != ControlSource.POLICY:
            self._since, self._last_progress = None, t
            self._hands.clear()
            self._gaps.clear()
            return decision
        self._observe(t, np.asarray(observation["state"], dtype=np.float64))
        rule = self.rule
        # What the expert would do here: executed while the operator drives, compared with the policy's (divergence
        # rule) otherwise; not asked at all while the policy drives with the rule off.
        expert = None
        diverging = False
        if rule.divergence > 0 or self._since is not None:
            expert = np.asarray(self.expert.act(observation).action, dtype=np.float32)
        if rule.divergence > 0:
            self._gaps.append(float(np.linalg.norm(np.clip(np.asarray(decision.action[:3], dtype=np.float32), -1, 1)
                                                   - np.clip(expert[:3], -1, 1))))
            diverging = len(self._gaps) == self._gaps.maxlen and float(np.mean(self._gaps)) > rule.divergence
        if self._since is not None:
            # Hand back once recovered: after takeover_steps, and only when the policy would now do about what the
            # expert does (its proposals are compared all along); a policy that never agrees is driven to the end.
            if self._to_end or t - self._since < rule.takeover_steps or diverging:
                return self._operate(expert)
            log.info("%s hands back to %s at step %d", self.operator, self.inner.name, t)
            self._since, self._last_progress = None, t  # the policy gets a fresh window ...
            self._hands.clear()  # ... in which the operator's own motion does not count for it
            self._gaps.clear()
            self._handbacks += 1
            return decision
        stalled = t - self._last_progress
        late = bool(self._max_steps) and rule.late_fraction > 0 and t >= rule.late_fraction * self._max_steps
        last = self._handbacks >= rule.handbacks
        if late and stalled >= rule.late_patience:
            self._take_over(t, True, f"no progress for {stalled} steps late in the episode: finishing it")
        elif stalled >= rule.patience:
            self._take_over(t, last, f"no progress for {stalled} steps" + (": finishing the episode" if last else ""))
        elif diverging:
            self._take_over(t, last, f"heading away from what the expert would do for {len(self._gaps)} steps"
                                     + (": finishing the episode" if last else ""))
        else:
            return decision
        if expert is None:
            expert = np.asarray(self.expert.act(observation).action, dtype=np.float32)
        return self._operate(expert)

    def _observe(self, t: int, state: np.ndarray) -> None:
        d = self.distances(self._env_id, state)
        self._hands.append(state[0:3].copy())
        if self._best is None:
            self._best, self._last_progress = d, t
            return
        closer = bool(np.any(d < self._best - self.rule.min_progress))
        moved = (len(self._hands) == self._hands.maxlen
                 and float(np.linalg.norm(self._hands[-1] - self._hands[0])) > self.rule.active_motion)
        if closer:
            self._best = np.minimum(self._best, d)
        if closer or moved:
            self._last_progress = t

    def _take_over(self, t: int, to_end: bool, reason: str) -> None:
        self._since, self._to_end, self._reason = t, to_end, reason
        self.takeovers += 1
        log.info("%s takes over from %s at step %d: %s", self.operator, self.inner.name, t, reason)

    def _operate(self, action: np.ndarray) -> Decision:
        self.operated_steps += 1
        return Decision(action, ControlSource.SIM_OPERATOR, self.operator, self._reason)


class GatedProvider(AgentProvider):
    """Puts a gate (an agent with an ``inner`` agent: the simulated operator's, or the human operator's
    ``teleop.OperatorGate``) in front of whatever agent ``provider`` chooses for each episode."""

    def __init__(self, provider: AgentProvider, gate: Agent):
        self.provider = provider
        self.gate = gate

    def next_agent(self) -> Optional[Agent]:
        inner = self.provider.next_agent()
        if inner is None:
            return None
        self.gate.inner = inner
        return self.gate

    @property
    def current(self) -> Optional[Agent]:
        return self.provider.current  # same name and version as the gate reports
