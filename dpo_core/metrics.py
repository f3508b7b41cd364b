"""A run's metrics under TRL's names: per step, at evaluation points, and for the run.

`reward_metrics` turns the per-pair tensors of `dpo_core.objective.batch_losses` into TRL's
`loss`, `rewards/*` and `logps/*` (`eval/...` at evaluation points), summed over every rank's
pairs first; `final_metrics` summarises the steps of the weights kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dpo_core.distributed import Comm

REWARD_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)

# Sums over examples that the metrics are means of (`reward_metrics`); "chosen" and "rejected"
# are KTO's desirable and undesirable answers, "n/unpaired" counts KTO examples.
SUM_KEYS = (
    "loss", "n", "accurate", "rewards/chosen", "logps/chosen", "n/chosen",
    "rewards/rejected", "logps/rejected", "n/rejected", "kl", "n/unpaired",
)  # fmt: skip


def _part_sums(p: dict[str, Tensor]) -> list[Tensor]:
    """One batch's contribution to each of `SUM_KEYS`."""
    if "desirable" in p:  # KTO: an answer is "accurate" when its reward has its label's sign
        d, r, lp = p["desirable"].cpu(), p["rewards"].double().cpu(), p["logps"].double().cpu()
        n = torch.tensor(float(len(d)))
        accurate = torch.where(d, r > 0, r < 0).sum()
        kl = p["kl"].double().sum().cpu()
        return [p["loss"].double().sum().cpu(), n, accurate, r[d].sum(), lp[d].sum(), d.sum(),
                r[~d].sum(), lp[~d].sum(), (~d).sum(), kl, n]  # fmt: skip
    c, r = p["rewards/chosen"].double().cpu(), p["rewards/rejected"].double().cpu()
    lc, lr = p["logps/chosen"].double().cpu(), p["logps/rejected"].double().cpu()
    n, zero = torch.tensor(float(len(c))), torch.tensor(0.0)
    return [p["loss"].double().sum().cpu(), n, (c - r > 0).sum(), c.sum(), lc.sum(), n,
            r.sum(), lr.sum(), n, zero, zero]  # fmt: skip


def reward_metrics(
    parts: list[dict[str, Tensor]], prefix: str = "", comm: Comm | None = None
) -> dict[str, float]:
    """TRL's metrics, averaged over pairs (of every rank): loss, rewards/*, logps/*.

    For KTO, as TRL's KTOTrainer: rewards/chosen and logps/chosen average the desirable
    answers, */rejected the undesirable ones (0 when a batch has none), margins is their
    difference, and `kl` the mean reference point z0 (`eval/kto_kl` under evaluation, where
    `eval/kl` is the KL readout); rewards/accuracies is the share of answers whose implicit
    reward has the sign of their label.
    """
    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
    for p in parts:
        sums += torch.stack([v.double() for v in _part_sums(p)])
    (comm or Comm()).sum_(sums)
    s = dict(zip(SUM_KEYS, sums.tolist(), strict=True))

    def mean(key: str, count: str) -> float:
        return s[key] / s[count] if s[count] else 0.0

    out = {
        "loss": mean("loss", "n"),
        "rewards/chosen": mean("rewards/chosen", "n/chosen"),
        "rewards/rejected": mean("rewards/rejected", "n/rejected"),
        "rewards/accuracies": mean("accurate", "n"),
        "logps/chosen": mean("logps/chosen", "n/chosen"),
        "logps/rejected": mean("logps/rejected", "n/rejected"),
    }
    both = s["n/chosen"] and s["n/rejected"]
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"] if both else 0.0
    metrics = {prefix + k: out[k] for k in REWARD_METRICS}
    if s["n/unpaired"]:
        metrics[f"{prefix}kto_kl" if prefix else "kl"] = mean("kl", "n/unpaired")
    return metrics


def final_metrics(
    history: list[dict[str, float]], num_pairs: int, seconds: float, kept_step: int | None = None
) -> dict:
    """For the weights kept (the last step, or the guard's best `kept_step`): train means over
    that epoch's steps up to it and its evaluation; then run totals."""
    upto = [h for h in history if kept_step is None or h["step"] <= kept_step]
    last_epoch = math.ceil(upto[-1]["epoch"]) - 1
    steps = [h for h in upto if h["epoch"] > last_epoch]
    out = {k: sum(h[k] for h in steps) / len(steps) for k in REWARD_METRICS}
    out.update({k: v for k, v in upto[-1].items() if k.startswith("eval/")})
    out.update(
        num_pairs=num_pairs,
        kept_step=upto[-1]["step"],
        steps=len(history),
        epochs=history[-1]["epoch"],
        train_runtime_s=seconds,
        pairs_per_second=num_pairs * history[-1]["epoch"] / seconds,
    )
    return out


def sft_metrics(sft_history: list[dict[str, float]]) -> dict[str, float]:
    """The SFT stage in the final metrics: its last epoch's mean loss and its step count."""
    last_epoch = math.ceil(sft_history[-1]["sft/epoch"]) - 1
    steps = [h for h in sft_history if h["sft/epoch"] > last_epoch]
    return {
        "sft/loss": sum(h["sft/loss"] for h in steps) / len(steps),
        "sft_steps": len(sft_history),
    }
