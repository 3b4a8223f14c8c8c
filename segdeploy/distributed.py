"""Data-parallel training under torchrun: one process per GPU (nccl) or CPU worker (gloo).

`segdeploy train` joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT); `SEGDEPLOY_DIST_INIT` may name another rendezvous (e.g. ``file:///shared/store``
on a cluster with a shared file system). Outside torchrun nothing here does anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job: its rank, the world size and its local rank (GPU index); a single
    process is World(0, 1, 0)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes the run directory, logs and draws the progress bar."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when several processes train together (world size > 1)."""
        return self.size > 1


def join(device: str) -> World:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, else gloo; init method SEGDEPLOY_DIST_INIT or
    env://), pin this rank's GPU, and return its World; World() alone otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=size,
                                init_method=os.environ.get("SEGDEPLOY_DIST_INIT", "env://"))
    if device == "cuda":
        torch.cuda.set_device(local)
    return World(rank, size, local)


def leave(world: World) -> None:
    """A barrier first: without it gloo can abort at exit while a peer is still finishing."""
    if world.active:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if world.active:
        import torch.distributed as dist

        dist.barrier()


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """`t` summed over all ranks, in place (unchanged in a single process); returns `t`."""
    if world.active:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def sync_buffers(model: torch.nn.Module, world: World) -> None:
    """Rank 0's BatchNorm running statistics on every rank: each rank updates its own during its
    last training step, and rank 0's are the ones saved, so validation must use them too."""
    if world.active:
        import torch.distributed as dist

        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def from_main(obj: Any, world: World) -> Any:
    """Rank 0's value of `obj` on every rank (decisions that must agree: where to write, when to stop)."""
    if not world.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardSampler(Sampler[int]):
    """Every index exactly once across the ranks (rank r takes r, r+N, …): evaluation shards with
    no sample duplicated or dropped, unlike DistributedSampler's padding."""

    def __init__(self, length: int, world: World) -> None:
        self.indices = list(range(world.rank, length, world.size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
