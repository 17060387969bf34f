"""The robot's e-stop latch under at-least-once delivery: numbered server changes, a latch set on the robot itself,
and re-sends that cross each other. When in doubt the robot stays stopped."""

from robots.agent.teleop import OperatorControl


def test_a_server_estop_latches_and_its_clear_releases():
    control = OperatorControl()
    assert control.estop_from_server(True, "alice", 1)
    assert control.estop_report() == (True, 1, False, "alice")
    assert control.estop_from_server(False, "alice", 2)
    assert control.estop_report() == (False, 2, False, "")


def test_a_stale_clear_never_releases_a_newer_latch():
    control = OperatorControl()
    control.estop_from_server(True, "alice", 3)
    assert not control.estop_from_server(False, "", 2)  # a re-send of an older clear that crossed the latch
    assert control.estopped


def test_a_latch_set_on_the_robot_survives_any_clear_until_the_server_acknowledges_it():
    control = OperatorControl()
    control.estop_from_server(False, "", 4)
    control.estop_local("bob")  # over the data channel
    assert control.estop_report() == (True, 4, True, "bob")
    assert not control.estop_from_server(False, "", 5), "the operator pressed E-STOP after any clear in flight"
    assert control.estopped
    assert control.estop_from_server(True, "bob", 6)  # the server adopted it
    assert control.estop_report() == (True, 6, False, "bob")
    assert control.estop_from_server(False, "alice", 7)  # now an operator's clear counts
    assert not control.estopped


def test_engaging_is_idempotent():
    control = OperatorControl()
    for _ in range(3):
        assert control.estop_from_server(True, "alice", 1)
    assert control.estop_report() == (True, 1, False, "alice")
