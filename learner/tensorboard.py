"""The scalars a training run records for the console's charts (learner/services.py ``_record_metric``), also written
as TensorBoard event files, where researchers look (``tensorboard --logdir $SOP_DATA_DIR/tensorboard``).

Optional: without the ``tensorboard`` package (``pip install tensorboard``) nothing is written and the run trains as
before. Nested values become slash-separated tags (``tasks/reach/online_frames``); only numbers are written.
Pure: torch and the stdlib, no Django.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)
_missing_reported = False


def scalars(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite number in ``values``, nested dicts flattened into slash-separated tags."""
    for key, value in values.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield tag, float(value)


class TensorBoardSink:
    def __init__(self, writer):
        self.writer = writer

    def write(self, step: int, values: dict[str, Any]) -> None:
        for tag, value in scalars(values):
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def open_sink(directory: Path) -> Optional[TensorBoardSink]:
    """A sink writing into ``directory`` (created), or None when the tensorboard package is not installed."""
    global _missing_reported
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _missing_reported:
            log.info("tensorboard is not installed: training scalars go to the console only (pip install tensorboard)")
            _missing_reported = True
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return TensorBoardSink(SummaryWriter(log_dir=str(directory), flush_secs=10))
