"""How sure a model version is between two answers to one prompt: the label queue's
"uncertain first" order asks people about the prompts where the version is least sure.

For an adapter version pi, DPO's implicit reward of an answer y is
r(y) = beta * (log pi(y|x) - log ref(y|x)), with ref the base (the adapter disabled). The margin
|r(a) - r(b)| between two answers is how strongly the version prefers one of them; a small
margin means it cannot tell them apart, so a person's vote there teaches it most (uncertainty
sampling, as in active learning). `beta` only scales the margins, so the order does not depend
on it; the default beta=1 gives the log-ratio margin in nats, as `reward_eval` reports it.

The base has no implicit reward: it is its own reference, so every margin would be 0. For the
base the measure is the difference in mean per-token log-prob, |mean log p(a) - mean log p(b)|:
how much likelier the base finds one answer than the other, per token (a sum would favour the
shorter answer for its length alone). The two measures have different scales; compare margins
of one version only (`Margins.measure` says which it is).

    margins = pair_margins(lm, [AnswerPair(prompt, a, b), ...], adapter="v2")
    margins.values  # one per pair, >= 0; identical answers give exactly 0
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from dpo_core import data
from dpo_core.kl import sample_completions
from dpo_core.modeling import LoadedModel
from dpo_core.reward_eval import log_ratio_margins, pair_logps

IMPLICIT_REWARD = "implicit_reward"  # an adapter: beta * |log-ratio(a) - log-ratio(b)|
MEAN_LOGP = "mean_logp"  # the base: |mean token log p(a) - mean token log p(b)|


@dataclass(frozen=True)
class AnswerPair:
    """Two answers to one prompt (a single user turn); their order does not matter."""

    prompt: str
    a: str
    b: str


@dataclass(frozen=True)
class Margins:
    """One margin per pair (>= 0, small = unsure), and which measure they are."""

    measure: str  # IMPLICIT_REWARD or MEAN_LOGP
    values: tuple[float, ...]


def pair_margins(
    lm: LoadedModel,
    pairs: list[AnswerPair],
    adapter: str | None,
    *,
    beta: float = 1.0,
    max_length: int = 512,
    batch_size: int = 4,
) -> Margins:
    """Margins of version `adapter` (a PEFT adapter loaded in `lm.model`; None = the base) on
    each pair, in the pairs' order. Answers are cut like training pairs (`max_length`, the
    prompt to half of it). The model's active adapter and train/eval mode are restored.

    Raises ValueError for beta <= 0 or an adapter that is not loaded.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_loaded(lm, adapter)
    tokenized = [_tokenize(lm, p, max_length) for p in pairs]
    differ = [i for i, t in enumerate(tokenized) if t.chosen_ids != t.rejected_ids]
    values = torch.zeros(len(pairs))  # identical answers: exactly 0, no forward pass
    measure = MEAN_LOGP if adapter is None else IMPLICIT_REWARD
    if differ:
        scored = [tokenized[i] for i in differ]
        if adapter is None:
            values[differ] = _mean_logp_margins(lm, scored, batch_size)
        else:
            values[differ] = beta * _log_ratio_margins(lm, scored, adapter, batch_size).abs()
    return Margins(measure, tuple(values.tolist()))


def same_answer(pair: AnswerPair) -> bool:
    """The two answers are one text: the version wrote its answer twice, so it is sure of it
    (its margin, 0, would say the opposite), and a person shown the pair could not choose."""
    return pair.a.strip() == pair.b.strip()


def least_sure_first(
    lm: LoadedModel,
    prompts: list[str],
    adapter: str | None,
    *,
    temperatures: tuple[float, float] = (0.7, 1.0),
    max_new_tokens: int = 128,
    seed: int = 0,
) -> list[int]:
    """Indices of `prompts`, the least sure first: two answers sampled from the version per
    prompt (one per temperature, `top_p` 1), ranked by `pair_margins`; prompts answered the
    same twice come last. The app's scorer does the same through the decode loop; this is
    the offline form, for benchmarks."""
    _check_loaded(lm, adapter)
    pairs = sample_pairs(lm, prompts, adapter, temperatures, max_new_tokens, seed)
    margins = pair_margins(lm, pairs, adapter).values
    return sorted(range(len(prompts)), key=lambda i: (same_answer(pairs[i]), margins[i], i))


def sample_pairs(
    lm: LoadedModel,
    prompts: list[str],
    adapter: str | None,
    temperatures: tuple[float, float],
    max_new_tokens: int,
    seed: int,
) -> list[AnswerPair]:
    """Two answers per prompt from version `adapter` (None: the base), one per temperature."""
    model = lm.model
    with _version_on(model, adapter):
        a, b = (
            sample_completions(
                lm, model, prompts, max_new_tokens=max_new_tokens, temperature=t, seed=seed + k
            )
            for k, t in enumerate(temperatures)
        )
    return [AnswerPair(p, x.text, y.text) for p, x, y in zip(prompts, a, b, strict=True)]


def _check_loaded(lm: LoadedModel, adapter: str | None) -> None:
    loaded = getattr(lm.model, "peft_config", None) or {}
    if adapter is not None and adapter not in loaded:
        raise ValueError(f"version {adapter!r} is not loaded (loaded: {sorted(loaded) or 'none'})")


@contextmanager
def _version_on(model: Any, adapter: str | None) -> Iterator[None]:
    """`model` answers as version `adapter` (None: the base, adapters disabled) inside the
    block; its active adapter is put back afterwards."""
    if adapter is None:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            yield
        return
    active = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(active)


def _tokenize(lm: LoadedModel, pair: AnswerPair, max_length: int) -> data.TokenizedPair:
    """`a` as the "chosen" completion and `b` as the "rejected" one (names of the layout only)."""
    chat = {
        "prompt": [{"role": "user", "content": pair.prompt}],
        "chosen": [{"role": "assistant", "content": pair.a}],
        "rejected": [{"role": "assistant", "content": pair.b}],
    }
    full = data.tokenize_pair(lm.tokenizer, chat)
    return data.truncate_pair(full, max_length, max_length // 2)


def _mean_logp_margins(
    lm: LoadedModel, pairs: list[data.TokenizedPair], batch_size: int
) -> torch.Tensor:
    """|mean token log p(a) - mean token log p(b)| (n,) under the base (adapters disabled)."""
    model = lm.model
    with _eval_mode(model), _version_on(model, None):
        logps_a, logps_b = pair_logps(lm, model, pairs, batch_size)
    lengths_a = torch.tensor([max(1, len(p.chosen_ids)) for p in pairs])
    lengths_b = torch.tensor([max(1, len(p.rejected_ids)) for p in pairs])
    return (logps_a / lengths_a - logps_b / lengths_b).abs()


def _log_ratio_margins(
    lm: LoadedModel, pairs: list[data.TokenizedPair], adapter: str, batch_size: int
) -> torch.Tensor:
    """(log pi(a) - log ref(a)) - (log pi(b) - log ref(b)), (n,), signed."""
    model = lm.model
    with _eval_mode(model):
        with _version_on(model, None):
            reference = pair_logps(lm, model, pairs, batch_size)
        with _version_on(model, adapter):
            policy = pair_logps(lm, model, pairs, batch_size)
    return log_ratio_margins(policy, reference)


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """No LoRA dropout while scoring; the model's mode is put back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
