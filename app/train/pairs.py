"""The preference pairs a training run uses, read from storage: the one place that turns the
database's votes into `{prompt, chosen, rejected}` pairs split into train and held out. The Train
service (pair counts before a run), the worker (the run itself) and the Compare tab (held-out
pairs for the reward evaluation) all read pairs through it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from dpo_core.heldout import split_pairs
from storage import repo
from storage.annotators import is_self
from storage.rounds import RoundPair, counts_by_version, has_text, select_round
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
    # usable pairs per version whose answers they compare (storage/rounds.py), the most first
    by_version: dict[str, int] = field(default_factory=dict)
    other_versions: int = 0  # pairs `train_on="parent"` leaves out: on other versions' answers
    self_labels: int = 0  # usable pairs from versions' own labels (`include_self`)
    overridden: int = 0  # versions' own labels not read: a person voted on the same answers


def stored_pairs(
    s: Session,
    heldout_fraction: float,
    min_heldout: int,
    selection: VoteSelection | None = None,
) -> StoredPairs:
    """Pairs from the votes `selection` picks (default: the majority of human votes per pair of
    answers; storage/selection.py), and of those the ones its `train_on` keeps (all; the
    parent version's answers only; all weighted toward the newest: storage/rounds.py). Pairs
    of the `heldout` split plus a stable share of the `train` split are held out
    (`dpo_core.heldout.split_pairs`); ties and both-bad votes are counted, not used. The KL
    readout samples the held-out pairs' prompts and every prompt of the `heldout` split, also
    those without a usable pair (docs/defaults.md: a readout on the prompts with pairs only
    can stop a run on the few prompts that moved most)."""
    selection = selection or VoteSelection()
    train_set = repo.preference_pairs(s, split="train", selection=selection)
    heldout_set = repo.preference_pairs(s, split="heldout", selection=selection)
    train_round = select_round(s, train_set.pairs, selection)
    heldout_round = select_round(s, heldout_set.pairs, selection)
    read = len(train_set.pairs) + len(heldout_set.pairs)
    kept = [r for r in train_round + heldout_round if has_text(r.pair)]
    weighted = selection.train_on == "newest"
    usable = [as_pair(r, weighted) for r in train_round if has_text(r.pair)]
    train, heldout = split_pairs(usable, heldout_fraction, min_heldout)
    heldout += [as_pair(r, weighted) for r in heldout_round if has_text(r.pair)]
    split_prompts = [p.text for p in repo.list_prompts(s, split="heldout")]
    return StoredPairs(
        train=train,
        heldout=heldout,
        ties=train_set.excluded_ties + heldout_set.excluded_ties,
        both_bad=train_set.excluded_both_bad + heldout_set.excluded_both_bad,
        empty=len(train_round) + len(heldout_round) - len(kept),
        undecided=train_set.undecided + heldout_set.undecided,
        left_out=train_set.left_out + heldout_set.left_out,
        readout_prompts=list(dict.fromkeys([*(p["prompt"] for p in heldout), *split_prompts])),
        by_version=counts_by_version(kept),
        other_versions=read - len(train_round) - len(heldout_round),
        self_labels=sum(is_self(r.pair.annotator) for r in kept),
        overridden=train_set.overridden + heldout_set.overridden,
    )


def as_pair(round_pair: RoundPair, weighted: bool = False) -> dict[str, Any]:
    """A training pair dict with its `weight` (the round's times a version's own label's:
    storage/rounds.py), which dpo_core's loss multiplies the pair's term by: always with
    `weighted` (train on newest), else when it is not 1 (a self-label's weight)."""
    pair = round_pair.pair
    out: dict[str, Any] = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    if weighted or round_pair.weight != 1.0:
        out["weight"] = round_pair.weight
    return out
