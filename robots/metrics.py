"""This process's counters for the Prometheus endpoint (sop_web/observability.py renders them). Pure: stdlib only,
so the consumers and views that count import nothing above them."""

from __future__ import annotations

import threading
from collections import defaultdict

_lock = threading.Lock()
_counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)

COUNTERS = {
    "sop_heartbeats_total": "Robot status messages (heartbeats) received by this process.",
    "sop_robot_upload_responses_total": "Responses to robot episode announcements and uploads, by status class.",
    "sop_ingest_bytes_total": "Episode payload bytes accepted by this process.",
}


def _key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    if name not in COUNTERS:
        raise KeyError(f"unknown counter {name!r}")
    return name, tuple(sorted((k, str(v)) for k, v in labels.items()))


def inc(name: str, value: float = 1.0, **labels: str) -> None:
    """Add to a counter (thread-safe)."""
    key = _key(name, labels)
    with _lock:
        _counters[key] += value


def value(name: str, **labels: str) -> float:
    key = _key(name, labels)
    with _lock:
        return _counters.get(key, 0.0)


def snapshot() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with _lock:
        return dict(_counters)
