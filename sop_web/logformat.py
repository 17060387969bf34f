"""``SOP_LOG_FORMAT=json``: one JSON object per log line, for a log pipeline (Loki, Elasticsearch, CloudWatch).

Fields: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` (formatted), ``process`` and, where the call site
passes them in ``extra``, the ids a fleet operator filters by: ``robot``, ``episode``, ``run``, ``checkpoint``,
``lease``. A traceback is ``exc``. Anything else in ``extra`` is not copied (it may not be JSON).
"""

from __future__ import annotations

import datetime as dt
import json
import logging

IDS = ("robot", "episode", "run", "checkpoint", "lease")


def ids(**values) -> dict:
    """``extra=`` for a log call: the non-empty ids, as strings (``log.info("...", extra=ids(robot=r.name))``)."""
    return {k: str(v) for k, v in values.items() if v is not None and v != ""}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for key in IDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)
