"""What a run would train on, counted before it starts: the training rows (pairs, or KTO rows)
the request's choice of votes and rounds picks, read once per start and used for every check
and number that follows (refusals, the run's saved config, the start message, how many prompts
its KL readout reads on); and the same counts for the Train tab's summary line.

The worker reads the rows again when it runs (`app.train.worker.read_job`, the same functions):
the preflight's numbers are what the run is expected to see, the worker's what it saw."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.orm import Session

from app.train.kto import KTO, kto_summary, no_kto_message, training_rows
from app.train.pairs import StoredPairs
from app.train.request import TrainRequest, build_train_config, config_default
from app.train.round_text import made_round_size
from app.train.run_inputs import kl_readout_prompts, sft_examples
from app.train.status import NUM_READOUT_PROMPTS
from storage import repo
from storage.rounds import counts_text, no_parent_pairs_message
from storage.selection import DEFAULT_TRAIN_ON, VoteSelection


@dataclass(frozen=True)
class Preflight:
    """One start's reading of storage: what the run would train on, and from which version."""

    request: TrainRequest
    parent: Any  # the version the run continues from (storage's ModelVersion)
    selection: VoteSelection  # which votes and rounds train
    rows: StoredPairs  # the training rows, split as the run splits them
    readout_prompts: int  # prompts the KL readout would read on (run_inputs.kl_readout_prompts)
    unknown: list[str]  # "leave out" names without a vote

    @property
    def counts(self) -> dict[str, Any]:
        return counts_of(self.rows)


def preflight(s: Session, request: TrainRequest, parent: Any) -> Preflight:
    """Read what a run continuing from `parent` would train on, once."""
    selection = round_selection(request, parent.id)
    min_heldout = config_default("min_heldout_pairs")
    rows = training_rows(s, request.loss_type, request.heldout_fraction, min_heldout, selection)
    return Preflight(
        request=request,
        parent=parent,
        selection=selection,
        rows=rows,
        readout_prompts=len(kl_readout_prompts(s, rows, min_heldout)),
        unknown=repo.unknown_annotators(s, selection),
    )


def refusal(s: Session, pre: Preflight) -> str | None:
    """Why the run cannot start on what the preflight found (None: it can)."""
    counts, request = pre.counts, pre.request
    if counts["usable"] == 0:
        parent_name = pre.parent.name if request.train_on == "parent" else None
        if request.loss_type == KTO:
            return no_kto_message(counts["ties"], parent_name)
        return no_pairs_message(counts, parent_name)
    return sft_problem(s, request, pre.rows)


def run_config(pre: Preflight, base_model: str, model_settings: dict[str, Any]) -> dict[str, Any]:
    """Everything the worker needs, saved with the run: the resolved TrainConfig (model,
    hyperparameters, the adapter to continue from), the held-out split, which votes and
    rounds train, provenance (the pairs per version whose answers they compare), and how many
    prompts the KL readout is expected to read on."""
    request, counts = pre.request, pre.counts
    return {
        "base_model": base_model,
        "train": build_train_config(request, model_settings, pre.parent.adapter_path),
        "heldout_fraction": request.heldout_fraction,
        "continue_from_active": request.continue_from_active,
        "votes": pre.selection.to_dict(),
        "sft": request.sft(),
        "parent_version": pre.parent.name,
        "num_train_pairs": counts["train"],
        "num_heldout_pairs": counts["heldout"],
        NUM_READOUT_PROMPTS: pre.readout_prompts,
        "pairs_by_version": counts["by_version"],
    }


def started_message(run_id: int, pre: Preflight) -> str:
    """`Run #3 started on 40 pairs (4 held out; 40 on v2's answers).` and a note on unknown
    names to leave out."""
    counts = pre.counts
    what = "KTO rows" if pre.request.loss_type == KTO else "pairs"
    by_version = f"; {counts_text(counts['by_version'])}" if counts["by_version"] else ""
    return (
        f"Run #{run_id} started on {counts['train']} {what} ({counts['heldout']} held out"
        f"{by_version})." + unknown_note(pre.unknown)
    )


def summary_counts(
    s: Session, active: Any, parent: Any, selection: VoteSelection | None = None
) -> dict[str, Any]:
    """Counts for the Train tab's summary line: the pairs `selection` (default: the default
    choice) picks, a round counted from `parent`; the KTO rows; the pairs labeled on the
    `active` version's answers and the size of the round that made it."""
    selection = selection or VoteSelection()
    fraction = config_default("heldout_fraction")
    if selection.train_on != DEFAULT_TRAIN_ON and selection.parent_id is None:
        selection = replace(selection, parent_id=parent.id)
    counts = pair_counts(s, fraction, selection)
    kto = kto_summary(s, selection)
    own = replace(selection, train_on="parent", parent_id=active.id)
    return {
        "kto_rows": len(kto.rows),  # what the loss type `kto` trains on
        "kto_desirable": kto.desirable,
        "usable_pairs": counts["usable"],
        "ties": counts["ties"],
        "both_bad": counts["both_bad"],
        "undecided": counts["undecided"],
        "left_out": counts["left_out"],
        "include_self": selection.include_self,
        "self_labels": counts["self_labels"],
        "overridden": counts["overridden"],
        "active_version": active.name,
        "train_on": selection.train_on,
        "round_parent": parent.name,
        "on_active": pair_counts(s, fraction, own)["usable"],
        "made_by_run": active.training_run_id,
        "round_size": made_round_size(s, active),
    }


def pair_counts(
    s: Session,
    heldout_fraction: float,
    selection: VoteSelection | None = None,
    loss_type: str = "",
) -> dict[str, Any]:
    """Usable pairs (from the votes and rounds `selection` picks; KTO rows for the loss type
    `kto`), how a run would split them, and what does not train (`counts_of`)."""
    min_heldout = config_default("min_heldout_pairs")
    return counts_of(training_rows(s, loss_type, heldout_fraction, min_heldout, selection))


def counts_of(pairs: StoredPairs) -> dict[str, Any]:
    """Usable rows, how a run splits them, and what does not train: ties / both-bad, pairs of
    answers without agreement, votes left out; `by_version`: the usable pairs per version whose
    answers they compare (none for KTO rows)."""
    return {
        "usable": len(pairs.train) + len(pairs.heldout),
        "train": len(pairs.train),
        "heldout": len(pairs.heldout),
        "ties": pairs.ties,
        "both_bad": pairs.both_bad,
        "empty": pairs.empty,
        "undecided": pairs.undecided,
        "left_out": pairs.left_out,
        "by_version": pairs.by_version,
        "self_labels": pairs.self_labels,
        "overridden": pairs.overridden,
    }


def round_selection(request: TrainRequest, parent_id: int) -> VoteSelection:
    """The request's choice of votes and rounds for a run continuing from `parent_id` (a run
    on all pairs records no parent: its record reads as before rounds had a name)."""
    return request.selection(None if request.train_on == DEFAULT_TRAIN_ON else parent_id)


def sft_problem(s: Session, request: TrainRequest, pairs: StoredPairs) -> str | None:
    """Why the SFT stage the request asks for has nothing to train on (None: it has, or
    there is no SFT stage); `pairs`: the run's training rows."""
    if not any(request.sft().values()):
        return None
    if sft_examples(s, pairs, **request.sft()):
        return None
    return (
        "SFT on rewrites is on, but no training pair has a rewrite yet: write a better answer "
        "in the Label tab (or turn on SFT on chosen answers too), or turn SFT on rewrites off."
    )


def unknown_note(unknown: list[str]) -> str:
    """Said when "leave out" names someone with no votes: the run goes on, nothing is left out
    for them (a typo should not block training, but should not pass unseen either)."""
    if not unknown:
        return ""
    return f" Nobody named {', '.join(map(repr, unknown))} has voted: nothing left out for them."


def no_pairs_message(counts: dict[str, Any], parent: str | None = None) -> str:
    """Why Train found nothing to train on; `parent`: the run trains on that version's answers
    only (train on parent)."""
    if parent is not None:
        return no_parent_pairs_message(parent)
    ties, bad, empty = (counts.get(k, 0) for k in ("ties", "both_bad", "empty"))
    extra = f" ({ties} ties and {bad} both-bad votes are not usable for DPO)" if ties or bad else ""
    if empty:
        extra += f" ({empty} votes beside an empty answer cannot train)"
    return (
        "No usable preference pairs yet" + extra + ". Label some pairs in the Label tab "
        "(pick A or B, or write a better answer), or import pairs with "
        "`python -m storage import-pairs FILE`, then click Train again."
    )
