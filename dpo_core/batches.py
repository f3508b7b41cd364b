"""A run's datasets and how they are cut into steps and forward passes.

The training and held-out pairs are normalised and tokenized once (`Dataset`); each epoch's
length-grouped steps come from `iterate_steps`, the one step schedule of the DPO steps and of
the SFT stage's (`dpo_core.sft`); a step's micro-batches are split so that no forward pass
exceeds `config.max_forward_tokens`, and under torchrun each rank takes its share of a step
(`step_share`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor

from dpo_core import data
from dpo_core.config import TrainConfig
from dpo_core.distributed import Comm
from dpo_core.heldout import split_pairs
from dpo_core.kl import prompt_ids
from dpo_core.losses import UNPAIRED_LOSS_TYPES
from dpo_core.modeling import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Tokenized pairs plus their reference log-probs (filled once, before training).

    Under KTO each entry is an example: `pairs[i].desirable` its label, its "chosen" the
    answer and its "rejected" the KL completion (`data.normalise_kto`), whose reference
    log-probs fill `reference_rejected_logps`."""

    pairs: list[data.TokenizedPair]
    costs: list[int]  # tokens per pair in the batch layout, for length grouping
    reference_chosen_logps: Tensor | None = None  # (n,)
    reference_rejected_logps: Tensor | None = None
    readout_prompts: list[list[int]] | None = None  # the KL readout's prompts (None: the pairs')


class Step(NamedTuple):
    """One optimiser step of the schedule."""

    number: int  # from 1, over the whole run (or SFT stage)
    epoch: float  # fractional: 1.5 is half-way through the second epoch
    micro_batches: list[list[int]]  # indices into the dataset, one list per forward group


def prepare_datasets(
    lm: LoadedModel,
    pairs: list[dict[str, Any]],
    heldout: list[dict[str, Any]] | None,
    kl_prompts: list[str] | None,
    config: TrainConfig,
) -> tuple[Dataset, Dataset | None]:
    """The training set and the held-out set (given, or split off the pairs; None: none),
    the KL readout's own prompts attached to the latter. With no held-out pairs but prompts
    to read KL on (and `config.kl_prompts` > 0) the held-out set is those prompts alone."""
    if heldout is None:
        pairs, heldout = split_heldout(pairs, config)
    train_set = prepare_dataset(lm.tokenizer, pairs, config, "training")
    eval_set = heldout_dataset(lm.tokenizer, heldout, config)
    readout = untrained_prompts(kl_prompts or [], pairs)
    if readout and (eval_set is not None or config.kl_prompts > 0):
        eval_set = eval_set or Dataset(pairs=[], costs=[])
        eval_set.readout_prompts = [prompt_ids(lm.tokenizer, p) for p in readout]
    return train_set, eval_set


def untrained_prompts(prompts: list[str], pairs: list[dict[str, Any]]) -> list[str]:
    """`prompts` less those a training pair uses (the KL readout is on prompts not trained
    on), each once."""
    trained = {p.get("prompt") for p in pairs if isinstance(p, dict)}
    kept = [p for p in dict.fromkeys(prompts) if p not in trained]
    if len(kept) < len(set(prompts)):
        left_out = len(set(prompts)) - len(kept)
        logger.info("KL readout: left out %d prompts that training pairs use", left_out)
    return kept


def split_heldout(
    pairs: list[dict[str, Any]], config: TrainConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Hold out `config.heldout_fraction` of the prompts by `dpo_core.heldout.split_pairs`
    when that leaves at least `config.min_heldout_pairs`; else keep every pair for training."""
    kept, held = split_pairs(pairs, config.heldout_fraction, config.min_heldout_pairs)
    if not held:
        return pairs, None
    logger.info("holding out %d of %d pairs for evaluation", len(held), len(pairs))
    return kept, held


def prepare_dataset(
    tokenizer: Any, pairs: list[dict[str, Any]], config: TrainConfig, name: str
) -> Dataset:
    """Normalise and tokenize pairs (KTO: examples, `data.normalise_kto`); raise ValueError
    when none is usable."""
    unpaired = config.loss_type in UNPAIRED_LOSS_TYPES
    normalise = data.normalise_kto if unpaired else data.normalise_pairs
    normalised = normalise(pairs, source=f"{name} {'examples' if unpaired else 'pairs'}")
    tokenized = data.tokenize_pairs(
        tokenizer, normalised, config.max_length, config.max_prompt_length
    )
    if not tokenized.pairs:
        reasons = ", ".join(f"{n} {why}" for why, n in tokenized.dropped.items())
        raise ValueError(f"no usable {name} pairs: all {len(pairs)} were dropped ({reasons})")
    costs = [p.cost(config.share_prompt) for p in tokenized.pairs]
    return Dataset(tokenized.pairs, costs)


def heldout_dataset(
    tokenizer: Any, heldout: list[dict[str, Any]] | None, config: TrainConfig
) -> Dataset | None:
    """Held-out pairs to evaluate, or None. Malformed pairs are an error; pairs that are all
    dropped by truncation only cost the evaluation (a warning), not the run."""
    if not heldout:
        return None
    try:
        return prepare_dataset(tokenizer, heldout, config, "held-out")
    except data.PairError:
        raise
    except ValueError as err:
        logger.warning("%s; training without evaluation", err)
        return None


def make_batch(
    dataset: Dataset, indices: list[int], lm: LoadedModel, config: TrainConfig
) -> data.PairBatch:
    pairs = [dataset.pairs[i] for i in indices]
    collate = data.collate_shared_prompt if config.share_prompt else data.collate
    return collate(pairs, indices, lm.tokenizer.pad_token_id).to(lm.device)


def forward_chunks(dataset: Dataset, indices: list[int], config: TrainConfig) -> list[list[int]]:
    """A micro-batch split so that no forward pass exceeds `max_forward_tokens`."""
    rows_per_pair = 1 if config.share_prompt else 2
    return data.split_by_tokens(indices, dataset.costs, rows_per_pair, config.max_forward_tokens)


def eval_batches(dataset: Dataset, config: TrainConfig) -> list[list[int]]:
    """Pair indices in length-grouped forward passes, in a fixed order."""
    steps = data.step_batches(
        dataset.costs, config.batch_size, config.batch_size, seed=0, shuffle=False
    )
    return [chunk for step in steps for chunk in forward_chunks(dataset, step[0], config)]


def iterate_steps(
    costs: list[int], config: TrainConfig, *, epochs: int, seed: int
) -> Iterator[Step]:
    """The steps of `epochs` passes over items of these `costs` (pairs, or SFT examples),
    `config.batch_size * config.grad_accum` items each, length-grouped in micro-batches of
    `config.batch_size`; epoch e is shuffled with seed `seed + e`."""
    per_epoch = steps_per_epoch(len(costs), config)
    step = 0
    for epoch in range(epochs):
        steps = data.step_batches(
            costs,
            config.batch_size * config.grad_accum,
            config.batch_size,
            seed=seed + epoch,
        )
        for i, micro_batches in enumerate(steps, 1):
            step += 1
            yield Step(step, epoch + i / per_epoch, micro_batches)


def steps_per_epoch(num_pairs: int, config: TrainConfig) -> int:
    return math.ceil(num_pairs / (config.batch_size * config.grad_accum))


def planned_steps(num_pairs: int, config: TrainConfig) -> int:
    """Optimiser steps of a whole run on `num_pairs` pairs (fewer if the guard stops it)."""
    return config.epochs * steps_per_epoch(num_pairs, config)


def step_share(micro_batches: list[list[int]], comm: Comm) -> list[list[int]]:
    """This rank's micro-batches of a step: whole micro-batches when there is one per rank
    (the forward passes of the one-process run), else its part of the step's pairs, which are
    length-sorted, in one micro-batch (at most `batch_size` pairs then)."""
    if not comm.active:
        return micro_batches
    if len(micro_batches) >= comm.world:
        return comm.share(micro_batches)
    pairs = comm.share([i for m in micro_batches for i in m])
    return [pairs] if pairs else []
