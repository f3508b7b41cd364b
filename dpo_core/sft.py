"""The SFT stage: supervised fine-tuning on better answers, before DPO in the same run.

The seeds' original pipeline was SFT, then DPO. Here the SFT examples are `{prompt,
completion}` rows (in the app: the "Write a better answer" rewrites, optionally the chosen
answers); `dpo_core.trainer.train(..., sft_examples=...)` runs `config.sft_epochs` passes over
them on the same LoRA weights before the DPO steps, with an optimiser and schedule of their own
(peak rate `config.sft_learning_rate`). After the stage the DPO reference is the SFT'd policy
(its log-probs are computed with the adapter on), so DPO starts from the SFT model as in the
original pipeline; the KL readout and the guard still measure against the base model.

The loss of one example is the mean negative log-likelihood of its completion's tokens given
the prompt; a step's loss is the mean over its examples (each example counts once, whatever its
length). Tokenization, truncation, length grouping, the step schedule and the chunked
log-probs are the DPO pipeline's (`dpo_core.data`, `dpo_core.batches`, `dpo_core.logprobs`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpo_core import data
from dpo_core.batches import Step, iterate_steps, steps_per_epoch
from dpo_core.config import TrainConfig
from dpo_core.distributed import Comm
from dpo_core.logprobs import completion_logps
from dpo_core.modeling import LoadedModel
from dpo_core.optim import MasterWeights, make_optimizer

logger = logging.getLogger(__name__)

SEED_OFFSET = 10_007  # the SFT batch order differs from the DPO one of the same seed


@dataclass(frozen=True)
class SFTExample:
    """Token ids of one example; the completion starts right after `prompt_ids`."""

    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def cost(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class SFTSet:
    examples: list[SFTExample]

    @property
    def costs(self) -> list[int]:
        return [e.cost for e in self.examples]


@dataclass
class SFTOptimizer:
    """The SFT stage's own AdamW and schedule, on the same fp32 master weights as DPO's."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def check_examples(examples: list[Any], source: str = "SFT examples") -> list[dict[str, str]]:
    """`{prompt, completion}` rows, each a non-empty string; ValueError names the first bad row."""
    if not examples:
        raise ValueError(f"{source}: no examples (expected rows with a prompt and a completion)")
    out = []
    for number, row in enumerate(examples, 1):
        if not isinstance(row, dict):
            expected = 'an object with "prompt" and "completion" strings'
            raise ValueError(f"{source}: row {number}: expected {expected}")
        for key in ("prompt", "completion"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f'{source}: row {number}: expected a non-empty "{key}" string')
        out.append({"prompt": row["prompt"], "completion": row["completion"]})
    return out


def tokenize_examples(
    tokenizer: Any, examples: list[dict[str, str]], config: TrainConfig
) -> SFTSet:
    """Render each example with the chat template (as `dpo_core.data` renders a pair's chosen
    answer) and truncate it as a pair would be; raise ValueError when none is left."""
    assert config.max_prompt_length is not None
    out = []
    for row in examples:
        answer = [{"role": "assistant", "content": row["completion"]}]
        pair = {"prompt": [{"role": "user", "content": row["prompt"]}], "chosen": answer}
        full = data.tokenize_pair(tokenizer, pair | {"rejected": answer})
        cut = data.truncate_pair(full, config.max_length, config.max_prompt_length)
        if cut.chosen_ids:
            out.append(SFTExample(cut.prompt_ids, cut.chosen_ids))
    if not out:
        raise ValueError(f"no usable SFT examples: all {len(examples)} were empty after truncation")
    if len(out) < len(examples):
        logger.warning("dropped %d SFT examples left empty by truncation", len(examples) - len(out))
    return SFTSet(out)


def collate(examples: list[SFTExample], indices: list[int], pad_token_id: int) -> data.PairBatch:
    """One right-padded row per example; sequence i is example i (the batch's sequences past
    `len(indices)` are empty: `completion_logps` gives them 0)."""
    width = max(e.cost for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows, cols, labels, seqs = [], [], [], []
    for i, e in enumerate(examples):
        n, m = len(e.prompt_ids), len(e.completion_ids)
        input_ids[i, : n + m] = torch.tensor(e.prompt_ids + e.completion_ids)
        attention_mask[i, : n + m] = 1
        rows += [i] * m
        cols += list(range(n - 1, n + m - 1))
        labels += e.completion_ids
        seqs += [i] * m
    positions = torch.arange(width).expand(len(examples), width)
    return data.PairBatch(
        input_ids,
        attention_mask,
        positions,
        torch.tensor(rows),
        torch.tensor(cols),
        torch.tensor(labels),
        torch.tensor(seqs),
        indices=indices,
    )


def completion_nll(model: Any, batch: data.PairBatch) -> Tensor:
    """Mean negative log-likelihood per completion token, per example (B,); differentiable."""
    logps, lengths = completion_logps(model, batch)
    b = len(batch.indices)
    return -logps[:b] / lengths[:b].clamp(min=1)


@torch.no_grad()
def mean_nll(model: Any, sft_set: SFTSet, lm: LoadedModel, config: TrainConfig) -> float:
    """The SFT loss of the whole set under `model` (eval mode; for tests and reports)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for indices in fixed_batches(sft_set, config):
        total += completion_nll(model, make_batch(sft_set, indices, lm)).sum().item()
    model.train(was_training)
    return total / len(sft_set.examples)


def make_batch(sft_set: SFTSet, indices: list[int], lm: LoadedModel) -> data.PairBatch:
    examples = [sft_set.examples[i] for i in indices]
    return collate(examples, indices, lm.tokenizer.pad_token_id).to(lm.device)


def fixed_batches(sft_set: SFTSet, config: TrainConfig) -> list[list[int]]:
    """Example indices in length-grouped forward passes, in a fixed order."""
    size = config.batch_size
    steps = data.step_batches(sft_set.costs, size, size, seed=0, shuffle=False)
    return [c for step in steps for c in forward_chunks(sft_set, step[0], config)]


def forward_chunks(sft_set: SFTSet, indices: list[int], config: TrainConfig) -> list[list[int]]:
    return data.split_by_tokens(indices, sft_set.costs, 1, config.max_forward_tokens)


def planned_steps(num_examples: int, config: TrainConfig) -> int:
    """Optimiser steps of the SFT stage (0: no stage)."""
    return config.sft_epochs * steps_per_epoch(num_examples, config)


def stage_steps(sft_set: SFTSet, config: TrainConfig) -> Iterator[Step]:
    """The stage's steps (`dpo_core.batches.iterate_steps`, in an order of its own)."""
    return iterate_steps(
        sft_set.costs, config, epochs=config.sft_epochs, seed=config.seed + SEED_OFFSET
    )


def make_sft_optimizer(masters: MasterWeights, config: TrainConfig, steps: int) -> SFTOptimizer:
    """AdamW at `config.sft_learning_rate` with the run's warm-up and schedule over `steps`."""
    optimizer, scheduler = make_optimizer(
        masters,
        learning_rate=config.sft_learning_rate or config.learning_rate,
        weight_decay=config.weight_decay,
        total_steps=steps,
        warmup_ratio=config.warmup_ratio,
        schedule=config.lr_scheduler,
    )
    return SFTOptimizer(optimizer, scheduler)


def sft_step(
    model: Any,
    masters: MasterWeights,
    opt: SFTOptimizer,
    micro_batches: list[list[int]],
    sft_set: SFTSet,
    lm: LoadedModel,
    config: TrainConfig,
    comm: Comm | None = None,
) -> dict[str, float]:
    """One optimiser step on the mean SFT loss of the step's examples (all ranks': under
    torchrun each rank runs its share and the gradients are summed, as in a DPO step).
    Returns `sft/loss`, `sft/learning_rate`, `sft/grad_norm`."""
    comm = comm or Comm()
    n = sum(len(m) for m in micro_batches)
    if comm.active:  # this rank's share of the step's examples
        micro_batches = [comm.share([i for m in micro_batches for i in m])]
    chunks = [c for m in micro_batches for c in forward_chunks(sft_set, m, config)]
    total = torch.zeros(1, dtype=torch.float64)
    for indices in chunks:
        nll = completion_nll(model, make_batch(sft_set, indices, lm))
        (nll.sum() / n).backward()
        total += nll.detach().double().sum().cpu()
    masters.grads_to_masters()
    comm.sum_grads(masters.masters)
    comm.sum_(total)
    grad_norm = torch.nn.utils.clip_grad_norm_(masters.masters, config.max_grad_norm)
    learning_rate = opt.scheduler.get_last_lr()[0]
    opt.optimizer.step()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    masters.masters_to_params()
    return {
        "sft/loss": total.item() / n,
        "sft/learning_rate": learning_rate,
        "sft/grad_norm": grad_norm.item(),
    }
