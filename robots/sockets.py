"""What both websocket consumers share: no input can raise past them, a budget of bad frames, rate limits.

Channels runs one consumer instance per socket. An exception that escapes a handler kills the instance: daphne closes
the socket with 1011 and the instance's ``disconnect`` bookkeeping (robot shown offline, leases ended) never runs.
``GuardedConsumer.dispatch`` catches it, logs it with its traceback and answers the frame with a ``server_error``
(the socket stays open); a failure inside the disconnect handler still stops the instance.

Unlike channels' own dispatch, it does not hop to a thread to close stale database connections before every frame:
these consumers touch the database only through ``database_sync_to_async``, which does that in its own thread, and a
heartbeat that needs no database (robots/fleet.py StatusWriter) should not pay for a thread hop either.
"""

from __future__ import annotations

import collections
import logging
import time

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.consumer import get_handler_name

try:  # daphne's websocket library: sending to a socket that closed a moment ago (an event raced the disconnect)
    from autobahn.exception import Disconnected as PeerGone
except ImportError:  # pragma: no cover - another ASGI server
    PeerGone = ConnectionError

log = logging.getLogger(__name__)

BAD_FRAME_WINDOW_S = 60.0


class GuardedConsumer(AsyncWebsocketConsumer):
    """Subclasses implement ``server_error(kind)``: what to send when handling a frame or an event failed."""

    async def dispatch(self, message):
        kind = message.get("type", "?") if isinstance(message, dict) else "?"
        try:
            handler = getattr(self, get_handler_name(message), None)
            if handler is None:
                raise ValueError(f"No handler for message type {kind}")
            await handler(message)
        except StopConsumer:
            raise
        except PeerGone:
            # Not a fault: the peer left while an event for it was on the way; its disconnect runs next.
            log.debug("%s: peer gone while handling %s", type(self).__name__, kind)
            if kind == "websocket.disconnect":
                raise StopConsumer() from None
        except Exception:
            log.exception("%s: handling %s failed", type(self).__name__, kind)
            if kind == "websocket.disconnect":
                raise StopConsumer() from None  # the bookkeeping that could run has run; end the instance
            if kind == "websocket.connect":
                await self.close()
                return
            try:
                await self.server_error(kind)
            except Exception:  # the socket itself may be gone
                log.debug("could not report the failure of %s", kind, exc_info=True)

    async def server_error(self, kind: str) -> None:  # pragma: no cover - overridden
        pass


class BadFrameBudget:
    """More than ``limit`` bad frames within a minute: the peer is broken or hostile, close its socket."""

    def __init__(self, limit: int, clock=time.monotonic):
        self.limit = limit
        self.clock = clock
        self.times: collections.deque[float] = collections.deque()

    def spend(self) -> bool:
        """Count one bad frame; True when the budget is exhausted."""
        now = self.clock()
        self.times.append(now)
        while self.times and self.times[0] < now - BAD_FRAME_WINDOW_S:
            self.times.popleft()
        return len(self.times) > self.limit


class TokenBucket:
    """At most ``burst`` at once and ``rate`` per second on average."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.at = burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
