"""The words of the loop label -> train -> label the new version (storage/rounds.py holds
its data): how big a run's round was, the invitation to the next round, and a run's lineage
and pairs by version in the run history."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from storage import runs
from storage.rounds import Lineage, counts_text
from storage.selection import DEFAULT_TRAIN_ON


def round_size(config: dict[str, Any], num_pairs: int) -> int:
    """How many pairs a run used on its parent's answers (its round), else all it used."""
    by_version = config.get("pairs_by_version") or {}
    return int(by_version.get(config.get("parent_version"), 0)) or num_pairs


def made_round_size(s: Session, version: Any) -> int | None:
    """The round size of the run that made `version` (None: not made by a run here)."""
    if version.training_run_id is None:
        return None
    run = runs.get_run(s, version.training_run_id)
    return round_size(run.config or {}, run.num_pairs)


def next_round_text(version: str, size: int, labeled: int | None = None) -> str:
    """The invitation to the next round, after a run made `version`."""
    so_far = "" if labeled is None else f" ({labeled} so far)"
    return (
        f"{version} is now serving in Label: label ~{size} pairs of its answers{so_far}, then "
        "train again continuing from it (Advanced: train on parent)."
    )


def round_columns(s: Session, run: Any, lineage: Lineage) -> dict[str, Any]:
    """A run's lineage (`v3 ← v2 ← v1 ← base`; a run that made no version: `from v2 ← ...`),
    what it trained on, and the pairs it used per version whose answers they compare."""
    config = run.config or {}
    made = runs.output_version(s, run.id) if run.status == "succeeded" else None
    if made is not None:
        text = lineage.text(made.id)
    elif run.parent_version_id is not None:
        text = "from " + lineage.text(run.parent_version_id)
    else:
        text = ""
    by_version = config.get("pairs_by_version") or {}
    return {
        "lineage": text,
        "train on": (config.get("votes") or {}).get("train_on", DEFAULT_TRAIN_ON),
        "pairs by version": by_version,
        "pairs used": counts_text(by_version),
    }


def invitation(run: Any, version: str | None) -> str:
    """After a run made `version`: the invitation to the next round (storage/rounds.py)."""
    if run.status != "succeeded" or not version:
        return ""
    return " " + next_round_text(version, round_size(run.config or {}, run.num_pairs))
