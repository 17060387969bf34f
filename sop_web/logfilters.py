"""Logging filters. Django logs every refused request (403 PermissionDenied, 400 SuspiciousOperation) with the
exception's traceback, so a viewer clicking a button they may not use, or an attacker probing, fills the log with
tracebacks that look like server faults. A 4xx is the client's error: keep the one-line warning, drop the traceback."""

from __future__ import annotations

import logging


class ClientErrorsWithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        status = getattr(record, "status_code", None)
        if isinstance(status, int) and 400 <= status < 500:
            record.exc_info = None
            record.exc_text = None
        return True
