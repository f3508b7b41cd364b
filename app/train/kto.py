"""What a run with the loss type `kto` trains on: every verdict and vote as KTO's unpaired rows.

KTO (dpo_core's `kto` loss) learns from single answers labelled desirable or undesirable, so a
`kto` run reads `storage.verdicts.kto_rows` instead of preference pairs: thumbs up / down on
single answers, A/B votes (winner desirable, loser undesirable), both-bad votes (both
undesirable); ties give nothing. The run's choice of whose votes to read (left-out annotators,
AI judges) applies; its choice of majority / unanimous does not (each vote counts on its own).

Nothing is held out of the rows (the held-out evaluation compares pairs); the KL readout samples
the `heldout` split's prompts, as for pairs.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.train.pairs import StoredPairs, stored_pairs
from storage import repo
from storage.selection import VoteSelection
from storage.verdicts import KtoSet, kto_rows

KTO = "kto"  # the loss type that trains on KTO rows


def stored_kto(s: Session, selection: VoteSelection | None = None) -> StoredPairs:
    """The `train` split's KTO rows (`{prompt, completion, label}`) in a run's shape: all of
    them train, none held out; ties, empty answers and votes not read are counted."""
    found = kto_rows(s, split="train", selection=selection)
    return StoredPairs(
        train=[row.trl() for row in found.rows],
        heldout=[],
        ties=found.ties,
        both_bad=0,  # both-bad votes train here (both answers undesirable)
        empty=found.empty,
        undecided=0,
        left_out=found.left_out,
        readout_prompts=[p.text for p in repo.list_prompts(s, split="heldout")],
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
        return stored_kto(s, selection)
    return stored_pairs(s, heldout_fraction, min_heldout, selection)


def kto_summary(s: Session, selection: VoteSelection | None = None) -> KtoSet:
    """The `train` split's KTO rows, for the Train tab's count line."""
    return kto_rows(s, split="train", selection=selection)


def no_kto_message(ties: int) -> str:
    """Why a `kto` run cannot start: no verdict or vote gives a row."""
    extra = f" ({ties} ties give none)" if ties else ""
    return (
        f'No KTO votes yet{extra}. In the Label tab choose "Answers to judge: 1" and judge '
        "answers 👍 / 👎 (keys U / D), or vote on pairs (A/B, both bad), then click Train again."
    )
