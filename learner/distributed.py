"""Data-parallel training over several processes (docs/policy.md, "Several processes"): a run whose ``world_size`` is
above 1 trains on that many processes in lockstep, each on its own batches, with their gradients averaged before
every optimizer step (torch.distributed: gloo on CPU, NCCL on GPUs). The result is one larger batch per step.

Who does what:
- **rank 0** is the worker process that claimed the run (learner/services.py): it alone talks to the database, saves
  the resume state and publishes checkpoints, so versions stay exactly-once whatever the number of processes. At the
  start of a round it writes the trainer's state and the list of indexed episode files to the run's folder and
  starts ranks 1..N-1 (``python -m learner.ddp_rank``) on this host; before each step it tells them whether to go on
  (``agree``), and when new episodes are indexed it rewrites the list, which the others pick up.
- **ranks 1..N-1** need no database: they resume the same state, index the same files, draw their own batches (their
  sampler is seeded with the rank) and take part in the gradient average; they exit when rank 0 says stop.

Parameters stay identical on every rank because every rank starts from the same state and applies the same averaged
gradient (checked by tests/learner/test_distributed.py). A rank that dies makes the others' next collective fail
within ``TIMEOUT_S``; rank 0 then ends the round as a transient error and the run resumes from its last state.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# A collective that waits this long for a rank fails (the round is retried). Generous: rank 0 publishes checkpoints and
# indexes new episodes (downloads, with object storage) while the others wait for its next step.
TIMEOUT_S = 600.0
_world = {"size": 1, "rank": 0}


def active() -> bool:
    return _world["size"] > 1 and dist.is_available() and dist.is_initialized()


def rank() -> int:
    return _world["rank"]


def world_size() -> int:
    return _world["size"]


def backend_for(device: str) -> str:
    """gloo for CPU tensors (the step flags, the CPU training of these machines); NCCL for CUDA gradients."""
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo"


def rank_device(device: str, rank_: int) -> str:
    """Each rank its own GPU (cuda:<rank>); CPU ranks share the CPU."""
    return f"cuda:{rank_}" if device.startswith("cuda") else "cpu"


def init(rank_: int, world: int, init_method: str, backend: str = "gloo", timeout_s: float = TIMEOUT_S) -> None:
    dist.init_process_group(backend, init_method=init_method, rank=rank_, world_size=world,
                            timeout=dt.timedelta(seconds=timeout_s))
    _world.update(size=world, rank=rank_)
    log.info("data-parallel rank %d of %d joined (%s)", rank_, world, backend)


def shutdown() -> None:
    """Leave the process group and free it now. destroy_process_group only drops torch's references; the group object
    can stay alive in a reference cycle until the interpreter exits, and gloo's threads torn down that late abort the
    process ("terminate called without an active exception", SIGABRT) in ~15 % of exits on this machine. Collecting
    right after frees it while everything it needs is still alive (0 of 60 runs abort with it, 11 of 60 without)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
    _world.update(size=1, rank=0)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``parameters`` over the ranks (no-op in a single process). A parameter that got no
    gradient here but did on another rank gets a zero one, so every rank steps the same parameters; one that got none
    anywhere keeps none (the optimizer skips it, as it would in one process)."""
    if not active():
        return
    params = [p for p in parameters if p.requires_grad]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not live:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in live])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for p in live:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def params_digest(module: torch.nn.Module) -> str:
    """sha256 of the module's parameters: equal on every rank of a healthy group (the ranks log it when they stop)."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def agree(go_on: bool) -> bool:
    """Rank 0's decision (another step, or stop), the same on every rank."""
    flag = torch.tensor([1 if go_on else 0], dtype=torch.int64)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_episodes(path: Path, entries: list[tuple[str, str]]) -> None:
    """The indexed episode files (path, outcome) for ranks 1..N-1, written atomically."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f)
    os.replace(tmp, path)


class Group:
    """Rank 0's side: the other ranks as child processes of this one, and the process group."""

    def __init__(self, world: int, state: Path, episodes: Path, *, device: str = "cpu", num_threads: int = 1,
                 log_dir: Optional[Path] = None):
        self.world = world
        self.state, self.episodes = state, episodes
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        env = {**os.environ, "OMP_NUM_THREADS": str(num_threads)}
        for r in range(1, world):
            out = open(log_dir / f"rank-{r}.log", "ab") if log_dir else subprocess.DEVNULL
            try:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "learner.ddp_rank", "--state", str(state), "--episodes", str(episodes),
                     "--rank", str(r), "--world-size", str(world), "--init-method", self.init_method,
                     "--device", rank_device(device, r)], env=env, stdout=out, stderr=subprocess.STDOUT))
            finally:
                if out is not subprocess.DEVNULL:
                    out.close()  # the child has its own copy
        try:
            init(0, world, self.init_method, backend_for(device))
        except BaseException:
            self._kill()
            raise

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def step(self) -> None:
        agree(True)

    def close(self, clean: bool = True) -> list[int]:
        """Stop the others (a last ``agree(False)`` when the group is healthy, else they are killed) and return
        their exit codes."""
        if clean:
            try:
                agree(False)
            except Exception:  # noqa: BLE001 - a rank already died: kill the rest below
                clean = False
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=30 if clean else 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        if active():
            shutdown()
        return codes
