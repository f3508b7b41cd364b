"""Import and export through Hugging Face `datasets`, in the formats TRL reads.

Prompts come from `.txt` (one per line) or `.jsonl`/`.json`/`.csv`/`.parquet` with a `prompt`
column, or a `datasets.save_to_disk` directory. Preference pairs come in TRL's *standard*
format (`prompt`/`chosen`/`rejected` strings) or its *conversational* one (lists of
`{role, content}` messages, prompt explicit or implicit, e.g. UltraFeedback binarized); every row
is normalised here, at the edge, into a `Pair` of strings and checked once, by the rule of
`common.pair_format` (single-turn; the one `python -m dpo_core train` applies).
Exports write the same two formats with provenance columns, loadable by
`datasets.load_dataset` and accepted by TRL's `DPOTrainer` as they are; the `kto` format writes
every verdict and vote as TRL's unpaired rows (`prompt`/`completion`/`label`,
storage/verdicts.py) for `KTOTrainer`.

A bad file raises one `ImportFileError` naming the file and the problem, before anything is
written; the caller's transaction makes an import all or nothing.
"""

from __future__ import annotations

import codecs
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from common.pair_format import Pair, PairError, parse_pairs
from storage.db import StorageError
from storage.models import ModelVersion
from storage.repo import (
    AddPromptsResult,
    add_imported_pairs,
    add_prompts,
    check_storable,
    preference_pairs,
)
from storage.rounds import RoundPair, no_parent_pairs_message, select_round
from storage.selection import DEFAULT_TRAIN_ON, VoteSelection
from storage.verdicts import kto_rows

MAX_FILE_BYTES = 1 << 30
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")
KTO_FORMAT = "kto"  # unpaired rows: one answer, a desirable / undesirable label
EXPORT_FORMATS = ("standard", "conversational", KTO_FORMAT)


class ImportFileError(StorageError):
    """A file that cannot be imported; the message names the file and the problem."""


@dataclass(frozen=True)
class ImportPairsResult:
    pairs: int  # rows read from the file
    new_votes: int  # rows not already in the database
    identical: int  # rows skipped because chosen == rejected


def import_prompts(
    session: Session, path: str | Path, *, split: str = "train", source: str | None = None
) -> AddPromptsResult:
    """Add the prompts of a file or dataset directory (deduplicated; blank ones skipped)."""
    path = Path(path)
    return add_prompts(session, read_prompts(path), source=source or path.name, split=split)


def import_pairs(
    session: Session,
    path: str | Path,
    *,
    annotator: str = "import",
    split: str = "train",
    source: str | None = None,
) -> ImportPairsResult:
    """Add the preference pairs of a TRL-format file: each becomes a vote for `chosen`.

    Importing the same file twice adds nothing the second time.
    """
    path = Path(path)
    pairs = read_pairs(path)
    distinct = [p for p in pairs if p.chosen != p.rejected]
    new_votes = add_imported_pairs(
        session, distinct, annotator=annotator, source=source or path.name, split=split
    )
    return ImportPairsResult(len(pairs), new_votes, len(pairs) - len(distinct))


def export_preferences(
    session: Session,
    path: str | Path,
    *,
    fmt: str = "standard",
    split: str | None = None,
    selection: VoteSelection | None = None,
) -> int:
    """Write the training pairs to `.jsonl`/`.json`/`.parquet`, or a `save_to_disk` directory
    (any other name). Returns the number of rows. The file appears whole or not at all.
    `selection`: which votes make pairs (default: the majority of human votes), as in training,
    and which round (`train_on`: only the pairs on a version's answers, or all weighted toward
    the newest, with an `answers_version` column and, for newest, a `weight` column); with
    `include_self`, a `weight` column too (a version's own labels weigh what they were stored with).
    `fmt="kto"`: KTO's unpaired rows instead (`storage.verdicts.kto_rows`).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {EXPORT_FORMATS}")
    selection = selection or VoteSelection()
    if fmt == KTO_FORMAT:
        rows = _kto_rows(session, split, selection)
    else:
        rows = _pair_rows(session, split, selection, fmt)
    try:
        _write_dataset(rows, Path(path))
    except OSError as err:
        raise StorageError(f"{path}: cannot write the export: {err}") from err
    return len(rows)


def _pair_rows(
    session: Session, split: str | None, selection: VoteSelection, fmt: str
) -> list[dict[str, Any]]:
    """The export's preference pairs (of the round `selection` picks): TRL's columns in
    `fmt`, then provenance."""
    pairs = preference_pairs(session, split=split, selection=selection).pairs
    kept = select_round(session, pairs, selection)  # a round's pairs (storage/rounds.py)
    if not kept:
        raise StorageError(_nothing_to_export(session, selection))
    return [
        {
            **_trl_columns(r.pair.prompt, r.pair.chosen, r.pair.rejected, fmt),
            "annotator": r.pair.annotator,
            "chosen_model_version": r.pair.chosen_model_version,
            "rejected_model_version": r.pair.rejected_model_version,
            **_round_columns(r, selection),
        }
        for r in kept
    ]


def _kto_rows(
    session: Session, split: str | None, selection: VoteSelection | None
) -> list[dict[str, Any]]:
    """The export's KTO rows: TRL's unpaired columns, then provenance."""
    rows = kto_rows(session, split=split, selection=selection).rows
    if not rows:
        raise StorageError(
            "there are no KTO votes to export yet: judge single answers (thumbs up/down) or "
            "vote on pairs in the Label tab (ties give no KTO row)"
        )
    return [
        {
            **row.trl(),
            "annotator": row.annotator,
            "model_version": row.model_version,
            "source": row.source,
        }
        for row in rows
    ]


def _round_columns(kept: RoundPair, selection: VoteSelection) -> dict[str, Any]:
    """A round's export (train on parent or newest) says which version's answers each pair
    compares; `newest` and `include_self` add the pair's `weight` (dpo_core's loss reads it)."""
    out: dict[str, Any] = {}
    if selection.train_on != DEFAULT_TRAIN_ON:
        out["answers_version"] = kept.version
    if selection.train_on == "newest" or selection.include_self:
        out["weight"] = kept.weight
    return out


def _nothing_to_export(session: Session, selection: VoteSelection) -> str:
    if selection.train_on == "parent" and selection.parent_id is not None:
        parent = session.get(ModelVersion, selection.parent_id)
        if parent is not None:
            return no_parent_pairs_message(parent.name)
    return "there are no usable preference pairs to export yet"


def _trl_columns(prompt: str, chosen: str, rejected: str, fmt: str) -> dict[str, Any]:
    if fmt == "standard":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _write_dataset(rows: list[dict[str, Any]], path: Path) -> None:
    import datasets

    dataset = datasets.Dataset.from_list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet"):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        os.close(fd)
        try:
            if suffix == ".parquet":
                dataset.to_parquet(tmp)
            else:
                dataset.to_json(tmp, lines=True, force_ascii=False)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    if path.exists():
        raise StorageError(f"{path}: already exists; choose a new directory for the export")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        dataset.save_to_disk(str(tmp_dir))
        os.rename(tmp_dir, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def read_prompts(path: Path) -> list[str]:
    """The prompt texts of a file or dataset directory, in file order (blank ones included)."""
    if path.suffix.lower() == ".txt" and path.is_file():
        _check_file(path)
        prompts, unit = path.read_text(encoding="utf-8-sig").splitlines(), "line"
    else:
        prompts, unit = [], "row"
        for n, row in enumerate(_load_rows(path, required=("prompt",)), 1):
            value = row["prompt"]
            if value is not None and not isinstance(value, str):
                raise ImportFileError(f"{path}: row {n}: 'prompt' is not text ({_kind(value)})")
            prompts.append(value or "")
    for n, prompt in enumerate(prompts, 1):
        try:
            check_storable(prompt, "the prompt")
        except ValueError as err:
            raise ImportFileError(f"{path}: {unit} {n}: {err}") from None
    return prompts


def read_pairs(path: Path) -> list[Pair]:
    """The rows of a TRL preference file as checked pairs (`common.pair_format`, the rule
    `python -m dpo_core train` applies too)."""
    rows = _load_rows(path, required=("chosen", "rejected"))
    try:
        return parse_pairs(rows, str(path))
    except PairError as err:
        raise ImportFileError(str(err)) from None


def _load_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every row of a table file or dataset directory, checked for the required columns."""
    if path.is_dir():
        return _checked_rows(path, _load_from_disk(path), required)
    _check_file(path)
    builder = TABLE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ImportFileError(
            f"{path}: unsupported file type; use .txt, {', '.join(TABLE_FORMATS)} or a "
            "datasets directory"
        )
    # A throw-away cache: no stale copy is reused, nothing piles up in ~/.cache. The rows are
    # read out before it goes (the dataset maps its files).
    with tempfile.TemporaryDirectory() as cache_dir:
        return _checked_rows(path, _load_file(path, builder, cache_dir), required)


def _load_file(path: Path, builder: str, cache_dir: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=cache_dir
        )
    except ValueError as err:
        if "corresponds to no data" in str(err):  # datasets' way of saying "zero rows"
            raise ImportFileError(f"{path}: has no rows") from err
        raise ImportFileError(f"{path}: not a readable {builder} file: {_root(err)}") from err
    except Exception as err:  # the readers raise many kinds; every one means a bad file
        raise ImportFileError(f"{path}: not a readable {builder} file: {_root(err)}") from err


def _load_from_disk(path: Path) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise ImportFileError(f"{path}: not a datasets directory: {_root(err)}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise ImportFileError(
                f"{path}: has splits {list(loaded)}; save the one to import on its own"
            )
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded


def _checked_rows(path: Path, dataset: Any, required: tuple[str, ...]) -> list[dict[str, Any]]:
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ImportFileError(
            f"{path}: missing column(s) {', '.join(missing)}; found "
            f"{', '.join(dataset.column_names) or 'none'}"
        )
    if dataset.num_rows == 0:
        raise ImportFileError(f"{path}: has no rows")
    return dataset.to_list()


def _check_file(path: Path) -> None:
    """Exists, not empty, not huge, and (for text formats) valid UTF-8."""
    if not path.is_file():
        raise ImportFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise ImportFileError(f"{path}: the file is empty")
    if size > MAX_FILE_BYTES:
        raise ImportFileError(
            f"{path}: the file is {_size(size)}; the limit is {_size(MAX_FILE_BYTES)} "
            "(split it into smaller files)"
        )
    if path.suffix.lower() in TEXT_SUFFIXES:
        _check_utf8(path)


def _check_utf8(path: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = line = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                at = offset + err.start
                line += chunk[: err.start].count(b"\n")
                raise ImportFileError(
                    f"{path}: not UTF-8 text (byte {at}, line {line + 1}); save it as UTF-8"
                ) from None
            offset += len(chunk)
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ImportFileError(f"{path}: not UTF-8 text (it ends mid-character)") from None


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def _root(err: BaseException) -> str:
    """The innermost cause's message: datasets wraps the reader's real error."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return f"{type(err).__name__}: {err}".rstrip(": ")


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
