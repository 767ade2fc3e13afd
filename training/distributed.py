"""Data-parallel training on one or several processes (torchrun; gloo on CPU, NCCL on CUDA):
which process this is, summing figures over processes, and wrapping the objective in DDP."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    rank: int
    world: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), dev)


def all_sum(values: list[float], dist: Dist) -> list[float]:
    if dist.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return t.tolist()


def has_unused_parameters(objective, x: torch.Tensor, labels: torch.Tensor | None) -> bool:
    """DDP must be told if some parameters get no gradient (it would hang otherwise)."""
    objective(x, labels).mean().backward()
    unused = any(p.grad is None for p in objective.parameters() if p.requires_grad)
    objective.zero_grad(set_to_none=True)
    return unused


def distribute(objective, images: torch.Tensor, labels: torch.Tensor | None, dist: Dist):
    if dist.world == 1:
        return objective
    probe_y = labels[:2].to(dist.device) if labels is not None else None
    unused = has_unused_parameters(objective, images[:2].to(dist.device).long(), probe_y)
    return torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=unused)
