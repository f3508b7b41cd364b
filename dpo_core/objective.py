"""The training objective over a batch: log-probs through the model, then the pure losses.

`batch_losses` runs one forward pass of `[chosen; rejected]` (`dpo_core.logprobs`) and hands
the per-sequence log-probs with the reference's to `dpo_core.losses` (pairs: DPO and its
variants, plus RPO's NLL term; examples: KTO). The reference log-probs are computed once,
before the first step (`fill_reference_logps`).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from dpo_core import data
from dpo_core.batches import Dataset, eval_batches, make_batch
from dpo_core.config import TrainConfig
from dpo_core.distributed import Comm
from dpo_core.hooks import StopCheck, TrainingCancelled
from dpo_core.logprobs import completion_logps
from dpo_core.losses import (
    UNPAIRED_LOSS_TYPES,
    kto_balanced_weights,
    kto_loss,
    kto_weight_advice,
    preference_loss,
)
from dpo_core.modeling import LoadedModel

logger = logging.getLogger(__name__)


@torch.no_grad()
def fill_reference_logps(
    model: Any,
    dataset: Dataset,
    lm: LoadedModel,
    config: TrainConfig,
    stop: StopCheck,
    comm: Comm | None = None,
    *,
    adapter_on: bool = False,
) -> None:
    """Reference (= base, adapter disabled; `adapter_on`: the policy as it is, after an SFT
    stage) log-probs of every pair, computed once. Under
    torchrun each rank computes its share of the forward passes; the sum fills every rank's
    table (`stop` is called as often on every rank: it may be a collective)."""
    comm = comm or Comm()
    n = len(dataset.pairs)
    chosen, rejected = torch.zeros(n), torch.zeros(n)
    batches = eval_batches(dataset, config)
    mine, slots = comm.share(batches), len(Comm(0, comm.world).share(batches))
    with nullcontext() if adapter_on else model.disable_adapter():
        for slot in range(slots):
            if stop():
                raise TrainingCancelled
            if slot < len(mine):
                indices = mine[slot]
                logps, _ = completion_logps(model, make_batch(dataset, indices, lm, config))
                chosen[indices], rejected[indices] = logps.cpu().float().chunk(2)
    comm.sum_(chosen), comm.sum_(rejected)
    dataset.reference_chosen_logps, dataset.reference_rejected_logps = chosen, rejected


def batch_losses(
    model: Any, batch: data.PairBatch, dataset: Dataset, config: TrainConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair (or, for KTO, per-example) losses (B,), each times its `weight`, and the
    per-pair tensors the metrics are built from. With every weight 1 (the default) the losses
    are exactly the unweighted ones; a step's loss is sum(weight_i * loss_i) / n (n pairs)."""
    logps, lengths = completion_logps(model, batch)
    assert dataset.reference_chosen_logps is not None
    assert dataset.reference_rejected_logps is not None
    idx = torch.tensor(batch.indices)
    reference = (
        dataset.reference_chosen_logps[idx].to(logps.device),
        dataset.reference_rejected_logps[idx].to(logps.device),
    )
    if config.loss_type in UNPAIRED_LOSS_TYPES:
        losses, parts = _kto_losses(logps, reference, dataset, batch.indices, config)
    else:
        losses, parts = _pair_losses(logps, lengths, reference, config)
    weights = [dataset.pairs[i].weight for i in batch.indices]
    losses = losses * torch.tensor(weights, dtype=losses.dtype, device=losses.device)
    parts["loss"] = losses.detach()
    return losses, parts


def _pair_losses(
    logps: Tensor, lengths: Tensor, reference: tuple[Tensor, Tensor], config: TrainConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        chosen_logps,
        rejected_logps,
        *reference,
        loss_type=config.loss_type,
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        simpo_gamma=config.simpo_gamma,
    )
    if config.rpo_alpha:  # RPO: also raise the chosen answer's likelihood, per token
        nll = -chosen_logps / chosen_lengths.clamp(min=1)
        losses = losses + config.rpo_alpha * nll
    parts = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
    return losses, parts


def _kto_losses(
    logps: Tensor,
    reference: tuple[Tensor, Tensor],
    dataset: Dataset,
    indices: list[int],
    config: TrainConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO on a batch of examples laid out as pairs (answer as "chosen", KL completion as
    "rejected"). The reference point z0 is the mean over this forward pass's examples, as
    TRL's is over a device's batch: a step split into several passes gets one z0 per pass."""
    answer_logps, kl_logps = logps.chunk(2)
    desirable = torch.tensor([bool(dataset.pairs[i].desirable) for i in indices])
    out = kto_loss(
        answer_logps,
        reference[0],
        kl_logps.detach(),
        reference[1],
        desirable.to(logps.device),
        beta=config.beta,
        desirable_weight=config.kto_desirable_weight,
        undesirable_weight=config.kto_undesirable_weight,
    )
    parts = {
        "rewards": out.rewards,
        "logps": answer_logps.detach(),
        "desirable": desirable,
        "kl": out.kl.expand(len(indices)),
    }
    return out.losses, parts


def kto_class_weights(config: TrainConfig, examples: list[data.TokenizedPair]) -> TrainConfig:
    """KTO's class weights as run: with `kto_balance`, the rarer class weighed up
    (`losses.kto_balanced_weights`), said in the log; without, the weights as given and TRL's
    advice when the classes are unbalanced. Other losses: the config as it is."""
    if config.loss_type not in UNPAIRED_LOSS_TYPES:
        return config
    n_desirable = sum(bool(p.desirable) for p in examples)
    n_undesirable = len(examples) - n_desirable
    wd, wu = config.kto_desirable_weight, config.kto_undesirable_weight
    if not config.kto_balance:
        advice = kto_weight_advice(n_desirable, n_undesirable, wd, wu)
        if advice:
            logger.warning(advice)
        return config
    weights = kto_balanced_weights(n_desirable, n_undesirable, wd, wu)
    logger.info(
        "KTO: %d desirable and %d undesirable answers, weighed %.3g and %.3g (kto_balance)",
        *(n_desirable, n_undesirable, weights.desirable, weights.undesirable),
    )
    return replace(
        config, kto_desirable_weight=weights.desirable, kto_undesirable_weight=weights.undesirable
    )
