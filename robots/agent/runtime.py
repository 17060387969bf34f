"""The episode loop: environment -> agent -> environment at a fixed rate, with subscribers watching every step."""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import threading
import time
import uuid
from typing import Callable, Optional, Sequence

import numpy as np

from robots.protocol import ControlSource, Outcome, RobotState, TaskAssigned

from .agents import Agent, Decision
from .environment import Environment, Observation

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Episode:
    """What subscribers learn when an episode starts."""

    id: str  # uuid4, made by the robot: the idempotency key of the upload
    task: str
    env_id: str
    prompt: str
    max_steps: int
    split: str
    policy: str
    policy_version: Optional[int]
    robot: str  # the name the server gave us in welcome, "unknown" if we never heard it
    camera: str
    control_hz: float  # nominal
    started_at: float  # unix seconds


@dataclasses.dataclass(frozen=True)
class Step:
    index: int
    observation: Observation  # what the agent saw before acting
    decision: Decision  # the executed action and who produced it
    reward: float  # for this action
    success: bool  # the environment's success flag after this action
    timestamp: float  # measured seconds since the episode started, when the step began


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
    steps: int
    outcome: Outcome
    success: bool  # the success flag of the last step
    ended_at: float  # unix seconds
    outcome_source: str = "robot"  # "robot": the environment/runtime decided; "operator": an operator's label
    outcome_by: str = ""  # the operator's username when outcome_source is "operator"


class Subscriber(abc.ABC):
    """Watches the episode loop. Called on the control thread: every method must return in well under a millisecond
    (hand anything slow, like writing files or sending messages, to another thread)."""

    def on_environment(self, env: Environment) -> None:  # noqa: B027
        """The runtime created ``env`` (before its first episode). The one callback allowed to take a while (up to
        seconds, like the environment's own creation): it never runs inside an episode."""

    def on_episode_start(self, episode: Episode) -> None:  # noqa: B027
        pass

    def on_step(self, episode: Episode, step: Step) -> None:  # noqa: B027
        pass

    def on_episode_end(self, episode: Episode, result: EpisodeResult) -> None:  # noqa: B027
        pass


class AgentProvider(abc.ABC):
    """Chooses the agent of each episode: the one place where a new policy can take over.

    Contract: ``next_agent()`` is called on the control thread before every episode and nowhere else, so a policy swap
    happens only between episodes and an episode never mixes two policies (SOP swaps policies between episodes).
    It returns None while there is nothing to run (no checkpoint yet); the runtime then idles and asks again. It must
    be quick: anything slow (downloads, parsing weights) belongs on another thread. ``current`` is the agent of the
    running or the last episode, else the one the next episode will get (hello and status report it).
    """

    @abc.abstractmethod
    def next_agent(self) -> Optional[Agent]: ...

    @property
    @abc.abstractmethod
    def current(self) -> Optional[Agent]: ...


class FixedAgent(AgentProvider):
    """The same agent for every episode (``--policy expert|random``, evaluation, demo collection)."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def next_agent(self) -> Agent:
        return self.agent

    @property
    def current(self) -> Agent:
        return self.agent


class LoopStats:
    """Rolling control-loop statistics, written by the control thread and read by the status sender."""

    def __init__(self, window: int):
        self._periods: collections.deque[float] = collections.deque(maxlen=window)
        self._lock = threading.Lock()
        self.overruns = 0  # since start

    def record(self, period: Optional[float], overran: bool) -> None:
        with self._lock:
            if period is not None:
                self._periods.append(period)
            if overran:
                self.overruns += 1

    def snapshot(self) -> tuple[float, float, int]:
        """(measured Hz, p99 step period in ms, overrun count) over the window."""
        with self._lock:
            periods = np.array(self._periods, dtype=np.float64)
            overruns = self.overruns
        if periods.size == 0:
            return 0.0, 0.0, overruns
        return float(1.0 / periods.mean()), float(np.percentile(periods, 99) * 1000.0), overruns


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The control thread's state for a status message."""

    state: RobotState
    task: Optional[str]
    episode_id: Optional[str]
    step: int
    control_source: ControlSource
    loop_hz: float
    loop_p99_ms: float
    overruns: int
    policy: str  # name of the agent of the running (else the last / next) episode
    policy_version: Optional[int]
    estopped: bool = False
    estopped_by: str = ""


class Runtime:
    """Runs episodes back to back on the control thread (``run()``) until ``stop()`` or ``max_episodes``.

    Each episode uses the assignment current at its start; a new ``assign()`` takes effect at the next episode and
    ``assign(task=None)`` idles the robot after the current one. The environment is created by ``make_env(env_id)``
    and reused until an episode needs another ``env_id``. ``agent`` is an ``Agent`` (the same one every episode) or an
    ``AgentProvider`` asked for the agent of each episode before it starts.
    """

    def __init__(
        self,
        make_env: Callable[[str], Environment],
        agent: Agent | AgentProvider,
        subscribers: Sequence[Subscriber] = (),
        *,
        control_hz: float = 10.0,
        camera: str = "",
        robot_name: Callable[[], str] = lambda: "unknown",
        max_episodes: Optional[int] = None,
        idle_poll_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        new_episode_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ):
        self.make_env = make_env
        # Robots: random uuid4s. Offline collection passes a seeded generator, so that a re-collected demo set has the
        # same ids and the learner (which orders frames by episode id) pretrains identically.
        self.new_episode_id = new_episode_id
        self.provider = agent if isinstance(agent, AgentProvider) else FixedAgent(agent)
        self.subscribers = list(subscribers)
        self.control_hz = control_hz
        self.period = 1.0 / control_hz
        self.camera = camera
        self.robot_name = robot_name
        self.max_episodes = max_episodes
        self.idle_poll_s = idle_poll_s
        self.stats = LoopStats(window=max(20, int(round(control_hz * 10))))  # about the last 10 seconds
        self.ended_ids: list[str] = []  # episodes that ended with >= 1 step (so get spooled), in order
        self._clock = clock
        self._stop = threading.Event()
        # Set by stop(), estop() and label(): the inter-step and idle waits wake at once instead of after the period.
        self._wake = threading.Event()
        self._estopped = False
        self._estopped_by = ""
        self._label: Optional[tuple[Outcome, str, Optional[str]]] = None  # (outcome, by, episode_id) to apply
        self._lock = threading.Lock()
        self._assignment: Optional[TaskAssigned] = None
        self._failed: Optional[TaskAssigned] = None  # an assignment that could not run; wait for a new one
        self._env: Optional[Environment] = None
        self._state = RobotState.IDLE
        self._episode: Optional[Episode] = None
        self._step = 0
        self._source = ControlSource.POLICY
        self._agent: Optional[Agent] = None  # the agent of the running or the last episode
        self._waiting_for_agent = False

    @property
    def agent(self) -> Optional[Agent]:
        """The agent of the running or the last episode, else the one the provider offers next."""
        return self._agent if self._agent is not None else self.provider.current

    # ------------------------------------------------------------ any thread

    def assign(self, assignment: TaskAssigned) -> None:
        """Set the assignment for the next episode (thread-safe)."""
        with self._lock:
            self._assignment = assignment

    def stop(self) -> None:
        """Finish the current step, end the episode as aborted, return from ``run()`` (thread-safe)."""
        self._stop.set()
        self._wake.set()

    def estop(self, engaged: bool, by: str = "") -> None:
        """Latch (``engaged``) or clear the e-stop (thread-safe). Latched: the running episode ends as aborted at the
        next control tick (the wait between steps wakes at once), nothing moves, the state is ``estopped`` and no
        episode starts until it is cleared."""
        with self._lock:
            changed = self._estopped != bool(engaged)
            self._estopped, self._estopped_by = bool(engaged), (by if engaged else "")
        if changed:
            log.warning("e-stop %s by %s", "ENGAGED" if engaged else "cleared", by or "?")
        self._wake.set()

    def wake(self) -> None:
        """Re-plan the wait before the next step now (thread-safe): the agent's ``due_in`` may have changed (a lease
        began, whose deadman can be due before the next tick). Wakes the idle wait too; nothing else happens."""
        self._wake.set()

    @property
    def estopped(self) -> bool:
        return self._estopped

    def label(self, outcome: Outcome | str, by: str, episode_id: Optional[str] = None) -> bool:
        """An operator's verdict on the running episode (thread-safe): it ends at the next control tick with
        ``outcome`` (success or failure), recorded as decided by ``by``. Ignored (False) when no episode runs or
        ``episode_id`` names another one."""
        outcome = Outcome(outcome)
        if outcome not in (Outcome.SUCCESS, Outcome.FAILURE):
            raise ValueError(f"an operator labels success or failure, not {outcome.value}")
        episode = self._episode
        if episode is None or (episode_id is not None and episode_id != episode.id):
            log.info("label %s by %s ignored: episode %s is not running", outcome.value, by, episode_id)
            return False
        with self._lock:
            self._label = (outcome, by, episode.id)
        self._wake.set()
        return True

    def snapshot(self) -> Snapshot:
        hz, p99, overruns = self.stats.snapshot()
        episode = self._episode
        agent = self.agent
        estopped = self._estopped
        return Snapshot(
            state=RobotState.ESTOPPED if estopped else self._state,
            task=episode.task if episode else None,
            episode_id=episode.id if episode else None,
            step=self._step,
            control_source=self._source,
            loop_hz=hz,
            loop_p99_ms=p99,
            overruns=overruns,
            policy=episode.policy if episode else (agent.name if agent else ""),
            policy_version=episode.policy_version if episode else (agent.policy_version if agent else None),
            estopped=estopped,
            estopped_by=self._estopped_by,
        )

    # ------------------------------------------------------------ control thread

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.max_episodes is not None and len(self.ended_ids) >= self.max_episodes:
                    log.info("ran %d episodes as asked; the control loop stops", len(self.ended_ids))
                    break
                ready = self._wait_for_assignment()
                if ready is None:
                    break
                assignment, agent = ready
                try:
                    self.run_episode(assignment, agent)
                except Exception:
                    # A task that cannot run (unknown env_id, simulator crash) must not kill the robot process:
                    # report, drop the environment, and wait for the server to assign something else.
                    log.exception("episode of task %r failed; waiting for a new assignment", assignment.task)
                    self._failed = assignment
                    self._close_env()
        finally:
            self._close_env()
            self._state = RobotState.IDLE

    def _next_task(self) -> Optional[TaskAssigned]:
        with self._lock:
            assignment = self._assignment
        if assignment is None or assignment.task is None or assignment is self._failed:
            return None
        return assignment

    def _wait_for_assignment(self) -> Optional[tuple[TaskAssigned, Agent]]:
        """Idle until there is a task and an agent to run it (the provider has none before the first checkpoint)."""
        while not self._stop.is_set():
            self._wake.clear()
            assignment = None if self._estopped else self._next_task()
            if assignment is not None:
                agent = self.provider.next_agent()
                if agent is not None:
                    self._waiting_for_agent = False
                    return assignment, agent
                if not self._waiting_for_agent:
                    log.info("task %s assigned, but there is no policy to run yet: idle until one arrives",
                             assignment.task)
                    self._waiting_for_agent = True
            self._state = RobotState.ESTOPPED if self._estopped else RobotState.IDLE
            self._wake.wait(self.idle_poll_s)
        return None

    def _environment(self, env_id: str) -> Environment:
        if self._env is None or self._env.env_id != env_id:
            self._close_env()
            log.info("creating environment %s", env_id)
            self._env = self.make_env(env_id)
            for sub in self.subscribers:
                try:
                    sub.on_environment(self._env)
                except Exception:
                    log.exception("subscriber %r failed on the new environment", sub)
        return self._env

    @property
    def environment(self) -> Optional[Environment]:
        """The current environment (any thread may read the reference; only the control thread steps it)."""
        return self._env

    def _close_env(self) -> None:
        if self._env is not None:
            env, self._env = self._env, None
            env.close()

    def run_episode(self, assignment: TaskAssigned, agent: Optional[Agent] = None) -> EpisodeResult:
        """One episode: reset, then fixed-rate steps until success, ``max_steps`` (timeout) or ``stop()`` (aborted).

        ``agent`` is the provider's choice for this episode (``run()`` passes it); None asks the provider here."""
        if agent is None:
            agent = self.provider.next_agent()
            if agent is None:
                raise RuntimeError("no agent to run the episode with (no policy loaded yet)")
        env = self._environment(assignment.env_id)
        self._agent = agent
        agent.reset(assignment.env_id, assignment.prompt)
        observation = env.reset()
        episode = Episode(
            id=self.new_episode_id(),
            task=assignment.task,
            env_id=assignment.env_id,
            prompt=assignment.prompt,
            max_steps=assignment.max_steps,
            split=assignment.split,
            policy=agent.name,
            policy_version=agent.policy_version,
            robot=self.robot_name() or "unknown",
            camera=self.camera,
            control_hz=self.control_hz,
            started_at=time.time(),
        )
        with self._lock:
            self._label = None  # a label is for the episode it names: never carry one over
        self._episode, self._step, self._state = episode, 0, RobotState.RUNNING
        self._source = ControlSource.POLICY
        for sub in self.subscribers:
            sub.on_episode_start(episode)

        outcome, success, steps = Outcome.TIMEOUT, False, 0
        outcome_source, outcome_by = "robot", ""
        t0 = self._clock()
        deadline = t0  # the first step runs at once
        last_tick: Optional[float] = None
        try:
            while steps < assignment.max_steps:
                delay, early = self._wait_for_tick(agent, deadline)
                self._wake.clear()  # before the checks: a later set() is seen at the next tick
                if self._stop.is_set() or self._estopped:
                    outcome = Outcome.ABORTED  # an e-stop never executes another action
                    break
                label = self._take_label(episode.id)
                if label is not None:
                    outcome, outcome_by = label
                    outcome_source = "operator"
                    break
                if delay > 0 and not early:
                    continue  # woken early for nothing that ends the episode (a label for another one)
                tick = self._clock()
                decision = agent.act(observation)
                result = env.step(decision.action)
                step = Step(steps, observation, decision, result.reward, result.success, tick - t0)
                for sub in self.subscribers:
                    sub.on_step(episode, step)
                observation, success = result.observation, result.success
                steps += 1
                self._step, self._source = steps, decision.source

                done = self._clock()
                overran = done - tick > self.period
                self.stats.record(None if last_tick is None else tick - last_tick, overran)
                last_tick = tick
                # An early tick (the agent was due: e.g. the deadman tripped) re-anchors the schedule at itself, so
                # the steps stay at least a period apart after it.
                deadline = (tick if early else deadline) + self.period
                if deadline < done:
                    # Overrun: the recorded timestamps show it and the counter reports it. Re-anchor the schedule
                    # at now instead of bursting through the missed ticks, which would distort the dynamics.
                    deadline = done
                if success:
                    outcome = Outcome.SUCCESS
                    break
        except BaseException:
            outcome = Outcome.ABORTED
            raise
        finally:
            ended = EpisodeResult(steps=steps, outcome=outcome, success=success, ended_at=time.time(),
                                  outcome_source=outcome_source, outcome_by=outcome_by)
            if steps:
                self.ended_ids.append(episode.id)
            self._episode, self._source = None, ControlSource.POLICY
            if self._estopped:
                self._state = RobotState.ESTOPPED
            else:
                self._state = RobotState.IDLE if self._stop.is_set() or self._next_task() is None else RobotState.RUNNING
            for sub in self.subscribers:
                try:
                    sub.on_episode_end(episode, ended)
                except Exception:
                    log.exception("subscriber %r failed at the end of episode %s", sub, episode.id)
        log.info("episode %s %s after %d steps%s", episode.id, outcome.value, steps,
                 f" (labelled by {outcome_by})" if outcome_source == "operator" else "")
        return ended

    def _wait_for_tick(self, agent: Agent, deadline: float) -> tuple[float, bool]:
        """Wait until ``deadline``, until ``agent.due_in()`` says it needs a step sooner, or until ``_wake`` is set
        (stop, e-stop, labels). Returns (seconds still to the deadline, True if the agent is due now)."""
        while True:
            delay = deadline - self._clock()
            if delay <= 0:
                return delay, False
            due = agent.due_in()
            if due is not None and due <= 0:
                return delay, True
            if self._wake.wait(delay if due is None else min(delay, due)):
                return delay, False

    def _take_label(self, episode_id: str) -> Optional[tuple[Outcome, str]]:
        with self._lock:
            label, self._label = self._label, None
        if label is None or label[2] != episode_id:
            return None
        return label[0], label[1]
