"""Coalesced robot-state broadcasts from the robot sockets of one server process.

Each robot socket asks for its robot to be shown (robots/consumers.py decides when: a change at once, an unchanged
heartbeat at most once per heartbeat interval). Asking never touches the database; requests of all sockets of this
process collect for FLUSH_S, then:

- robots with a change (``request``): one query reads all of them (selectors.robot_states, each socket's in-memory
  volatile values laid over its row) and they go to the consoles as ``robot.state`` frames (docs/console.md);
- robots whose heartbeat moved only volatile values (``live``): no query at all; their values go to the consoles as
  one ``robot.live`` event, which each console sends on as one frame.

So the database and the channel layer see a few operations per FLUSH_S whatever the fleet size, instead of a query
and a group send per heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any, Optional

from channels.db import database_sync_to_async
from django.core.serializers.json import DjangoJSONEncoder

from . import events, selectors

log = logging.getLogger(__name__)

FLUSH_S = 0.05  # how long requests collect before one read and one send; what it adds to a console update at most
BATCH = 100  # full robot states per channel-layer message (a message stays well under the layer's size limits)
LIVE_BATCH = 1000  # live entries per channel-layer message (~200 bytes each)
STATES_EVENT = "robot.states"  # channel-layer event to the consoles: {"robots": [state, ...]}
LIVE_EVENT = "robot.live"  # channel-layer event to the consoles: {"robots": [live view, ...]}

_json = DjangoJSONEncoder()


def live_view(name: str, live: dict[str, Any]) -> dict[str, Any]:
    """A robot socket's volatile values (fleet.StatusWriter.live) as console_protocol.LiveView, JSON-ready."""
    view = {k: (_json.default(v) if hasattr(v, "isoformat") else v) for k, v in live.items()}
    return {"name": name, **view, "as_of": round(time.time(), 6)}


class Broadcaster:
    def __init__(self) -> None:
        self.pending: dict[int, dict[str, Any]] = {}
        self.live: dict[int, dict[str, Any]] = {}
        self.task: Optional[asyncio.Task] = None
        self.flushes = 0

    def request(self, layer, robot_id: int, overlay: Optional[dict[str, Any]] = None) -> None:
        """The robot's whole state, read from the database at the next flush."""
        self.pending[robot_id] = dict(overlay or {})  # the latest values of the socket win
        self.live.pop(robot_id, None)
        self._start(layer)

    def request_live(self, layer, robot_id: int, name: str, live: dict[str, Any]) -> None:
        """Only the volatile values, as they are now (no database)."""
        if robot_id in self.pending:  # a whole state is due anyway: it carries them
            self.pending[robot_id] = dict(live)
            return
        if live:
            self.live[robot_id] = live_view(name, live)
            self._start(layer)

    def _start(self, layer) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run(layer))

    async def _run(self, layer) -> None:
        while self.pending or self.live:
            await asyncio.sleep(FLUSH_S)
            batch, self.pending = self.pending, {}
            live, self.live = list(self.live.values()), {}
            try:
                if live:
                    for i in range(0, len(live), LIVE_BATCH):
                        await layer.group_send(events.CONSOLE_GROUP, {"type": LIVE_EVENT, "robots": live[i:i + LIVE_BATCH]})
                if batch:
                    states = await database_sync_to_async(selectors.robot_states)(list(batch), overlays=batch)
                    for i in range(0, len(states), BATCH):
                        await layer.group_send(events.CONSOLE_GROUP,
                                               {"type": STATES_EVENT, "robots": states[i:i + BATCH]})
                self.flushes += 1
            except Exception:  # the next request tries again; a console re-reads everything when it reconnects
                log.exception("robot state broadcast of %d robot(s) failed", len(batch) + len(live))


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


def request_live(layer, robot_id: int, name: str, live: dict[str, Any]) -> None:
    broadcaster().request_live(layer, robot_id, name, live)
