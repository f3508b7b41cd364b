"""Evaluation points: held-out reward accuracy, the KL readout, and the guard that reads them.

At an evaluation point (`is_eval_step`) rank 0 measures the policy on the held-out pairs
(`evaluate`), reads KL(policy || base) on sampled answers (`kl_readout`) and adds the caller's
own metrics (`evaluate_point`); `make_guard` picks the guard (`dpo_core.guard`) those readings
feed, or says in words why there is none.
"""

from __future__ import annotations

from typing import Any

import torch

from dpo_core.batches import Dataset, eval_batches, make_batch, steps_per_epoch
from dpo_core.config import TrainConfig
from dpo_core.guard import EvalPoint, Guard, KLGuard
from dpo_core.hooks import EvalHook
from dpo_core.kl import Reference, kl_from_completions, sample_from_ids
from dpo_core.metrics import reward_metrics
from dpo_core.modeling import LoadedModel
from dpo_core.objective import batch_losses

# With eval_every 0, a long epoch is checked this often: a KTO round of 270 rows (68 steps an
# epoch) was past the KL ceiling (16.9 nats) at its first end-of-epoch check (docs/loop.md).
MAX_STEPS_BETWEEN_CHECKS = 16


def is_eval_step(step: int, total_steps: int, dataset: Dataset, config: TrainConfig) -> bool:
    """Every `eval_every` steps (0: at the end of each epoch, or every
    `MAX_STEPS_BETWEEN_CHECKS` steps when an epoch is longer), and after the last step."""
    epoch = steps_per_epoch(len(dataset.pairs), config)
    every = config.eval_every or min(epoch, MAX_STEPS_BETWEEN_CHECKS)
    return step == total_steps or step % every == 0


@torch.no_grad()
def evaluate(model: Any, dataset: Dataset, lm: LoadedModel, config: TrainConfig) -> dict:
    """Loss and implicit-reward metrics of the current policy on held-out pairs (`eval/...`)."""
    was_training = model.training
    model.eval()
    parts = []
    for indices in eval_batches(dataset, config):
        batch = make_batch(dataset, indices, lm, config)
        parts.append(batch_losses(model, batch, dataset, config)[1])
    model.train(was_training)
    return reward_metrics(parts, prefix="eval/")


def evaluate_point(
    model: Any,
    dataset: Dataset,
    lm: LoadedModel,
    config: TrainConfig,
    on_eval: EvalHook | None,
    reference: Reference | None = None,
) -> dict[str, float]:
    """Everything measured at an evaluation point: held-out reward metrics, the KL readout
    (from `reference`, default the base) and the caller's own `on_eval` metrics. A set of
    readout prompts alone (no held-out pairs) gives the KL readout and `on_eval` only."""
    metrics = evaluate(model, dataset, lm, config) if dataset.pairs else {}
    if config.kl_prompts > 0:
        metrics.update(kl_readout(model, dataset, lm, config, reference))
    if on_eval is not None:
        model.eval()
        metrics.update(on_eval(model))
        model.train()
    return metrics


def kl_readout(
    model: Any,
    dataset: Dataset,
    lm: LoadedModel,
    config: TrainConfig,
    reference: Reference | None = None,
) -> dict:
    """Monte Carlo KL(policy || reference) per answer over `kl_prompts` answers, sampled from
    the held-out prompts (or `dataset.readout_prompts`): each in turn, so a few distinct
    prompts still give that many answers, or evenly spaced ones when there are more
    (`eval/kl`, its standard error `eval/kl_stderr`); the same seed at every point. The
    reference is the base model (adapter disabled), or after an SFT stage the SFT'd model,
    DPO's own reference: the guard bounds the drift DPO adds, so SFT's sharpening alone
    does not stop DPO at its first check (docs/loop.md)."""
    own = dataset.readout_prompts or [p.prompt_ids for p in dataset.pairs]
    prompts = spread(list(dict.fromkeys(tuple(p) for p in own)), config.kl_prompts)
    completions = sample_from_ids(
        lm,
        model,
        [list(p) for p in prompts],
        max_new_tokens=config.kl_max_new_tokens,
        seed=config.seed,
        batch_size=config.batch_size * 4,
    )
    estimate = kl_from_completions(lm, model, completions, reference)
    return {"eval/kl": estimate.kl, "eval/kl_stderr": estimate.stderr}


def spread(items: list[Any], n: int) -> list[Any]:
    """n of `items`: each in turn when there are at most n, else n evenly spaced ones."""
    if not items:
        return []
    if len(items) <= n:
        return [items[i % len(items)] for i in range(n)]
    return [items[i * len(items) // n] for i in range(n)]


def make_guard(
    eval_set: Dataset | None, config: TrainConfig
) -> tuple[Guard | KLGuard | None, str | None]:
    """The full guard with enough held-out pairs; the KL-only guard with fewer, when there
    are prompts to read KL on; else None and why there is no guard."""
    if not config.early_stopping:
        return None, "early_stopping is off"
    n = len(eval_set.pairs) if eval_set is not None else 0
    kl = f"KL on {readout_words(eval_set)}" if config.kl_prompts else "no KL readout"
    if n >= config.min_heldout_pairs:
        reads = f"Guard: held-out reward accuracy on {n} pairs and {kl}"
        return Guard(config.kl_ceiling, config.patience, reads), None
    too_few = f"{n} held-out pairs, fewer than the {config.min_heldout_pairs} it needs"
    if config.kl_prompts == 0:
        return None, f"{too_few}, and the KL readout is off (kl_prompts = 0)"
    if readout_prompt_count(eval_set) == 0:
        return None, (
            f"{too_few} (label more pairs or raise the held-out fraction), and no prompts to "
            "read KL on: import a few prompts that are not labeled"
        )
    reads = (
        f"KL-only guard ({n} held-out pairs, fewer than the {config.min_heldout_pairs} the "
        f"accuracy guard needs): {kl}, ceiling {config.kl_ceiling:g} nats"
    )
    return KLGuard(config.kl_ceiling, config.patience, reads), None


def readout_prompt_count(eval_set: Dataset | None) -> int:
    """Distinct prompts the KL readout samples from."""
    if eval_set is None:
        return 0
    own = eval_set.readout_prompts or [p.prompt_ids for p in eval_set.pairs]
    return len({tuple(p) for p in own})


def readout_words(eval_set: Dataset | None) -> str:
    """What the KL readout samples from, in words: "5 prompts not trained on"."""
    n = readout_prompt_count(eval_set)
    if eval_set is not None and eval_set.readout_prompts:
        return f"{n} prompt{'s' if n != 1 else ''} not trained on"
    return f"the held-out pairs' {n} prompt{'s' if n != 1 else ''}"


def eval_point(step: int, metrics: dict[str, float]) -> EvalPoint:
    return EvalPoint(
        step=step,
        accuracy=metrics.get("eval/rewards/accuracies"),
        loss=metrics.get("eval/loss"),
        kl=metrics.get("eval/kl"),
    )
