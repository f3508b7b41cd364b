"""The preference pairs a training run uses, read from storage: the one place that turns the
database's votes into `{prompt, chosen, rejected}` pairs split into train and held out. The Train
service (pair counts before a run), the worker (the run itself) and the Compare tab (held-out
pairs for the reward evaluation) all read pairs through it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from dpo_core.heldout import split_pairs
from storage import repo
from storage.selection import VoteSelection


@dataclass(frozen=True)
class StoredPairs:
    """The database's usable pairs as a run splits them, and the votes DPO cannot use."""

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    ties: int
    both_bad: int
    empty: int  # A/B votes where an answer is empty: a model can say nothing; DPO needs text
    undecided: int  # pairs of answers whose votes do not agree enough (majority, unanimous)
    left_out: int  # votes not read: left-out annotators, AI judges unless included
    readout_prompts: list[str]  # the KL readout's: held-out pairs' and `heldout` split prompts


def stored_pairs(
    s: Session,
    heldout_fraction: float,
    min_heldout: int,
    selection: VoteSelection | None = None,
) -> StoredPairs:
    """Pairs from the votes `selection` picks (default: the majority of human votes per pair of
    answers; storage/selection.py). Pairs of the `heldout` split plus a stable share of the
    `train` split are held out (`dpo_core.heldout.split_pairs`); ties and both-bad votes are
    counted, not used. The KL readout
    samples the held-out pairs' prompts and every prompt of the `heldout` split, also those
    without a usable pair (docs/defaults.md: a readout on the prompts with pairs only can
    stop a run on the few prompts that moved most)."""
    train_set = repo.preference_pairs(s, split="train", selection=selection)
    heldout_set = repo.preference_pairs(s, split="heldout", selection=selection)
    usable = [as_pair(p) for p in train_set.pairs if has_text(p)]
    train, heldout = split_pairs(usable, heldout_fraction, min_heldout)
    heldout += [as_pair(p) for p in heldout_set.pairs if has_text(p)]
    empty = len(train_set.pairs) + len(heldout_set.pairs) - len(train) - len(heldout)
    split_prompts = [p.text for p in repo.list_prompts(s, split="heldout")]
    return StoredPairs(
        train=train,
        heldout=heldout,
        ties=train_set.excluded_ties + heldout_set.excluded_ties,
        both_bad=train_set.excluded_both_bad + heldout_set.excluded_both_bad,
        empty=empty,
        undecided=train_set.undecided + heldout_set.undecided,
        left_out=train_set.left_out + heldout_set.left_out,
        readout_prompts=list(dict.fromkeys([*(p["prompt"] for p in heldout), *split_prompts])),
    )


def has_text(pair: Any) -> bool:
    """Both answers say something (a vote for an empty answer's rival is real, but the pair
    cannot train: every run on it would fail at the pair check)."""
    return bool(pair.chosen.strip()) and bool(pair.rejected.strip())


def as_pair(pair: Any) -> dict[str, Any]:
    return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
