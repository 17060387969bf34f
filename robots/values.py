"""Protocol values -> database values: protocol integers are unbounded and times are unix seconds."""

from __future__ import annotations

import datetime as dt
from typing import Optional

from .exceptions import SopError

MAX_DB_INT = 2**31 - 1  # PositiveIntegerField on PostgreSQL


def from_unix(value: float, name: str) -> dt.datetime:
    try:
        return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise SopError(f"{name} is not a valid unix time: {value!r}") from None


def db_version(value: Optional[int]) -> Optional[int]:
    """A checkpoint version for the database: None for 'not a checkpoint' (the episode file writes -1)."""
    return value if value is not None and 0 <= value <= MAX_DB_INT else None


def db_count(value: int) -> int:
    return max(0, min(int(value), MAX_DB_INT))
