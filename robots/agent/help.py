"""The robot's help button: ``python -m robots.agent.help --server URL --reason "gripper jammed"``.

Wire it to a physical button (or call it from the robot's own software): it puts a help request of kind ``button``
into the server's help queue with the robot's token (``SOP_ROBOT_TOKEN``), independently of the running agent, so it
works while the agent is busy or stuck. Pressing again with the same ``--id`` is one request. Exit 0 when the server
recorded it, 1 when it refused (the reason is printed), 2 when it could not be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import httpx

from .config import AgentConfig


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m robots.agent.help", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True, help="SOP server base URL")
    p.add_argument("--token", default=None, help="robot token (prefer SOP_ROBOT_TOKEN: arguments show in ps)")
    p.add_argument("--reason", required=True, help="what is wrong, in a few words (at most 200 characters)")
    p.add_argument("--urgency", type=int, choices=(1, 2, 3), default=3, help="1 low .. 3 high (default 3)")
    p.add_argument("--id", default=None, help="a UUID: pressing twice with one id is one request")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    try:
        config = AgentConfig(server=args.server, token=args.token or os.environ.get("SOP_ROBOT_TOKEN", ""))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    body = {"reason": args.reason, "urgency": args.urgency, **({"id": args.id} if args.id else {})}
    try:
        response = httpx.post(f"{config.server_url}/api/robot/help", json=body, timeout=args.timeout,
                              headers={"Authorization": f"Bearer {config.token}"})
    except httpx.HTTPError as exc:
        print(f"error: the server could not be reached: {exc}", file=sys.stderr)
        return 2
    if response.status_code in (200, 201):
        data = response.json()
        print(f"help request #{data['id']} is {data['status']}")
        return 0
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    print(f"error: the server refused ({response.status_code}): {detail}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
