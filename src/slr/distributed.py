"""torch.distributed scale-out: ``slr compress`` runs unchanged under ``torchrun --nproc_per_node=K``.

What is split (DESIGN.md "Scale-out design"):

* calibration is data-parallel: the pipeline's calibration batches are dealt round-robin to the ranks (batch b goes
  to rank b mod K); every rank runs its own batches through the blocks, and the per-group sums X^T X and token
  counts are all-reduced, so every rank holds the same H (each batch's product is the one a single process
  computes; only the order of the float64 sum differs);
* solving is weight-parallel: a block's solve tasks (one per linear, one per input group for group solvers) are
  bin-packed over the ranks by estimated cost (largest first onto the least-loaded rank), each rank solves its
  share, and each result is broadcast from its owner, so every rank applies the same results;
* transformer matching is data-parallel: each rank trains on its batches and gradients (and the epoch losses that
  pick the kept snapshot) are all-reduced, so the ranks stay identical;
* rank 0 alone evaluates, writes checkpoints, the artifact and results.json; the others wait at a barrier.

Backend: nccl when CUDA is available (each rank on cuda:LOCAL_RANK), else gloo. One process (no WORLD_SIZE) is
the trivial group, and every helper below is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> list[int]:
        """Indices 0..n-1 dealt round-robin to this rank."""
        return list(range(self.rank, n, self.world))

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (float64 stays float64)."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sum_float(self, x: float) -> float:
        if not self.active:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def max_int(self, x: int) -> int:
        if not self.active:
            return x
        t = torch.tensor([x], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast_object(self, obj, src: int):
        """``obj`` from rank ``src`` on every rank (pickled; tensors travel with it, shared objects stay shared)."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=_comm_device())
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_GROUP = Group()


def current() -> Group:
    """The process group slr runs in (trivial unless ``init_from_env`` joined a torchrun job)."""
    return _GROUP


def init_from_env(timeout_min: int = 60) -> Group:
    """Join the torchrun job described by the environment (WORLD_SIZE, RANK, MASTER_ADDR, ...), once.

    Returns the trivial group when WORLD_SIZE is unset or 1.
    """
    global _GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _GROUP
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
    _GROUP = Group(dist.get_rank(), dist.get_world_size())
    return _GROUP


def device_for(group: Group, device: str) -> str:
    """Each rank's device: cuda:LOCAL_RANK under nccl, else ``device``."""
    if group.active and str(device).startswith("cuda"):
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def bin_pack(costs: list[float], world: int) -> list[int]:
    """Owner rank of each task: largest cost first onto the least-loaded rank (ties: lowest rank)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def shutdown() -> None:
    """Leave the torchrun job (after a barrier); slr is a single process again afterwards."""
    global _GROUP
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _GROUP = Group()
