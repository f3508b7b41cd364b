"""Implicit-reward accuracy of adapter versions on preference pairs (e.g. held-out ones).

DPO's implicit reward of an answer y is r(y) = beta * (log pi(y|x) - log pi_ref(y|x)), with the
reference = the base model (adapter disabled). A version "gets a pair right" when
r(chosen) > r(rejected); since beta > 0 only the log-ratio margin
(pi_c - ref_c) - (pi_r - ref_r) matters, so the accuracy does not depend on beta. The base
itself has margin 0 on every pair (it is its own reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpo_core import data
from dpo_core.logprobs import completion_logps
from dpo_core.modeling import LoadedModel


@dataclass(frozen=True)
class RewardAccuracy:
    """One version on `pairs` pairs: share with a positive margin, and the mean margin."""

    pairs: int
    accuracy: float
    mean_margin: float  # nats of log-ratio: (pi_c - ref_c) - (pi_r - ref_r), beta-free


@torch.no_grad()
def pair_logps(lm: LoadedModel, model: Any, tokenized: list[data.TokenizedPair], batch_size: int):
    """Summed completion log-probs of chosen and rejected, each (n,), in the pairs' order."""
    n = len(tokenized)
    chosen, rejected = torch.zeros(n), torch.zeros(n)
    lengths = [p.cost(share_prompt=False) for p in tokenized]
    half = lm.dtype in (torch.bfloat16, torch.float16)
    for (indices,) in data.step_batches(lengths, batch_size, batch_size, seed=0, shuffle=False):
        batch = data.collate([tokenized[i] for i in indices], indices, lm.tokenizer.pad_token_id)
        batch = batch.to(lm.device)
        with torch.autocast(lm.device.type, dtype=lm.dtype, enabled=half):
            logps, _ = completion_logps(model, batch)
        chosen[indices], rejected[indices] = logps.float().cpu().chunk(2)
    return chosen, rejected


def log_ratio_margins(policy: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor]) -> Tensor:
    """Log-ratio margins (n,): (policy_chosen - reference_chosen) - (policy_rejected -
    reference_rejected)."""
    return (policy[0] - reference[0]) - (policy[1] - reference[1])


def implicit_reward_accuracy(
    lm: LoadedModel,
    pairs: list[dict[str, Any]],
    adapters: list[str],
    *,
    max_length: int = 512,
    batch_size: int = 4,
) -> dict[str, RewardAccuracy]:
    """Accuracy of each named adapter loaded in `lm.model` (a PeftModel) on `pairs`.

    The reference log-probs are computed once with the adapters disabled. The model's active
    adapter is restored afterwards. Raises ValueError when no pair is usable.
    """
    tokenized = data.tokenize_pairs(
        lm.tokenizer, data.normalise_pairs(pairs), max_length, max_length // 2
    ).pairs
    if not tokenized:
        raise ValueError("no usable held-out pairs (all empty or identical after truncation)")
    model = lm.model
    out: dict[str, RewardAccuracy] = {}
    if not adapters:
        return out
    with model.disable_adapter():
        reference = pair_logps(lm, model, tokenized, batch_size)
    active = model.active_adapter
    try:
        for name in adapters:
            model.set_adapter(name)
            margins = log_ratio_margins(pair_logps(lm, model, tokenized, batch_size), reference)
            out[name] = RewardAccuracy(
                pairs=len(tokenized),
                accuracy=(margins > 0).float().mean().item(),
                mean_margin=margins.mean().item(),
            )
    finally:
        model.set_adapter(active)
    return out
