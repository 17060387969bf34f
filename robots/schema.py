"""Write the JSON Schemas of the three wire formats to docs/schema/ (``python -m robots.schema``).

Generated from the message classes (robots/protocol.py, robots/console_protocol.py); a test fails when the committed
files are stale. Pure: no Django.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .console_protocol import schemas

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "docs" / "schema"


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def write(directory: Path = DEFAULT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = directory / name
        path.write_text(render(schema))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR):
        print(f"wrote {path}")
