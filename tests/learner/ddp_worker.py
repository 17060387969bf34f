"""A data-parallel rank of tests/learner/test_distributed.py, in a module of its own: torch.multiprocessing starts
each rank by importing the module of its function, and the test module imports Django models, which a fresh process
cannot import before Django is set up."""

from __future__ import annotations

import os

import torch

from learner import distributed


def linear_step(rank: int, world: int, init_method: str, out: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    data = torch.arange(24, dtype=torch.float32).view(8, 3) / 10
    target = torch.ones(8, 2)
    distributed.init(rank, world, init_method)
    mine = slice(rank * 4, rank * 4 + 4)  # each rank its own half of the batch
    loss = torch.nn.functional.mse_loss(model(data[mine]), target[mine])
    loss.backward()
    distributed.average_gradients(model.parameters())
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out, f"rank-{rank}.pt"))
    assert distributed.agree(True) is True
    distributed.shutdown()


