"""Coalesced ``robot.state`` broadcasts from the robot sockets of one server process.

Each robot socket asks for its robot's state to be shown (robots/consumers.py decides when: a change at once, an
unchanged heartbeat at most once per heartbeat interval). Asking is cheap and never touches the database: the
requests of all sockets of this process collect for FLUSH_S, then one query reads every asked-for robot
(selectors.robot_states, with each socket's in-memory volatile values laid over the row) and one channel-layer message
per BATCH robots carries them to the consoles, which send them on to browsers as the ``robot.state`` frames of
docs/console.md. So the database and the channel layer see a few operations per FLUSH_S whatever the fleet size,
instead of a query and a group send per heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, Optional

from channels.db import database_sync_to_async

from . import events, selectors

log = logging.getLogger(__name__)

FLUSH_S = 0.05  # how long requests collect before one read and one send; what it adds to a console update at most
BATCH = 100  # robots per channel-layer message (a message stays well under the layer's size limits)
STATES_EVENT = "robot.states"  # channel-layer event to the consoles: {"robots": [state, ...]}


class Broadcaster:
    def __init__(self) -> None:
        self.pending: dict[int, dict[str, Any]] = {}
        self.task: Optional[asyncio.Task] = None
        self.flushes = 0

    def request(self, layer, robot_id: int, overlay: Optional[dict[str, Any]] = None) -> None:
        self.pending[robot_id] = dict(overlay or {})  # the latest values of the socket win
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run(layer))

    async def _run(self, layer) -> None:
        while self.pending:
            await asyncio.sleep(FLUSH_S)
            batch, self.pending = self.pending, {}
            try:
                states = await database_sync_to_async(selectors.robot_states)(list(batch), overlays=batch)
                for i in range(0, len(states), BATCH):
                    await layer.group_send(events.CONSOLE_GROUP, {"type": STATES_EVENT, "robots": states[i:i + BATCH]})
                self.flushes += 1
            except Exception:  # the next request tries again; a console re-reads everything when it reconnects
                log.exception("robot state broadcast of %d robot(s) failed", len(batch))


_broadcasters: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Broadcaster]" = weakref.WeakKeyDictionary()


def broadcaster() -> Broadcaster:
    """This event loop's broadcaster (one per server process; tests run several loops)."""
    loop = asyncio.get_running_loop()
    found = _broadcasters.get(loop)
    if found is None:
        found = _broadcasters[loop] = Broadcaster()
    return found


def request(layer, robot_id: int, overlay: Optional[dict[str, Any]] = None) -> None:
    broadcaster().request(layer, robot_id, overlay)
