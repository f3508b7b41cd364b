"""Import and export through Hugging Face `datasets`: every format, every bad file, round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage import io
from storage.db import StorageError
from storage.io import ImportFileError, export_preferences, import_pairs, import_prompts
from storage.models import Preference, Prompt, Response
from storage.repo import add_prompt, preference_pairs, record_preference, record_response
from storage.runs import ensure_base_version

PROMPTS = ["Name three planets.", "What is DPO?", "Write a haiku about rain."]
TRL_COLUMNS = ["prompt", "chosen", "rejected"]
EXPORT_COLUMNS = [*TRL_COLUMNS, "annotator", "chosen_model_version", "rejected_model_version"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_in(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model))


def stored_prompts(session: Session) -> list[str]:
    return list(session.scalars(select(Prompt.text).order_by(Prompt.id)))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def prompt_file(tmp_path: Path, kind: str) -> Path:
    """The three PROMPTS (plus an unrelated column) in the given format."""
    rows = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]
    dataset = datasets.Dataset.from_list(rows)
    path = tmp_path / f"prompts.{kind}"
    if kind == "txt":
        path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    elif kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif kind == "csv":
        dataset.to_csv(path, index=False)
    elif kind == "parquet":
        dataset.to_parquet(path)
    elif kind == "dir":
        dataset.save_to_disk(str(path))
    elif kind == "dict-dir":
        datasets.DatasetDict({"train": dataset}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "csv", "parquet", "dir", "dict-dir"])
def test_import_prompts_from_every_format(session: Session, tmp_path: Path, kind: str):
    result = import_prompts(session, prompt_file(tmp_path, kind))
    assert (result.added, result.duplicates) == (3, 0)
    assert stored_prompts(session) == PROMPTS
    assert session.get_one(Prompt, result.ids[PROMPTS[0]]).source == f"prompts.{kind}"


def test_import_prompts_txt_details(session: Session, tmp_path: Path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffFirst\r\n\r\n  second  \nFirst\nthird".encode())
    result = import_prompts(session, path, split="heldout")
    assert (result.added, result.duplicates, result.blank) == (3, 1, 1)
    assert stored_prompts(session) == ["First", "second", "third"]  # BOM and spaces gone
    assert {p.split for p in session.scalars(select(Prompt))} == {"heldout"}
    assert import_prompts(session, path).added == 0  # importing again adds nothing


def bad_prompt_file(tmp_path: Path, case: str) -> Path:
    path = tmp_path / {
        "no-rows": "p.csv",
        "binary-txt": "p.txt",
        "nul-txt": "p.txt",
        "unsupported": "p.xlsx",
    }.get(case, "p.jsonl")
    content = {
        "empty": b"",
        "wrong-columns": b'{"question": "a", "text": "b"}\n',
        "no-rows": b"prompt\n",
        "not-utf8": b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n',
        "binary-txt": b"fine\n\xff\xfe\x00\x01\n",
        "not-json": b'{"prompt": "ok"}\nthis is not json\n',
        "not-text": b'{"prompt": "ok"}\n{"prompt": 42}\n',
        "unsupported": b"PK\x03\x04",
        "nul-txt": b"fine\nnot\x00fine\n",
        "nul-jsonl": b'{"prompt": "a\\u0000b"}\n',
    }.get(case, b"")
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "the file is empty"),
        ("wrong-columns", r"missing column\(s\) prompt; found question, text"),
        ("no-rows", "has no rows"),
        ("not-utf8", r"not UTF-8 text \(byte 32, line 2\)"),
        ("binary-txt", r"not UTF-8 text \(byte 5, line 2\)"),
        ("not-json", "not a readable json file"),
        ("not-text", r"row 2: 'prompt' is not text \(int\)"),
        ("unsupported", "unsupported file type"),
        ("nul-txt", r"line 2: the prompt contains a NUL character \(U\+0000\)"),
        ("nul-jsonl", r"row 1: the prompt contains a NUL character \(U\+0000\)"),
    ],
)
def test_bad_prompt_files_get_one_clear_error(
    session: Session, tmp_path: Path, case: str, message: str
):
    path = bad_prompt_file(tmp_path, case)
    with pytest.raises(ImportFileError, match=message) as err:
        import_prompts(session, path)
    assert str(err.value).startswith(f"{path}: ")
    assert rows_in(session, Prompt) == 0


def test_missing_huge_and_not_a_dataset(session: Session, tmp_path: Path, monkeypatch):
    with pytest.raises(ImportFileError, match="no such file"):
        import_prompts(session, tmp_path / "nope.txt")
    with pytest.raises(ImportFileError, match="not a datasets directory"):
        import_prompts(session, tmp_path)
    path = prompt_file(tmp_path, "jsonl")
    monkeypatch.setattr(io, "MAX_FILE_BYTES", 64)
    with pytest.raises(ImportFileError, match=r"the file is \d+ bytes; the limit is 64 bytes"):
        import_prompts(session, path)


def test_a_failed_import_leaves_nothing(db: sessionmaker[Session], tmp_path: Path):
    rows = [{"prompt": f"p{i}"} for i in range(1000)] + [{"prompt": ["not", "text"]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ImportFileError, match="row 1001"), db.begin() as session:
        import_prompts(session, path)
    with db() as session:
        assert rows_in(session, Prompt) == 0


STANDARD = [
    {"prompt": "Name a planet.", "chosen": "Mars.", "rejected": "A banana."},
    {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
]


def conversational(rows: list[dict[str, str]], style: str) -> list[dict[str, Any]]:
    """TRL's conversational layouts of the same pairs."""
    out = []
    for r in rows:
        if style == "explicit":
            out.append(
                {
                    "prompt": [user(r["prompt"])],
                    "chosen": [assistant(r["chosen"])],
                    "rejected": [assistant(r["rejected"])],
                }
            )
        elif style == "implicit":
            out.append(
                {
                    "chosen": [user(r["prompt"]), assistant(r["chosen"])],
                    "rejected": [user(r["prompt"]), assistant(r["rejected"])],
                }
            )
        else:  # UltraFeedback binarized: prompt string, full conversations, extra columns
            out.append(
                {
                    "prompt": r["prompt"],
                    "prompt_id": "abc",
                    "chosen": [user(r["prompt"]), assistant(r["chosen"])],
                    "rejected": [user(r["prompt"]), assistant(r["rejected"])],
                    "messages": [user(r["prompt"]), assistant(r["chosen"])],
                    "score_chosen": 8.0,
                    "score_rejected": 3.5,
                }
            )
    return out


def stored_pairs(session: Session) -> list[dict[str, str]]:
    return [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        for p in preference_pairs(session).pairs
    ]


@pytest.mark.parametrize("style", ["standard", "explicit", "implicit", "ultrafeedback"])
def test_import_pairs_in_trl_formats(session: Session, tmp_path: Path, style: str):
    rows = STANDARD if style == "standard" else conversational(STANDARD, style)
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(path)
    result = import_pairs(session, path, annotator="ultrafeedback")
    assert (result.pairs, result.new_votes, result.identical) == (2, 2, 0)
    assert stored_pairs(session) == STANDARD
    pair = preference_pairs(session).pairs[0]
    assert pair.annotator == "ultrafeedback"
    assert (pair.chosen_model_version, pair.rejected_model_version) == (None, None)
    again = import_pairs(session, path, annotator="ultrafeedback")
    assert again.new_votes == 0
    assert (rows_in(session, Preference), rows_in(session, Response)) == (2, 4)


def test_imported_pairs_share_prompts_with_labeling(session: Session, tmp_path: Path):
    add_prompt(session, "Name a planet.")
    write_jsonl(
        tmp_path / "p.jsonl", [*STANDARD, {**STANDARD[0], "chosen": "same", "rejected": "same"}]
    )
    result = import_pairs(session, tmp_path / "p.jsonl")
    assert (result.pairs, result.new_votes, result.identical) == (3, 2, 1)
    assert rows_in(session, Prompt) == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"chosen": "a", "rejected": "b"}, "needs a 'prompt' string"),
        ({"prompt": "p", "chosen": "a", "rejected": [assistant("b")]}, "must both be strings"),
        ({"prompt": "p", "chosen": " ", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
        (
            {
                "prompt": [user("hi"), assistant("hello"), user("p")],
                "chosen": [assistant("a")],
                "rejected": [assistant("b")],
            },
            "only single-turn conversations",
        ),
        (
            {
                "prompt": [{"role": "system", "content": "be nice"}, user("p")],
                "chosen": [assistant("a")],
                "rejected": [assistant("b")],
            },
            "only single-turn conversations",
        ),
        ({"prompt": "p", "chosen": [{"text": "a"}], "rejected": [assistant("b")]}, "messages"),
        (
            {"prompt": "p", "chosen": "a\x00", "rejected": "b"},
            r"'chosen' contains a NUL character .U\+0000.",
        ),
    ],
)
def test_bad_pair_rows_name_the_row(session: Session, tmp_path: Path, row: dict, message: str):
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(ImportFileError, match=f"row 1: .*{message}"):
        import_pairs(session, path)
    assert rows_in(session, Preference) == rows_in(session, Prompt) == 0


def test_pair_file_without_pair_columns(session: Session, tmp_path: Path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "response": "a"}])
    with pytest.raises(ImportFileError, match=r"missing column\(s\) chosen, rejected"):
        import_pairs(session, path)


@pytest.fixture
def labeled(session: Session) -> Session:
    """Two votes from the app (one with a rewrite) and a tie, by two annotators."""
    base = ensure_base_version(session, "m")
    for prompt_text, choice, rewrite, annotator in [
        ("Name a planet.", "a", None, "alice"),
        ("2 + 2?", "b", "Four.", "bob"),
        ("Hi", "tie", None, "bob"),
    ]:
        prompt = add_prompt(session, prompt_text)
        a, b = (
            record_response(session, prompt_id=prompt.id, model_version_id=base.id, text=t).id
            for t in (f"{prompt_text} A", f"{prompt_text} B")
        )
        record_preference(
            session,
            response_a_id=a,
            response_b_id=b,
            choice=choice,
            annotator=annotator,
            rewrite=rewrite,
        )
    return session


EXPECTED_EXPORT = [
    {
        "prompt": "Name a planet.",
        "chosen": "Name a planet. A",
        "rejected": "Name a planet. B",
        "annotator": "alice",
        "chosen_model_version": "base",
        "rejected_model_version": "base",
    },
    {
        "prompt": "2 + 2?",
        "chosen": "Four.",
        "rejected": "2 + 2? A",
        "annotator": "bob",
        "chosen_model_version": None,
        "rejected_model_version": "base",
    },
]


def load_export(path: Path, cache_dir: Path) -> datasets.Dataset:
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    builder = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(
        builder, data_files=str(path), split="train", cache_dir=str(cache_dir)
    )


@pytest.mark.parametrize("name", ["prefs.jsonl", "prefs.json", "prefs.parquet", "prefs-dataset"])
def test_export_standard_loads_with_datasets(labeled: Session, tmp_path: Path, name: str):
    path = tmp_path / "out" / name
    assert export_preferences(labeled, path) == 2
    loaded = load_export(path, tmp_path / "cache")
    assert loaded.column_names == EXPORT_COLUMNS
    assert loaded.to_list() == EXPECTED_EXPORT
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no temporary files left


def test_export_conversational(labeled: Session, tmp_path: Path):
    path = tmp_path / "prefs.jsonl"
    export_preferences(labeled, path, fmt="conversational")
    first = load_export(path, tmp_path / "cache")[0]
    assert first["prompt"] == [user("Name a planet.")]
    assert first["chosen"] == [assistant("Name a planet. A")]
    assert first["rejected"] == [assistant("Name a planet. B")]
    assert first["annotator"] == "alice"


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_export_then_import_into_a_new_database(labeled: Session, tmp_path: Path, fmt: str):
    path = tmp_path / f"{fmt}.parquet"
    export_preferences(labeled, path, fmt=fmt)
    fresh = import_pairs_into_new_sqlite(tmp_path, path)
    assert fresh == [{k: row[k] for k in TRL_COLUMNS} for row in EXPECTED_EXPORT]


def import_pairs_into_new_sqlite(tmp_path: Path, path: Path) -> list[dict[str, str]]:
    from storage.db import open_db

    db = open_db(f"sqlite:///{tmp_path / 'fresh.db'}")
    with db.begin() as session:
        import_pairs(session, path)
        pairs = stored_pairs(session)
    db.kw["bind"].dispose()
    return pairs


def test_export_refusals(labeled: Session, tmp_path: Path):
    with pytest.raises(ValueError, match="unknown export format"):
        export_preferences(labeled, tmp_path / "x.jsonl", fmt="sharegpt")
    (tmp_path / "taken").mkdir()
    with pytest.raises(StorageError, match="already exists"):
        export_preferences(labeled, tmp_path / "taken")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StorageError, match="cannot write the export"):
        export_preferences(labeled, tmp_path / "a-file" / "x.jsonl")
    with pytest.raises(StorageError, match="no usable preference pairs"):
        export_preferences(labeled, tmp_path / "heldout.jsonl", split="heldout")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_trl_dpo_trainer_accepts_the_export_unchanged(labeled: Session, tmp_path: Path, fmt: str):
    from trl import DPOConfig, DPOTrainer

    from tests.tiny import build_tiny_model, build_tiny_tokenizer

    path = tmp_path / "prefs.jsonl"
    export_preferences(labeled, path, fmt=fmt)
    dataset = load_export(path, tmp_path / "cache")
    tokenizer = build_tiny_tokenizer()
    args = DPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=64,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=build_tiny_model(len(tokenizer)),
        ref_model=build_tiny_model(len(tokenizer)),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.train().training_loss == pytest.approx(0.6931, abs=1e-3)  # log 2 at step 0
