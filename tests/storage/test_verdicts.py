"""Verdicts on single answers and every vote as KTO rows: what each kind of vote gives, whose
votes are read, ties give nothing, bad input refused; the `kto` export. On a real database
(SQLite, and PostgreSQL when DPO_STUDIO_TEST_PG_URL is set)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.__main__ import main
from storage.models import AnswerVerdict
from storage.repo import add_prompt, record_response
from storage.selection import VoteSelection
from storage.verdicts import kto_rows, next_verdict_prompt, record_verdict, verdict_counts
from tests.storage.test_repo import answers
from tests.storage.test_selection import vote


def judge(session: Session, response_id: int, verdict: str, annotator: str = "ann") -> bool:
    """Record a verdict; whether it is new."""
    return record_verdict(
        session, response_id=response_id, verdict=verdict, annotator=annotator
    ).created


def got(session: Session, **selection: object) -> list[tuple[str, bool, str]]:
    """(completion, label, annotator) of every KTO row of the train split."""
    found = kto_rows(session, selection=VoteSelection(**selection))  # type: ignore[arg-type]
    return [(row.completion, row.label, row.annotator) for row in found.rows]


def test_a_verdict_is_one_row_and_the_first_one_stands(session: Session):
    good, bad = answers(session, "Name a planet.", "Mars.", "A banana.")
    assert judge(session, good, "up", "ann") is True
    assert judge(session, good, "down", "ann") is False  # a double click or a retry
    assert judge(session, bad, "down", "ann") is True
    assert session.scalar(select(func.count()).select_from(AnswerVerdict)) == 2
    rows = kto_rows(session).rows
    assert [(r.prompt, r.completion, r.label, r.source) for r in rows] == [
        ("Name a planet.", "Mars.", True, "verdict"),
        ("Name a planet.", "A banana.", False, "verdict"),
    ]
    assert rows[0].trl() == {
        "prompt": "Name a planet.",
        "completion": "Mars.",
        "label": True,
    }
    assert rows[0].model_version == "base"
    assert verdict_counts(session, "ann") == verdict_counts(session, " ann ")
    counts = verdict_counts(session, "ann")
    assert (counts.mine, counts.up, counts.down, counts.everyone) == (2, 1, 1, 2)


def test_every_kind_of_vote_gives_its_rows(session: Session):
    vote(session, answers(session, "ab", "ab-win", "ab-lose"), "a", "ann")
    vote(session, answers(session, "swapped", "sw-A", "sw-B"), "b", "ann", swap=True)
    vote(session, answers(session, "both bad", "bb-A", "bb-B"), "both_bad", "ann")
    vote(session, answers(session, "tie", "tie-A", "tie-B"), "tie", "ann")
    vote(session, answers(session, "rewritten", "rw-A", "rw-B"), "a", "ann", rewrite="rw-mine")
    vote(session, answers(session, "tie rw", "tr-A", "tr-B"), "tie", "ann", rewrite="tr-mine")
    only = answers(session, "single", "one")
    judge(session, only[0], "up")
    found = kto_rows(session)
    assert [(r.completion, r.label) for r in found.rows] == [
        ("one", True),  # a thumbs up
        ("ab-win", True),  # A/B: the winner desirable, the loser undesirable
        ("ab-lose", False),
        ("sw-B", True),  # B chosen, shown the other way round: still B wins
        ("sw-A", False),
        ("rw-mine", True),  # a rewrite replaces the winner, as in DPO
        ("rw-B", False),
        ("tr-mine", True),  # a tie with a rewrite: the rewrite beats both
        ("tr-A", False),
        ("tr-B", False),
        ("bb-A", False),  # both bad: both undesirable
        ("bb-B", False),
    ]
    assert found.ties == 1 and found.desirable == 5
    assert {r.model_version for r in found.rows if r.completion.endswith("mine")} == {None}


def test_ties_give_nothing(session: Session):
    vote(session, answers(session, "tie", "tie-A", "tie-B"), "tie", "ann")
    found = kto_rows(session)
    assert found.rows == [] and found.ties == 1


def test_left_out_annotators_and_judges_are_not_read(session: Session):
    ids = answers(session, "p", "p-A", "p-B")
    vote(session, ids, "a", "ann")
    vote(session, ids, "b", "bob")
    vote(session, ids, "both_bad", "judge:qwen")
    judge(session, ids[0], "up", "bob")
    judge(session, ids[1], "down", "judge:qwen")
    assert got(session) == [
        ("p-A", True, "bob"),
        ("p-A", True, "ann"),  # each vote counts on its own: no majority for KTO
        ("p-B", False, "ann"),
        ("p-B", True, "bob"),
        ("p-A", False, "bob"),
    ]
    assert got(session, leave_out=("bob",)) == [("p-A", True, "ann"), ("p-B", False, "ann")]
    assert kto_rows(session, selection=VoteSelection(leave_out=("bob",))).left_out == 4
    with_judges = got(session, include_judges=True, leave_out=("ann", "bob"))
    assert with_judges == [
        ("p-B", False, "judge:qwen"),
        ("p-A", False, "judge:qwen"),
        ("p-B", False, "judge:qwen"),
    ]


def test_splits_and_empty_answers(session: Session):
    heldout = add_prompt(session, "held out", split="heldout")
    answer = record_response(session, prompt_id=heldout.id, model_version_id=None, text="x")
    judge(session, answer.id, "up")
    empty = answers(session, "silent", " ", "something")
    vote(session, empty, "b", "ann")
    found = kto_rows(session)
    assert [(r.completion, r.label) for r in found.rows] == [("something", True)]
    assert found.empty == 1  # the empty loser cannot train
    assert [r.completion for r in kto_rows(session, split="heldout").rows] == ["x"]
    assert len(kto_rows(session, split=None).rows) == 2


def test_a_bad_verdict_is_refused_with_a_clear_error(session: Session):
    ids = answers(session, "Name a planet.", "Mars.")
    with pytest.raises(ValueError, match=r"^unknown verdict 'maybe'; use up \(a good answer\)"):
        judge(session, ids[0], "maybe")
    with pytest.raises(ValueError, match=r"^no response with id 999999$"):
        judge(session, 999999, "up")
    with pytest.raises(ValueError, match="the annotator name is empty"):
        judge(session, ids[0], "up", "  ")
    with pytest.raises(ValueError, match="seconds_spent must be >= 0"):
        record_verdict(session, response_id=ids[0], verdict="up", annotator="a", seconds_spent=-1)
    assert session.scalar(select(func.count()).select_from(AnswerVerdict)) == 0


def test_the_single_answer_queue_counts_verdicts(session: Session):
    first = answers(session, "first", "f1")
    answers(session, "second", "s1")
    assert next_verdict_prompt(session, "ann").text == "first"
    judge(session, first[0], "up", "ann")
    assert next_verdict_prompt(session, "ann").text == "second"
    assert next_verdict_prompt(session, "bob").text == "second"  # fewest labels overall next
    second = next_verdict_prompt(session, "ann")
    assert next_verdict_prompt(session, "ann", exclude=[second.id]).text == "first"


def test_export_kto_writes_a_datasets_file(
    db: sessionmaker[Session],
    db_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    out = tmp_path / "kto.jsonl"
    with db.begin() as s:
        vote(s, answers(s, "tie", "t-A", "t-B"), "tie", "ann")
    assert main(["export", str(out), "--db", db_url, "--format", "kto"]) == 2
    assert "error: there are no KTO votes to export yet" in capsys.readouterr().err
    assert not out.exists()
    with db.begin() as s:
        vote(s, answers(s, "Name a planet.", "Mars.", "A banana."), "a", "ann")
    assert main(["export", str(out), "--db", db_url, "--format", "kto"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{out}: 2 KTO rows written (kto format, every verdict and vote)"
    )
    exported = datasets.load_dataset(
        "json", data_files=str(out), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert exported.column_names[:3] == ["prompt", "completion", "label"]
    assert [(r["completion"], r["label"], r["source"]) for r in exported] == [
        ("Mars.", True, "vote"),
        ("A banana.", False, "vote"),
    ]
    assert main(["stats", "--db", db_url]) == 0
    assert "verdicts on single answers: 0; KTO rows (human votes) 2" in capsys.readouterr().out
