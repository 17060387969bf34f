"""GuardedConsumer: a failing handler is answered with server_error and logged; a peer that left is neither."""

from __future__ import annotations

import logging

import pytest

from robots.sockets import GuardedConsumer, PeerGone

# Channels closes stale database connections before every handler: that needs database access.
pytestmark = pytest.mark.django_db(transaction=True)

class Probe(GuardedConsumer):
    def __init__(self, failure):
        super().__init__()
        self.failure, self.reported = failure, []

    async def robot_state(self, event):
        raise self.failure

    async def server_error(self, kind):
        self.reported.append(kind)


@pytest.mark.parametrize("failure, reported, logged", [
    (RuntimeError("boom"), ["robot.state"], True),
    (PeerGone("Attempt to send on a closed protocol"), [], False),
])
async def test_a_failed_event_is_reported_unless_the_peer_is_gone(caplog, failure, reported, logged):
    consumer = Probe(failure)
    with caplog.at_level(logging.DEBUG, logger="robots.sockets"):
        await consumer.dispatch({"type": "robot.state"})
    assert consumer.reported == reported
    assert any(r.exc_info for r in caplog.records if r.levelno >= logging.ERROR) is logged
