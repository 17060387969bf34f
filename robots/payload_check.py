"""Episode payload checks in a sandboxed child process: libhdf5 parses untrusted bytes, the web server must not.

``python -m robots.payload_check`` is a long-lived child. It limits its own resources, says ``{"ready": true}`` and
then answers one JSON line per request line on stdin::

    -> {"id": 7, "path": "/abs/path/e.h5", "limits": {...Limits fields...}, "cpu_s": 60}
    <- {"id": 7, "ok": true, "meta": {...inspect_file's result...}, "maxrss_kb": 41236}
    <- {"id": 7, "ok": false, "error": "dataset 'action' uses external raw storage ...", "maxrss_kb": 41236}

``PayloadChecker`` is the parent side. Only JSON crosses the pipe, never pickle: a child that a hostile file
took over can at worst lie about that file, and the parent re-checks every value it sends back. A child that
crashes (a libhdf5 bug on a crafted file), runs out of memory or time, or answers anything but the expected line is
killed and the file counts as invalid; the next check starts a fresh child. A child that refused a file is not
reused either, and none serves more than ``recycle_after`` checks.

The child's own limits (set right after its imports, hard limits included, so they cannot be raised again):

- RLIMIT_AS ``memory_bytes`` (default 1 GiB; the child idles at ~120 MiB of address space and a check that passed
  the structural checks reads at most two ``max_steps``-byte columns): an allocation bomb that slips through dies
  with MemoryError or is killed, instead of taking the server's memory.
- RLIMIT_FSIZE 0 and SIGXFSZ ignored: the child never writes a file (a write fails with EFBIG).
- RLIMIT_NOFILE 16: enough for the episode file and a lazy import, not for fanning out through links.
- RLIMIT_NPROC 0: no new processes or threads (not enforced for root, which the other limits still bind).
- RLIMIT_CORE 0: no core dumps of hostile data.
- RLIMIT_CPU soft limit re-armed before each request to the CPU time used so far plus ``cpu_s``: a child spinning
  in libhdf5 dies (SIGXCPU) even if its parent is gone.
- HDF5_PLUGIN_PRELOAD="::": libhdf5 never loads a filter plugin (the episode format only uses h5py's built-in LZF).

Pure: stdlib + robots.episode_file, no Django.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from .episode_file import (
    ATTRIBUTES,
    DEFAULT_LIMITS,
    FORMAT,
    FORMAT_VERSION,
    OPTIONAL_ATTRIBUTES,
    EpisodeFileError,
    Limits,
    check_attribute_values,
    check_camera_names,
    segments_from_json,
)

DEFAULT_MEMORY_BYTES = 1024**3
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 64 * 1024**2  # 10k segments of 500-character reasons fit with room to spare
MAX_OPEN_FILES = 16
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class PayloadCheckerUnavailable(RuntimeError):
    """The checker child could not be started: a server problem, not the file's fault."""


# ---------------------------------------------------------------------------------------------- child


def _sandbox(memory_bytes: int) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    sys.dont_write_bytecode = True
    for name, value in (("RLIMIT_AS", memory_bytes), ("RLIMIT_FSIZE", 0), ("RLIMIT_NOFILE", MAX_OPEN_FILES),
                        ("RLIMIT_NPROC", 0), ("RLIMIT_CORE", 0)):
        limit = getattr(resource, name, None)
        if limit is None:
            continue
        _, hard = resource.getrlimit(limit)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))


def _arm_cpu_limit(cpu_s: float) -> None:
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    wanted = int(used.ru_utime + used.ru_stime + max(1.0, cpu_s)) + 1
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (wanted, hard))


def _maxrss_kb() -> int:
    """Peak resident memory of this process. Linux's ru_maxrss survives exec (it would report the RSS of the
    server that forked us), so read the peak of our own address space, VmHWM, where there is one."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _answer(request: Any) -> dict[str, Any]:
    from .episode_file import inspect_file

    if not isinstance(request, dict) or not isinstance(request.get("path"), str):
        return {"id": request.get("id") if isinstance(request, dict) else None, "ok": False,
                "error": "bad request to the payload checker"}
    rid = request.get("id")
    try:
        limits = Limits.from_dict(request.get("limits"))
        cpu_s = float(request.get("cpu_s", 60.0))
    except (TypeError, ValueError) as exc:
        return {"id": rid, "ok": False, "error": f"bad request to the payload checker: {exc}"}
    _arm_cpu_limit(cpu_s)
    try:
        return {"id": rid, "ok": True, "meta": inspect_file(request["path"], limits)}
    except EpisodeFileError as exc:
        return {"id": rid, "ok": False, "error": str(exc)}
    except Exception as exc:  # inspect_file converts everything; this is a bug, still the file's refusal
        return {"id": rid, "ok": False, "error": f"the payload checker failed on this file ({type(exc).__name__})"}


def child_main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m robots.payload_check", description=__doc__.split("\n")[0])
    parser.add_argument("--memory-bytes", type=int, default=DEFAULT_MEMORY_BYTES)
    args = parser.parse_args(argv)
    import h5py  # noqa: F401  (imported before the limits: they bind the parsing, not the start-up)
    import numpy  # noqa: F401

    from . import episode_file  # noqa: F401

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    _sandbox(args.memory_bytes)

    def send(message: dict[str, Any]) -> None:
        stdout.write(json.dumps(message, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n")
        stdout.flush()

    send({"ready": True, "pid": os.getpid(), "maxrss_kb": _maxrss_kb()})
    while True:
        line = stdin.readline(MAX_REQUEST_BYTES + 1)
        if not line:
            return 0
        if len(line) > MAX_REQUEST_BYTES:
            return 2  # the parent never sends this; do not try to resynchronise
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        reply = _answer(request)
        reply["maxrss_kb"] = _maxrss_kb()
        try:
            send(reply)
        except ValueError:  # not JSON-serialisable: cannot happen for inspect_file's result, refuse anyway
            send({"id": reply.get("id"), "ok": False, "error": "the payload checker could not encode its result",
                  "maxrss_kb": _maxrss_kb()})


# ---------------------------------------------------------------------------------------------- parent


class _ChildFailed(Exception):
    pass


class PayloadChecker:
    """Runs ``inspect_file`` in a sandboxed child process. Thread-safe; one check at a time per instance.

    ``check`` returns ``inspect_file``'s metadata (``segments`` as plain dicts, ``image_shape`` a tuple) or raises
    ``EpisodeFileError``, also when the child crashed or timed out on the file. The child starts lazily on the first
    check (``PayloadCheckerUnavailable`` if it cannot start at all) and is restarted as needed; ``close()`` ends it.
    """

    def __init__(self, memory_bytes: int = DEFAULT_MEMORY_BYTES, startup_timeout_s: float = 30.0,
                 recycle_after: int = 200, python: str = sys.executable):
        self.memory_bytes = int(memory_bytes)
        self.startup_timeout_s = startup_timeout_s
        self.recycle_after = recycle_after
        self.python = python
        self.last_stats: dict[str, Any] = {}  # of the last check: seconds, child_maxrss_kb, child_pid
        self.startups = 0
        self.last_startup_s: Optional[float] = None
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._owner = os.getpid()
        self._buffer = b""
        self._served = 0
        self._next_id = 0

    @property
    def pid(self) -> Optional[int]:
        """The child's pid, None when none runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def check(self, path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS, timeout_s: float = 60.0
              ) -> dict[str, Any]:
        with self._lock:
            proc = self._ensure_child()
            self._next_id += 1
            rid = self._next_id
            request = {"id": rid, "path": os.path.abspath(os.fspath(path)), "limits": limits.to_dict(),
                       "cpu_s": float(timeout_s)}
            started = time.monotonic()
            try:
                try:
                    self._send(proc, request)
                except _ChildFailed:  # it died idle (never saw this file): not the file's fault, start another
                    self._kill()
                    proc = self._ensure_child()
                    self._send(proc, request)
                reply = self._receive(proc, started + timeout_s)
            except TimeoutError:
                self._kill()
                raise EpisodeFileError(f"the payload checker timed out on this file (after {timeout_s:g} s)") from None
            except _ChildFailed as exc:
                self._kill()
                raise EpisodeFileError(f"the payload checker crashed on this file ({exc})") from None
            self._served += 1
            self.last_stats = {"seconds": time.monotonic() - started, "child_maxrss_kb": reply.get("maxrss_kb"),
                               "child_pid": proc.pid}
            try:
                if reply.get("id") != rid or not isinstance(reply.get("ok"), bool):
                    raise EpisodeFileError("the payload checker sent an invalid reply on this file")
                if not reply["ok"]:
                    error = reply.get("error")
                    raise EpisodeFileError(error[:2000] if isinstance(error, str) and error
                                           else "the payload checker refused this file")
                meta = _checked_meta(reply.get("meta"), limits)
            except EpisodeFileError:
                self._kill()  # a child that parsed a refused file is not trusted with the next one
                raise
            if self._served >= self.recycle_after:
                self._kill()
            return meta

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or self._owner != os.getpid():
                return
            try:
                proc.stdin.close()
                proc.wait(timeout=2.0)
            except Exception:
                pass
            self._reap(proc)

    def __enter__(self) -> "PayloadChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- child management (under self._lock) -----------------------------------------------------------------

    def _ensure_child(self) -> subprocess.Popen:
        if self._owner != os.getpid():  # forked: the pipes belong to the parent process's child
            self._proc, self._owner = None, os.getpid()
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._kill()
        env = {k: v for k, v in os.environ.items() if k not in ("HDF5_PLUGIN_PATH", "HDF5_PLUGIN_PRELOAD")}
        env.update(HDF5_PLUGIN_PRELOAD="::", PYTHONDONTWRITEBYTECODE="1", OPENBLAS_NUM_THREADS="1",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p))
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "robots.payload_check", "--memory-bytes", str(self.memory_bytes)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, bufsize=0, close_fds=True,
                cwd=PROJECT_ROOT, env=env, start_new_session=True,
            )
        except OSError as exc:
            raise PayloadCheckerUnavailable(f"cannot start the payload checker: {exc}") from None
        self._proc, self._buffer, self._served = proc, b"", 0
        try:
            ready = self._receive(proc, started + self.startup_timeout_s)
        except (TimeoutError, _ChildFailed) as exc:
            self._kill()
            raise PayloadCheckerUnavailable(f"the payload checker did not start: {exc or 'timed out'}") from None
        if ready.get("ready") is not True:
            self._kill()
            raise PayloadCheckerUnavailable("the payload checker did not start: unexpected greeting")
        self.startups += 1
        self.last_startup_s = time.monotonic() - started
        return proc

    def _send(self, proc: subprocess.Popen, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode("utf-8") + b"\n"
        try:
            proc.stdin.write(data)
            proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise _ChildFailed(self._exit_status(proc, wait=True)) from None

    def _receive(self, proc: subprocess.Popen, deadline: float) -> dict[str, Any]:
        """One reply line within the deadline: TimeoutError, or _ChildFailed when the child died or misbehaved."""
        fd = proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise _ChildFailed(self._exit_status(proc, wait=True))
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise _ChildFailed("reply too large")
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = b""
        if rest:
            raise _ChildFailed("it sent more than one reply")
        try:
            reply = json.loads(line)
        except ValueError:
            raise _ChildFailed("its reply is not JSON") from None
        if not isinstance(reply, dict):
            raise _ChildFailed("its reply is not a JSON object")
        return reply

    @staticmethod
    def _exit_status(proc: subprocess.Popen, wait: bool = False) -> str:
        try:
            code = proc.wait(timeout=1.0) if wait else proc.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return "it closed its output"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"

    def _kill(self) -> None:
        proc, self._proc, self._buffer = self._proc, None, b""
        if proc is not None and self._owner == os.getpid():
            self._reap(proc)

    @staticmethod
    def _reap(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except Exception:
                pass


def _checked_meta(meta: Any, limits: Limits) -> dict[str, Any]:
    """The child's metadata, re-checked here: a child that a hostile file took over must not smuggle values outside
    the schema into the server (types, ranges, identifiers, segments)."""
    if not isinstance(meta, dict):
        raise EpisodeFileError("the payload checker sent an invalid reply on this file")
    try:
        attrs = {key: meta[key] for key in ATTRIBUTES}
        attrs.update({key: meta[key] for key in OPTIONAL_ATTRIBUTES})
        steps = meta["steps"]
        check_attribute_values({**attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "steps": steps}, limits)
        segments = segments_from_json(meta["segments"], steps, limits)
        image_shape = tuple(meta["image_shape"])
        numbers = {key: meta[key] for key in ("state_dim", "action_dim", "decoded_bytes", "file_bytes")}
        cameras = meta.get("cameras", {})
        if not isinstance(cameras, dict):
            raise TypeError
        check_camera_names(list(cameras), attrs["camera"])
        cameras = {name: tuple(shape) for name, shape in cameras.items()}
    except KeyError as exc:
        raise EpisodeFileError(f"the payload checker's reply lacks {exc}") from None
    except TypeError:
        raise EpisodeFileError("the payload checker sent an invalid reply on this file") from None
    if (not all(_frame_shape(shape, limits) for shape in (image_shape, *cameras.values()))
            or any(type(n) is not int or n < 0 for n in numbers.values())
            or numbers["decoded_bytes"] > limits.max_decoded_bytes):
        raise EpisodeFileError("the payload checker sent an invalid reply on this file")
    return {**attrs, "steps": steps, "segments": [dataclasses.asdict(s) for s in segments],
            "image_shape": image_shape, "cameras": cameras, **numbers}


def _frame_shape(shape: tuple, limits: Limits) -> bool:
    return (len(shape) == 3 and all(type(n) is int for n in shape) and shape[2] == 3
            and all(1 <= n <= limits.max_image_side for n in shape[:2]))


_default: Optional[PayloadChecker] = None
_default_lock = threading.Lock()


def default_checker() -> PayloadChecker:
    """A process-wide checker (its child starts on the first check, ends at exit)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PayloadChecker()
            atexit.register(_default.close)
        return _default


if __name__ == "__main__":
    sys.exit(child_main())
