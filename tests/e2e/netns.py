"""A private network namespace for browser tests (PLATFORM_NOTES.md, WebRTC): WebRTC needs a non-loopback interface.

Layout: a veth pair with one end inside the namespace (``inner``) and one on the host (``outer``). The browser and the
robot agents run inside; daphne, the Celery worker, PostgreSQL and Redis stay on the host and are reached at ``outer``.
Host candidates are then ``inner`` on both WebRTC peers, and every packet stays on this machine. Needs root (CI runs as
root); ``available()`` says why not otherwise.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def available() -> tuple[bool, str]:
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is missing"
    if os.geteuid() != 0:
        return False, "creating a network namespace needs root"
    return True, ""


class NetNamespace:
    def __init__(self, tag: str | None = None):
        n = os.getpid() % 200 + 20
        self.name = tag or f"sop-e2e-{os.getpid()}"
        self.host_if = f"sopv{os.getpid() % 100000}"
        self.ns_if = "sop0"
        self.inner = f"10.77.{n}.1"
        self.outer = f"10.77.{n}.2"
        self.created = False

    def create(self) -> "NetNamespace":
        self.delete()
        _ip("netns", "add", self.name)
        self.created = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.outer}/24", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        for args in (("link", "set", "lo", "up"),
                     ("addr", "add", f"{self.inner}/24", "dev", self.ns_if),
                     ("link", "set", self.ns_if, "up"),
                     ("route", "add", "default", "via", self.outer, "dev", self.ns_if)):
            _ip("netns", "exec", self.name, "ip", *args)
        return self

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside the namespace (as the same user)."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def executable(self, target: str, directory: Path) -> Path:
        """A script that runs ``target`` inside the namespace with the caller's arguments (Playwright's
        ``executable_path`` wants one file; it talks to the browser over a pipe, which survives the exec)."""
        path = directory / f"{Path(target).name}-in-{self.name}"
        path.write_text(f'#!/bin/sh\nexec ip netns exec {self.name} {target} "$@"\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path

    def delete(self) -> None:
        _ip("netns", "del", self.name, check=False)  # removes the veth pair with it
        _ip("link", "del", self.host_if, check=False)
        self.created = False


class Network:
    """Several hosts on one machine: a Linux bridge in the root namespace (``gateway`` is its address, which the
    test process uses to reach everyone) and one namespace per host, each with its own address on the bridge's
    subnet. Every packet stays on this machine. ``host(name)`` adds one; ``delete()`` removes them all."""

    def __init__(self, tag: str | None = None):
        n = os.getpid() % 200 + 20
        self.tag = tag or f"sopn{os.getpid() % 100000}"
        self.bridge = f"{self.tag}br"[:15]
        self.subnet = f"10.78.{n}"
        self.gateway = f"{self.subnet}.1"
        self.hosts: dict[str, "Host"] = {}

    def create(self) -> "Network":
        self.delete()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def host(self, name: str) -> "Host":
        index = len(self.hosts) + 10
        host = Host(f"{self.tag}-{name}", f"{self.subnet}.{index}", f"{self.tag}v{index}"[:15])
        _ip("netns", "add", host.namespace)
        self.hosts[name] = host
        _ip("link", "add", host.host_if, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
        _ip("link", "set", host.host_if, "master", self.bridge)
        _ip("link", "set", host.host_if, "up")
        for args in (("link", "set", "lo", "up"), ("addr", "add", f"{host.addr}/24", "dev", "eth0"),
                     ("link", "set", "eth0", "up"), ("route", "add", "default", "via", self.gateway, "dev", "eth0")):
            _ip("netns", "exec", host.namespace, "ip", *args)
        return host

    def delete(self) -> None:
        for host in self.hosts.values():
            _ip("netns", "del", host.namespace, check=False)
            _ip("link", "del", host.host_if, check=False)
        self.hosts = {}
        _ip("link", "del", self.bridge, check=False)


class Host:
    def __init__(self, namespace: str, addr: str, host_if: str):
        self.namespace, self.addr, self.host_if = namespace, addr, host_if

    def wrap(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *cmd]
