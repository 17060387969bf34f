"""Scripted supervisors that recover: what the simulated operator drives with where Meta-World's expert cannot.

Meta-World's scripted experts are written for a reset state. HG-DAgger's supervisor must also act well from the
states the *policy* drives into, since its labels there are what the policy learns. Meta-World's door-open expert does
not: with the hand at the handle's height but off its front edge (where a trained policy tends to end up) it pushes
straight at the handle and stalls against it. Measured from 40 such states (handle height, 0-14 cm off): the
Meta-World expert opened the door in 11, ``DoorOpenSupervisor`` in 40, in 49-111 steps; from a reset both open it (the
supervisor in 86-99 steps, the Meta-World expert in 71-100). A human operator would do what it does: lift the hand
over the handle, come down on its front edge, then pull.

Each supervisor is a Meta-World-style policy (``get_action(state) -> action``) with ``reset()``, which
``ScriptedExpertAgent(recover=True)`` calls before every episode. Tasks without one here use Meta-World's expert.
"""

from __future__ import annotations

import numpy as np


class DoorOpenSupervisor:
    """door-open-v3: approach the handle's front edge from above, then pull; from anywhere low, lift first.

    Meta-World's expert aims for the same front edge (``pocket``) and the same pull, but drops towards it along a
    diagonal from as far as 12 cm away, and from the handle's height it pushes straight through the handle. Here the
    hand descends only once it is over the pocket, and a hand that is low anywhere else goes straight up to
    ``clearance`` above the handle first. Once it has reached the pocket it pulls (``engaged``) until it has lost the
    handle by 12 cm, Meta-World's own threshold.
    """

    POCKET = np.array([0.01, 0.02, 0.0])  # the handle's front edge, relative to the handle (Meta-World's -0.05 + 0.06)
    PULL = np.array([-0.05, 0.0, 0.0])  # the pull target relative to the handle (Meta-World's)
    LOST = 0.12  # metres between the hand and the pull target (in the table plane) at which the pull has failed

    def __init__(self, clearance: float = 0.10, align: float = 0.015, gain: float = 25.0):
        if clearance <= 0.02 or align <= 0 or gain <= 0:
            raise ValueError("clearance must exceed 0.02 m, align and gain must be positive")
        self.clearance = clearance  # height above the handle the hand travels at
        self.align = align  # table-plane distance from the pocket below which the hand descends
        self.gain = gain  # Meta-World's proportional gain
        self.engaged = False

    def reset(self) -> None:
        self.engaged = False

    def target(self, state: np.ndarray) -> np.ndarray:
        hand, handle = state[0:3], state[4:7]
        pocket = handle + self.POCKET
        if self.engaged and np.linalg.norm(hand[:2] - (handle + self.PULL)[:2]) > self.LOST:
            self.engaged = False
        if not self.engaged:
            off = np.linalg.norm(hand[:2] - pocket[:2])
            if off <= self.align or (off < 2 * self.align and hand[2] < pocket[2] + 0.03):
                if np.linalg.norm(hand - pocket) >= 0.02 and abs(hand[2] - pocket[2]) >= 0.01:
                    return pocket
                self.engaged = True  # at the front edge: pull from now on
            elif hand[2] < pocket[2] + self.clearance - 0.02:
                return np.array([hand[0], hand[1], pocket[2] + self.clearance])  # straight up, clear of the handle
            else:
                return pocket + np.array([0.0, 0.0, self.clearance])  # over the pocket
        return handle + self.PULL

    def get_action(self, state: np.ndarray) -> np.ndarray:
        state = np.asarray(state, dtype=np.float64)
        action = np.zeros(4)
        action[:3] = (self.target(state) - state[0:3]) * self.gain  # Meta-World's move(); the environment clips
        action[3] = 1.0  # Meta-World's expert keeps the gripper closed: a fist hooks the handle
        return action


# env id -> supervisor class, for ScriptedExpertAgent(recover=True)
RECOVERING: dict[str, type] = {"door-open-v3": DoorOpenSupervisor}
