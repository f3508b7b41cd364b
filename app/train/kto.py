"""What a run with the loss type `kto` trains on: every verdict and vote as KTO's unpaired rows.

KTO (dpo_core's `kto` loss) learns from single answers labelled desirable or undesirable, so a
`kto` run reads `storage.verdicts.kto_rows` instead of preference pairs: thumbs up / down on
single answers, A/B votes (winner desirable, loser undesirable), both-bad votes (both
undesirable); ties give nothing. The run's choice of whose votes to read (left-out annotators,
AI judges) applies, and so does its choice of rounds (train on parent / all / newest, each
answer on the version of the vote or verdict: storage/rounds.py); its choice of majority /
unanimous does not (each vote counts on its own).

Rows are held out as pairs are (the same prompts), so a `kto` run has the same evaluation, KL
readout and guard as a pair run.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.train.pairs import StoredPairs, stored_pairs
from dpo_core.heldout import split_pairs
from storage import repo
from storage.selection import VoteSelection
from storage.verdicts import KtoSet, kto_rows

KTO = "kto"  # the loss type that trains on KTO rows


def stored_kto(
    s: Session,
    heldout_fraction: float,
    min_heldout: int,
    selection: VoteSelection | None = None,
) -> StoredPairs:
    """The KTO rows (`{prompt, completion, label}`) in a run's shape, held out as pairs are:
    rows of the `heldout` split, and of the prompts `dpo_core.heldout.split_pairs` holds out
    (the same prompts as a pair run's); ties, empty answers and votes not read are counted."""
    train_set = kto_rows(s, split="train", selection=selection)
    heldout_set = kto_rows(s, split="heldout", selection=selection)
    rows = [row.trl() for row in train_set.rows]
    train, heldout = split_pairs(rows, heldout_fraction, min_heldout)
    heldout += [row.trl() for row in heldout_set.rows]
    split_prompts = [p.text for p in repo.list_prompts(s, split="heldout")]
    return StoredPairs(
        train=train,
        heldout=heldout,
        ties=train_set.ties + heldout_set.ties,
        both_bad=0,  # both-bad votes train here (both answers undesirable)
        empty=train_set.empty + heldout_set.empty,
        undecided=0,
        left_out=train_set.left_out + heldout_set.left_out,
        other_versions=train_set.other_versions + heldout_set.other_versions,
        readout_prompts=list(dict.fromkeys([*(r["prompt"] for r in heldout), *split_prompts])),
    )


def training_rows(
    s: Session,
    loss_type: str,
    heldout_fraction: float,
    min_heldout: int,
    selection: VoteSelection | None = None,
) -> StoredPairs:
    """What a run with `loss_type` trains on: KTO rows for `kto`, else preference pairs."""
    if loss_type == KTO:
        return stored_kto(s, heldout_fraction, min_heldout, selection)
    return stored_pairs(s, heldout_fraction, min_heldout, selection)


def kto_summary(s: Session, selection: VoteSelection | None = None) -> KtoSet:
    """Every KTO row (both splits, as a run would read them), for the Train tab's count line."""
    return kto_rows(s, split=None, selection=selection)


def no_kto_message(ties: int, parent: str | None = None) -> str:
    """Why a `kto` run cannot start: no verdict or vote gives a row (`parent`: none on that
    version's answers, for a run that trains on its parent's answers only)."""
    if parent is not None:
        return (
            f"No KTO votes on {parent}'s answers yet: judge its answers in the Label tab "
            "(👍 / 👎, or A/B votes), or choose train on: all."
        )
    extra = f" ({ties} ties give none)" if ties else ""
    return (
        f'No KTO votes yet{extra}. In the Label tab choose "Answers to judge: 1" and judge '
        "answers 👍 / 👎 (keys U / D), or vote on pairs (A/B, both bad), then click Train again."
    )
