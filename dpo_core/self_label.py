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
  difference, so a version that shifts every token alike does not prefer long answers;
- `reward-model`: a linear Bradley-Terry head on the *base* model's hidden states (the last
  layer, mean-pooled over the answer's tokens and at the last token, concatenated and
  standardized with the fit set's mean and std), fitted on people's pairs by L2-regularized
  logistic regression on the feature differences (`fit_reward_head`); its margin is the
  difference of the two answers' scores. It does not need the version to have moved from the
  base (issue 27: 0.78 on v1's own answers where the implicit margins were at chance).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpo_core import data
from dpo_core.fast_llama import base_model_of
from dpo_core.modeling import LoadedModel
from dpo_core.reward_eval import pair_logps

logger = logging.getLogger(__name__)

IMPLICIT_SCORERS = ("margin", "per-token", "centered")  # from the version's log-ratios
REWARD_MODEL = "reward-model"  # a head fitted on people's pairs (`fit_reward_head`)
SCORERS = (*IMPLICIT_SCORERS, REWARD_MODEL)
# The reward head's L2 penalty, lambda / 2 * |w|^2 added to the mean logistic loss (standardized
# features: with few pairs and many features it keeps the head from fitting their noise).
REWARD_L2 = 0.1
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
    if scorer == REWARD_MODEL:
        raise ValueError("the reward-model scorer reads no log-ratios: use signed_margins")
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


# --- the reward-model scorer ---------------------------------------------------------------


@dataclass(frozen=True)
class RewardHead:
    """A linear Bradley-Terry head on standardized answer features: score = w . (f - mean) / std."""

    mean: Tensor  # (F,)
    std: Tensor  # (F,)
    weight: Tensor  # (F,)
    fit_pairs: int
    fit_accuracy: float  # on the pairs it was fitted on

    def scores(self, features: Tensor) -> Tensor:
        """(n, F) features -> (n,) scores."""
        return ((features.double() - self.mean) / self.std) @ self.weight


@contextlib.contextmanager
def base_weights(model: Any) -> Iterator[Any]:
    """`model` with its adapter switched off (a plain model as it is)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


@torch.no_grad()
def answer_features(
    lm: LoadedModel, prompts: list[str], answers: list[str], *, max_length: int = 1024
) -> Tensor:
    """(n, 2H) float64: the base model's last hidden states over each prompt + answer (chat
    template), mean-pooled over the answer's tokens, then the sequence's last token."""
    decoder = base_model_of(lm.model).get_decoder()
    features = []
    with base_weights(lm.model):
        for prompt, answer in zip(prompts, answers, strict=True):
            reply = [{"role": "assistant", "content": answer}]
            row = {"prompt": [{"role": "user", "content": prompt}], "chosen": reply}
            full = data.tokenize_pair(lm.tokenizer, row | {"rejected": reply})
            pair = data.truncate_pair(full, max_length, max_length // 2)
            ids = torch.tensor([pair.prompt_ids + pair.chosen_ids], device=lm.device)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0].double()
            answer_states = hidden[len(pair.prompt_ids) :] if pair.chosen_ids else hidden[-1:]
            features.append(torch.cat([answer_states.mean(0), hidden[-1]]).cpu())
    return torch.stack(features)


def fit_reward_head(chosen: Tensor, rejected: Tensor, l2: float = REWARD_L2) -> RewardHead:
    """Fit w on people's pairs: minimise mean softplus(-w . (z_chosen - z_rejected)) +
    l2 / 2 |w|^2 (L-BFGS), z the features standardized with the fit set's mean and std."""
    if len(chosen) == 0 or chosen.shape != rejected.shape:
        raise ValueError("a reward head needs people's pairs: chosen and rejected features")
    both = torch.cat([chosen, rejected]).double()
    mean, std = both.mean(0), both.std(0, unbiased=False).clamp_min(1e-6)
    diff = ((chosen.double() - mean) - (rejected.double() - mean)) / std
    weight = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-diff @ weight).mean() + l2 / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w = weight.detach()
    accuracy = float(((diff @ w) > 0).double().mean())
    return RewardHead(mean, std, w, len(chosen), accuracy)


def fit_reward_model(lm: LoadedModel, people: list[AnswerPair]) -> RewardHead:
    """The reward head fitted on people's pairs (`first` = the answer the person chose)."""
    prompts = [p.prompt for p in people]
    chosen = answer_features(lm, prompts, [p.first for p in people])
    rejected = answer_features(lm, prompts, [p.second for p in people])
    head = fit_reward_head(chosen, rejected)
    logger.info("reward head: %d pairs, %.0f%% right on them", len(people), 100 * head.fit_accuracy)
    return head


def reward_margins(lm: LoadedModel, head: RewardHead, pairs: list[AnswerPair]) -> Tensor:
    """Signed margins (n,) of the reward head: score(first) - score(second)."""
    prompts = [p.prompt for p in pairs]
    first = head.scores(answer_features(lm, prompts, [p.first for p in pairs]))
    second = head.scores(answer_features(lm, prompts, [p.second for p in pairs]))
    return (first - second).float()


def signed_margins(
    lm: LoadedModel, pairs: list[AnswerPair], scorer: str, head: RewardHead | None = None
) -> Tensor:
    """Any scorer's signed margins (n,) on `pairs` (> 0: the first answer is preferred); the
    reward-model scorer needs its fitted `head`, the others the version's adapter on `lm`."""
    if check_scorer(scorer) == REWARD_MODEL:
        if head is None:
            raise ValueError("the reward-model scorer needs a head fitted on people's pairs")
        return reward_margins(lm, head, pairs)
    return margins(log_ratios(lm, pairs), scorer)
