"""Optimiser pieces: AdamW on fp32 master weights, warm-up + decay schedule."""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULERS = ("cosine", "linear", "constant")


class MasterWeights:
    """fp32 master copies of trainable parameters that live in half precision.

    LoRA weights in bf16 let the whole forward/backward run in bf16 with no casts, but an
    AdamW update (~lr = 5e-5) is below bf16's resolution for weights of size ~0.05 and would
    round away. The optimiser therefore steps fp32 copies, which are rounded into the model
    after each step. For fp32 parameters the masters are the parameters themselves.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.masters = [
            p if p.dtype == torch.float32 else p.detach().float().requires_grad_() for p in params
        ]

    def grads_to_masters(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not p:
                p.copy_(m)

    @torch.no_grad()
    def restore_fp32(self) -> None:
        """Put the fp32 masters into the model (before saving the adapter)."""
        for p, m in zip(self.params, self.masters, strict=True):
            p.data = m.detach()


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up from
    1 / (warmup + 1), then cosine or linear decay towards 0, or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1 - progress
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown lr_scheduler {schedule!r}; choose one of {', '.join(SCHEDULERS)}")


def make_optimizer(
    masters: MasterWeights,
    *,
    learning_rate: float,
    weight_decay: float,
    total_steps: int,
    warmup_ratio: float,
    schedule: str,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(masters.masters, lr=learning_rate, weight_decay=weight_decay)
    warmup = math.ceil(warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, schedule)
    )
    return optimizer, scheduler
