"""Data-parallel training under `torchrun` / `accelerate launch`: who this process is, and the
few collective operations the trainer needs.

`Comm` is the trainer's only view of the process group; `Comm()` (one process) makes every
operation a no-op, so the single-process run is the same code. An entry point creates it once
(`init_from_env` returns it) and passes it down (`dpo_core.trainer.train(..., comm=...)`).
A launcher sets `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`;
`init_from_env` then joins the group (NCCL on CUDA, gloo on CPU) with a timeout, so that a rank
whose peer died stops waiting and fails instead of hanging.

How the work is split (see `dpo_core.trainer`): every rank builds the same step schedule from
the same seed; each optimiser step's pairs (length-grouped, so a shared-prompt batch stays a
batch of similar pairs) are cut into `world` contiguous parts, one per rank. Each rank computes
the reference log-probs of its own share of the pairs; they are summed into every rank's table.
Gradients of the fp32 master weights are summed once per step (`sum_grads`), so every rank
takes the same optimiser step: the run is the one-process run with the same global batch.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

T = TypeVar("T")
# How long a rank waits at a collective (e.g. for rank 0's evaluation) before it gives up.
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "DPO_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class Comm:
    """This process's place in the training group (rank 0 of 1: no group)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collective tensors live: CUDA for NCCL, CPU for gloo

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's contiguous part of `items` (sizes differ by at most one; a rank may get
        none when there are fewer items than ranks)."""
        if not self.active:
            return items
        base, extra = divmod(len(items), self.world)
        start = self.rank * base + min(self.rank, extra)
        return items[start : start + base + (1 if self.rank < extra else 0)]

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        if self.active:
            moved = tensor.to(self.device)
            torch.distributed.all_reduce(moved)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on at least one."""
        if not self.active:
            return flag
        return bool(self.sum_(torch.tensor([float(flag)])).item() > 0)

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (any picklable object)."""
        if not self.active:
            return obj
        box: list[Any] = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def barrier(self) -> None:
        if self.active:
            if self.device.startswith("cuda"):
                torch.distributed.barrier(device_ids=[torch.device(self.device).index or 0])
            else:
                torch.distributed.barrier()

    def sum_grads(self, params: list[Tensor]) -> None:
        """Sum the gradients of `params` over the ranks, in one flat buffer (a missing gradient,
        on a rank that had no pairs this step, counts as zero)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.device)
            offset += g.numel()

    def _object_device(self) -> torch.device | None:
        return torch.device(self.device) if self.device.startswith("cuda") else None


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def init_from_env(device: str | None) -> tuple[Comm, str | None]:
    """Join the group the launcher set up, if any. Returns the group and the device this rank
    trains on: `cuda:<LOCAL_RANK>` when `device` is CUDA or unset and CUDA is present (one
    GPU per rank), else `device` unchanged. Not launched: a group of one. The caller passes
    the group down (no module global holds it)."""
    if not launched():
        return Comm(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s())
        )
    logger.info("rank %d of %d on %s", rank, world, device or "the default device")
    return Comm(rank, world, device if cuda else "cpu"), device


def close() -> None:
    """Leave the group (after the last collective)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def visible_devices() -> int:
    """How many processes a run uses by default: one per visible CUDA GPU, 1 without one."""
    return max(1, torch.cuda.device_count())


def devices_problem(devices: int) -> str | None:
    """Why `devices` training processes cannot run here (None: they can). On CPU any number
    runs (each process a share of the cores); with CUDA, at most one per visible GPU."""
    gpus = torch.cuda.device_count()
    if gpus and devices > gpus:
        return f"devices is {devices} but only {gpus} GPU(s) are visible"
    return None


def launch_command(devices: int, module: str, args: list[str]) -> list[str]:
    """`python -m <module> <args>`, under torchrun with `devices` processes when more than 1
    (`--standalone`: one machine, a free port found by torchrun)."""
    if devices <= 1:
        return [sys.executable, "-m", module, *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*torchrun, "--nproc_per_node", str(devices), "-m", module, *args]
