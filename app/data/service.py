"""The Data tab's service: counts, importing prompts and preference pairs, exporting pairs.

A thin layer over `storage.io` (which reads and checks the files) and `storage.repo.store_stats`:
each import runs in one transaction, so a bad file or a refused write changes nothing, and every
error comes back as one message naming the file (by the name it was uploaded under) and the
problem.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from storage.db import StorageError, transaction
from storage.io import EXPORT_FORMATS, export_preferences, import_pairs, import_prompts
from storage.models import SPLITS
from storage.repo import preference_pairs, store_stats, unknown_annotators
from storage.selection import DEFAULT_VOTES, VOTE_MODES, VoteSelection

logger = logging.getLogger(__name__)

EXPORT_FILE_TYPES = (".jsonl", ".parquet")
EXPORT_SPLITS = ("all", *SPLITS)
IMPORT_ANNOTATOR = "import"  # the annotator recorded on imported pairs, as the CLI does


class DataError(ValueError):
    """An import or export that could not be done; the message says why and what to do."""


@dataclass(frozen=True)
class ImportOutcome:
    """What an import did: `added` new rows, `skipped` rows already there or unusable."""

    file: str
    added: int
    skipped: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DataService:
    """Imports, exports and counts on the app's database.

    `export_dir` is where export files are written, each in its own fresh subdirectory (the app
    passes a directory its file route serves, so the browser and API clients can download it).
    """

    def __init__(self, sm: sessionmaker[Session], export_dir: Path) -> None:
        self.sm = sm
        self.export_dir = Path(export_dir)

    def stats(self) -> dict[str, Any]:
        """Prompts per split, responses, and votes overall and per annotator (by choice, with
        the usable training pairs among them, each vote on its own), and the pairs a run trains
        on by default (the majority of human votes per pair of answers)."""
        with self.sm.begin() as s:
            stats = store_stats(s)
            trained = len(preference_pairs(s, split=None).pairs)
        return {
            "default_pairs": trained,  # what a run trains on by default: majority, no judges
            "prompts": dict(stats.prompts),
            "responses": stats.responses,
            "votes": asdict(stats.overall),
            "by_annotator": {name: asdict(c) for name, c in stats.by_annotator.items()},
        }

    def import_prompts(self, path: Path, *, split: str = "train", name: str = "") -> ImportOutcome:
        """Add a file's prompts (deduplicated, blank lines skipped) to `split`."""
        split = _checked(split, SPLITS, "split")
        name = name or path.name
        with _named_errors(path, name), transaction(self.sm, "The prompts") as s:
            result = import_prompts(s, path, split=split, source=name)
        skipped = result.duplicates + result.blank
        message = (
            f"{name}: {result.added} prompts added to {split}, {result.duplicates} already there "
            f"or repeated, {result.blank} blank skipped."
        )
        return ImportOutcome(name, result.added, skipped, message)

    def import_pairs(self, path: Path, *, split: str = "train", name: str = "") -> ImportOutcome:
        """Add a TRL-format preference file's pairs (each a vote for `chosen`) to `split`."""
        split = _checked(split, SPLITS, "split")
        name = name or path.name
        with _named_errors(path, name), transaction(self.sm, "The pairs") as s:
            result = import_pairs(s, path, annotator=IMPORT_ANNOTATOR, split=split, source=name)
        already = result.pairs - result.new_votes - result.identical
        message = (
            f"{name}: {result.pairs} pairs read, {result.new_votes} added to {split}, "
            f"{already} already there, {result.identical} skipped (chosen == rejected)."
        )
        return ImportOutcome(name, result.new_votes, result.pairs - result.new_votes, message)

    def export(
        self,
        *,
        fmt: str = "standard",
        file_type: str = ".jsonl",
        split: str = "all",
        votes: str = DEFAULT_VOTES,
        leave_out: Sequence[str] = (),
        include_judges: bool = False,
        include_self: bool = False,
    ) -> Path:
        """Write the usable preference pairs to a new file; returns its path. `votes`,
        `leave_out`, `include_judges`, `include_self`: which votes make pairs, as in training
        (storage/selection.py); a left-out name with no votes is logged and changes nothing."""
        votes = _checked(votes, VOTE_MODES, "votes mode")
        selection = VoteSelection(
            votes, tuple(leave_out), include_judges=include_judges, include_self=include_self
        )
        fmt = _checked(fmt, EXPORT_FORMATS, "export format")
        file_type = _checked(file_type, EXPORT_FILE_TYPES, "file type")
        split = _checked(split, EXPORT_SPLITS, "split")
        name = f"preferences-{fmt}{'' if split == 'all' else '-' + split}{file_type}"
        path = self.export_dir / secrets.token_hex(8) / name
        try:
            with self.sm.begin() as s:
                for name in unknown_annotators(s, selection):
                    logger.warning("export: no votes by %r, nothing to leave out for them", name)
                only = None if split == "all" else split
                export_preferences(s, path, fmt=fmt, split=only, selection=selection)
        except StorageError as err:
            raise DataError(f"Nothing exported: {err}") from err
        return path


@contextmanager
def _named_errors(path: Path, name: str) -> Iterator[None]:
    """Storage errors become a `DataError` naming the file as the user knows it (an upload
    lives under a temporary path the user never saw)."""
    try:
        yield
    except (StorageError, ValueError) as err:
        text = str(err).replace(str(path), name)
        raise DataError(f"Nothing imported: {text}") from err


def _checked(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise DataError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return value
