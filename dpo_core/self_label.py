"""Self-labels: a trained version labels pairs of its own answers, only where it is shown to
agree with people on its own answers.

After round K a version vK judges the *base* model's answers well, but its margins on its own
answers are mostly noise until it has moved from the base (issue 27: 0.57 accuracy on v1's own
answers, 0.46 on its surest quarter). So a scorer earns trust only from people's labels of
vK's own answers (`calibrate`): its agreement with them among the pairs it is surest of, for
every margin; self-labels are kept only at or above the smallest margin where that agreement
is at least `TARGET_AGREEMENT`, and none at all when no margin reaches it or there are too few
such labels. Sure of nothing is a valid answer, said in words.

Scorers (signed margins: > 0 means the first answer is the better one), from the summed
completion log-probs of the version (policy) and of the base (reference, adapter disabled):
- `margin`: DPO's implicit-reward margin, (pi_a - ref_a) - (pi_b - ref_b), beta-free;
- `per-token`: the same log-ratios divided by each answer's token count (length-normalised);
- `centered`: the margin less the version's mean per-token log-ratio times the length
  difference, so a version that shifts every token alike does not prefer long answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpo_core import data
from dpo_core.modeling import LoadedModel
from dpo_core.reward_eval import pair_logps

logger = logging.getLogger(__name__)

SCORERS = ("margin", "per-token", "centered")
# A scorer is trusted at a margin only where it agrees with people this often at or above it.
TARGET_AGREEMENT = 0.9
# Fewer people's labels of the version's own answers than this say nothing about a scorer.
MIN_CALIBRATION_PAIRS = 8
# The surest pairs that set a threshold must number at least this many.
MIN_SUPPORT = 5


@dataclass(frozen=True)
class AnswerPair:
    """Two answers to one prompt; `first`/`second` carry no verdict until scored."""

    prompt: str
    first: str
    second: str


@dataclass(frozen=True)
class LogRatios:
    """Per pair (n,): the version's log-ratio to the base of each answer, summed over its
    tokens, and each answer's token count."""

    first: Tensor
    second: Tensor
    first_tokens: Tensor
    second_tokens: Tensor


@dataclass(frozen=True)
class Threshold:
    """The margin above which a scorer's labels are kept (None: none are), and the evidence."""

    value: float | None
    agreement: float | None  # people's agreement among the calibration pairs at or above it
    support: int  # calibration pairs at or above it
    calibration_pairs: int
    reason: str  # in words, for the log, the CLI and the Train tab


@dataclass(frozen=True)
class SelfLabel:
    """One kept pair: chosen is the answer the scorer preferred, by `margin` (> 0)."""

    prompt: str
    chosen: str
    rejected: str
    margin: float
    weight: float

    def row(self, scorer: str, version: str) -> dict[str, Any]:
        """A TRL pair row that `python -m dpo_core train --pairs` reads as is."""
        return {
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "margin": round(self.margin, 6),
            "weight": self.weight,
            "scorer": scorer,
            "annotator": f"self:{version}",
        }


def check_scorer(name: str) -> str:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}: choose one of {', '.join(SCORERS)}")
    return name


@torch.no_grad()
def log_ratios(lm: LoadedModel, pairs: list[AnswerPair], *, max_length: int = 1024) -> LogRatios:
    """The active adapter's log-ratios to the base on both answers of every pair, in order.

    `lm.model` is a PeftModel; the reference is the same model with its adapter disabled."""
    rows = [{"prompt": p.prompt, "chosen": p.first, "rejected": p.second} for p in pairs]
    tokenized = [
        data.truncate_pair(data.tokenize_pair(lm.tokenizer, row), max_length, max_length // 2)
        for row in data.normalise_pairs(rows)
    ]
    policy = pair_logps(lm, lm.model, tokenized, batch_size=4)
    with lm.model.disable_adapter():
        reference = pair_logps(lm, lm.model, tokenized, batch_size=4)
    return LogRatios(
        first=policy[0] - reference[0],
        second=policy[1] - reference[1],
        first_tokens=torch.tensor([max(len(t.chosen_ids), 1) for t in tokenized]),
        second_tokens=torch.tensor([max(len(t.rejected_ids), 1) for t in tokenized]),
    )


def margins(ratios: LogRatios, scorer: str) -> Tensor:
    """Signed margins (n,) under `scorer`: > 0 means the first answer is preferred."""
    if scorer == "margin":
        return ratios.first - ratios.second
    if scorer == "per-token":
        return ratios.first / ratios.first_tokens - ratios.second / ratios.second_tokens
    if scorer == "centered":
        tokens = ratios.first_tokens + ratios.second_tokens
        mean = (ratios.first + ratios.second).sum() / tokens.sum()  # per-token log-ratio
        length_gap = (ratios.first_tokens - ratios.second_tokens).float()
        return ratios.first - ratios.second - mean * length_gap
    raise ValueError(f"unknown scorer {scorer!r}: choose one of {', '.join(SCORERS)}")


def calibrate(agreeing: list[float], target: float = TARGET_AGREEMENT) -> Threshold:
    """The threshold from people's labels of the version's own answers.

    `agreeing[i]` is the scorer's margin on calibration pair i signed so that > 0 means it
    agrees with the person (the person's chosen answer put first). Among the pairs the scorer
    is surest of (largest |margin|), the agreement at each size k is the share with a positive
    margin; the threshold is the smallest |margin| whose top-k reach `target` with k >=
    MIN_SUPPORT. None (with the reason in words) when too few labels or no margin qualifies."""
    n = len(agreeing)
    if n < MIN_CALIBRATION_PAIRS:
        reason = (
            f"only {n} people's label{'s' if n != 1 else ''} of this version's own answers; "
            f"at least {MIN_CALIBRATION_PAIRS} are needed to trust its labels"
        )
        return Threshold(None, None, 0, n, reason)
    ranked = sorted(agreeing, key=abs, reverse=True)
    best: Threshold | None = None
    agree = 0
    for k, margin in enumerate(ranked, 1):
        agree += margin > 0
        if k >= MIN_SUPPORT and agree / k >= target:
            reason = (
                f"agrees with people on {agree} of the {k} labeled pairs with margin >= "
                f"{abs(margin):.3g} ({agree / k:.0%})"
            )
            best = Threshold(abs(margin), agree / k, k, n, reason)
    if best is None:
        overall = sum(m > 0 for m in agreeing) / n
        reason = (
            f"no margin where it agrees with people {target:.0%} of the time on this version's "
            f"own answers (overall {overall:.0%} of {n}): no self-labels"
        )
        return Threshold(None, None, 0, n, reason)
    return best


def labelable(pair: AnswerPair) -> bool:
    """Two different, non-empty answers: anything else carries no preference to label (a
    model may end an answer at once, with no text)."""
    first, second = pair.first.strip(), pair.second.strip()
    return bool(first) and bool(second) and first != second


def keep_labels(
    pairs: list[AnswerPair], signed: Tensor, threshold: float, weight: float
) -> list[SelfLabel]:
    """The pairs whose |margin| reaches `threshold`, as labels with the preferred answer
    chosen; pairs that are not `labelable` are skipped."""
    kept = []
    for pair, margin in zip(pairs, signed.tolist(), strict=True):
        if not labelable(pair) or abs(margin) < threshold or margin == 0:
            continue
        chosen, rejected = (pair.first, pair.second) if margin > 0 else (pair.second, pair.first)
        kept.append(SelfLabel(pair.prompt, chosen, rejected, abs(margin), weight))
    return kept
