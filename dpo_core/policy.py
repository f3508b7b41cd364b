"""The trainable policy: a LoRA adapter on the base model, its optimiser, and its weights
kept, restored and saved.

The LoRA weights run in the model's compute dtype while AdamW steps their fp32 masters
(`dpo_core.optim.MasterWeights`); the guard's checkpoints are copies of those masters
(`snapshot` / `restore`). `release_policy` leaves the caller's base model as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpo_core.config import TrainConfig
from dpo_core.modeling import DTYPES, LoadedModel, attach_lora, load_adapter, save_adapter
from dpo_core.optim import MasterWeights, make_optimizer

logger = logging.getLogger(__name__)


@dataclass
class Policy:
    """The trainable model and what updates it."""

    model: Any  # peft.PeftModel
    masters: MasterWeights
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def resolved_config(config: TrainConfig, lm: LoadedModel) -> TrainConfig:
    """The config as run: the model fields describe the model actually loaded."""
    dtype = {v: k for k, v in DTYPES.items()}[lm.dtype]
    return replace(
        config, model=lm.source, dtype=dtype, load_in_4bit=lm.load_in_4bit, device=str(lm.device)
    )


def prepare_policy(lm: LoadedModel, config: TrainConfig, total_steps: int) -> Policy:
    """A trainable LoRA adapter (new, or `config.init_adapter`) on the base model, its LoRA
    weights in the compute dtype, and AdamW on their fp32 masters."""
    if config.init_adapter:
        model = load_adapter(lm.model, config.init_adapter, is_trainable=True)
    else:
        model = attach_lora(lm.model, config.lora_settings())
    params = [p for p in model.parameters() if p.requires_grad]
    if lm.dtype == torch.bfloat16:  # fp16 keeps fp32 LoRA weights: no loss scaling here
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    masters = MasterWeights(params)
    optimizer, scheduler = make_optimizer(
        masters,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        total_steps=total_steps,
        warmup_ratio=config.warmup_ratio,
        schedule=config.lr_scheduler,
    )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return Policy(model, masters, optimizer, scheduler)


def release_policy(lm: LoadedModel, model: Any, config: TrainConfig) -> None:
    """Remove the adapter layers so `lm.model` is the plain base model again."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    lm.model = model.unload()
    lm.model.eval()


def snapshot(policy: Policy) -> list[Tensor]:
    """A copy of the trainable weights (fp32 masters), kept on the CPU."""
    return [m.detach().to("cpu", copy=True) for m in policy.masters.masters]


@torch.no_grad()
def restore(policy: Policy, weights: list[Tensor]) -> None:
    for master, saved in zip(policy.masters.masters, weights, strict=True):
        master.copy_(saved)
    policy.masters.masters_to_params()


def save_result(model: Any, out_dir: Path, config: TrainConfig, metrics: dict) -> Path:
    """The adapter plus `train_config.json` and `metrics.json`, written atomically."""
    extra = {"train_config.json": config.to_dict(), "metrics.json": metrics}
    path = save_adapter(model, out_dir, extra=extra)
    logger.info("adapter saved to %s", path)
    return path
