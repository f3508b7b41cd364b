"""What a training run reads from storage beside its pairs: the prompts its KL readout samples
and the examples of its SFT stage. The Train service (checks before a run) and the worker (the
run itself) both read them here, from the pairs `app.train.pairs.stored_pairs` gives."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.train.pairs import StoredPairs
from storage.models import Preference, Prompt

# Queue prompts never labeled that a KL readout may sample: enough to spread a readout's
# answers over (dpo_core's kl_prompts, 8 by default), few enough to tokenize at once.
MAX_UNLABELED_PROMPTS = 64


def kl_readout_prompts(s: Session, pairs: StoredPairs, min_heldout: int) -> list[str]:
    """The prompts a run reads KL on: the held-out ones (`pairs.readout_prompts`), and when
    there are fewer than `min_heldout` held-out pairs (a one-click run on a few pairs holds none
    out) also queue prompts never labeled, which no run trains on. Empty: nothing to read on,
    and the trainer's stop reason says so."""
    if len(pairs.heldout) >= min_heldout:
        return pairs.readout_prompts
    return list(dict.fromkeys([*pairs.readout_prompts, *unlabeled_prompts(s)]))


def unlabeled_prompts(s: Session, limit: int = MAX_UNLABELED_PROMPTS) -> list[str]:
    """Prompts of the `train` split without a single vote, oldest first."""
    labeled = select(Preference.prompt_id)
    query = (
        select(Prompt.text)
        .where(Prompt.split == "train", Prompt.id.not_in(labeled))
        .order_by(Prompt.id)
        .limit(limit)
    )
    return list(s.scalars(query))


def sft_examples(
    s: Session, pairs: StoredPairs, *, rewrites: bool = False, chosen: bool = False
) -> list[dict[str, Any]]:
    """The SFT stage's `{prompt, completion}` examples: the rewrites ("Write a better answer")
    that the run's training pairs use as their chosen answer (so the run's choice of votes and
    its held-out prompts apply to them as to the pairs), and with `chosen` every training
    pair's chosen answer (a `kto` run's: every desirable answer); each (prompt, answer) once,
    oldest vote first."""
    trained = [  # the answers a run trains toward: chosen ones, or KTO's desirable ones
        (p["prompt"], p["chosen"] if "chosen" in p else p["completion"])
        for p in pairs.train
        if "chosen" in p or p.get("label") is True
    ]
    found: list[tuple[str, str]] = []
    if rewrites:
        query = (
            select(Prompt.text, Preference.rewrite)
            .join(Prompt, Prompt.id == Preference.prompt_id)
            .where(Preference.rewrite.is_not(None))
            .order_by(Preference.id)
        )
        used = set(trained)
        found += [(p, r) for p, r in s.execute(query).tuples() if (p, r) in used]
    if chosen:
        found += trained
    return [{"prompt": p, "completion": c} for p, c in dict.fromkeys(found)]
