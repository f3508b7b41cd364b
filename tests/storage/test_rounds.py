"""Rounds: which version's answers each pair compares, and what a continued run trains on
(parent: only the parent's answers; all; newest: all, weighted toward the newest). Mixed votes,
rewrites, imported answers, a sibling version; the export CLI. On a real database (SQLite, and
PostgreSQL when DPO_STUDIO_TEST_PG_URL is set)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage.__main__ import main
from storage.repo import add_prompt, preference_pairs, record_preference, record_response
from storage.rounds import (
    IMPORTED,
    Lineage,
    counts_by_version,
    counts_text,
    find_version,
    pairs_per_version,
    select_round,
)
from storage.runs import ensure_base_version, register_adapter_version
from storage.selection import VoteSelection
from storage.verdicts import kto_rows, record_verdict


@dataclass(frozen=True)
class Family:
    """base <- v1 <- v2, and v3 <- v1 (a sibling of v2, after a roll back): version ids."""

    base: int
    v1: int
    v2: int
    v3: int


def family(session: Session, model: str = "m") -> Family:
    base = ensure_base_version(session, model).id
    ids = {}
    for name, parent in (("v1", base), ("v2", None), ("v3", None)):
        parent = parent or ids["v1"]
        ids[name] = register_adapter_version(
            session, base_model=model, adapter_path=f"/a/{name}", parent_id=parent, activate=False
        ).id
    return Family(base, ids["v1"], ids["v2"], ids["v3"])


def voted(
    session: Session,
    prompt: str,
    versions: tuple[int | None, int | None],
    choice: str = "a",
    rewrite: str | None = None,
) -> None:
    """A vote on two answers to `prompt`, written by `versions` (None: an imported answer)."""
    prompt_id = add_prompt(session, prompt).id
    a, b = (
        record_response(session, prompt_id=prompt_id, model_version_id=v, text=f"{prompt} {i}").id
        for i, v in enumerate(versions)
    )
    record_preference(
        session, response_a_id=a, response_b_id=b, choice=choice, annotator="ann", rewrite=rewrite
    )


def labeled(session: Session) -> Family:
    """One vote on the base's answers, two on v1's, two on v2's (one with a rewrite), a mixed
    one (v1 and v2), one on v3's, one on imported answers."""
    f = family(session)
    voted(session, "on base", (f.base, f.base))
    voted(session, "on v1", (f.v1, f.v1))
    voted(session, "on v1 again", (f.v1, f.v1), choice="b")
    voted(session, "on v2", (f.v2, f.v2))
    voted(session, "on v2, rewritten", (f.v2, f.v2), choice="tie", rewrite="Better.")
    voted(session, "mixed", (f.v1, f.v2))
    voted(session, "on v3", (f.v3, f.v3))
    voted(session, "imported", (None, None))
    return f


def chosen(session: Session, **selection: object) -> list[tuple[str, str, float]]:
    """(prompt, version, weight) of each pair the selection keeps."""
    pairs = preference_pairs(session).pairs
    kept = select_round(session, pairs, VoteSelection(**selection))  # type: ignore[arg-type]
    return [(r.pair.prompt, r.version, r.weight) for r in kept]


def test_parent_keeps_only_the_pairs_on_the_parents_answers_mixed_ones_on_the_newer(
    session: Session,
):
    f = labeled(session)
    on_v2 = chosen(session, train_on="parent", parent_id=f.v2)
    # the rewrite is chosen against each answer of a tie: two pairs, both on v2's answers
    assert on_v2 == [
        ("on v2", "v2", 1.0),
        ("on v2, rewritten", "v2", 1.0),
        ("on v2, rewritten", "v2", 1.0),
        ("mixed", "v2", 1.0),
    ]
    on_v1 = chosen(session, train_on="parent", parent_id=f.v1)
    assert [p for p, _, _ in on_v1] == ["on v1", "on v1 again"]  # not the mixed one
    assert chosen(session, train_on="parent", parent_id=f.base) == [("on base", "base", 1.0)]


def test_all_keeps_every_pair_at_weight_one_and_counts_them_by_version(session: Session):
    f = labeled(session)
    every = chosen(session)
    assert len(every) == 9 and {w for _, _, w in every} == {1.0}
    pairs = preference_pairs(session).pairs
    counts = counts_by_version(select_round(session, pairs, VoteSelection()))
    assert counts == {"v2": 4, "v1": 2, "base": 1, "v3": 1, IMPORTED: 1}
    assert sum(counts.values()) == len(pairs)  # a mixed vote is credited once
    assert counts_text(counts) == "4 on v2's answers, 2 on v1's, 1 on base's, 1 on v3's, 1 imported"
    assert pairs_per_version(session) == {f.v2: 4, f.v1: 2, f.base: 1, f.v3: 1, None: 1}


def test_newest_weighs_by_generations_from_the_parent(session: Session):
    f = labeled(session)
    weights = {p: w for p, _, w in chosen(session, train_on="newest", parent_id=f.v2)}
    assert weights == {
        "on v2": 1.0,
        "on v2, rewritten": 1.0,
        "mixed": 1.0,
        "on v1": 0.5,
        "on v1 again": 0.5,
        "on base": 0.25,
        "imported": 0.25,  # as old as the base's answers
        "on v3": 0.25,  # v2 -> v1 -> v3: a sibling is two steps away
    }
    from_v1 = {p: w for p, _, w in chosen(session, train_on="newest", parent_id=f.v1)}
    assert from_v1["on v1"] == 1.0 and from_v1["on v2"] == from_v1["on base"] == 0.5


def test_a_round_without_a_parent_is_refused_and_a_bad_choice_named(session: Session):
    labeled(session)
    with pytest.raises(ValueError, match="train on parent needs the version the run continues"):
        chosen(session, train_on="parent")
    with pytest.raises(ValueError, match="train on must be one of parent, all, newest"):
        VoteSelection(train_on="latest")


def test_the_choice_round_trips_through_a_runs_record_and_the_default_reads_as_before():
    assert VoteSelection().to_dict() == {
        "votes": "majority",
        "leave_out": [],
        "include_judges": False,
    }
    selection = VoteSelection("every", train_on="newest", parent_id=7)
    record = json.loads(json.dumps(selection.to_dict()))
    assert record["train_on"] == "newest" and record["parent_id"] == 7
    assert VoteSelection.from_dict(record) == selection


def test_lineage_text_and_versions_by_name(session: Session):
    f = family(session)
    lineage = Lineage.load(session)
    assert lineage.text(f.v2) == "v2 ← v1 ← base"
    assert lineage.text(f.v3) == "v3 ← v1 ← base"
    assert lineage.generations(f.v3, f.v2) == 2
    assert find_version(session, "v2").id == f.v2
    family(session, model="other")
    with pytest.raises(ValueError, match=r"v2 exists for several base models \(m, other\)"):
        find_version(session, "v2")
    assert find_version(session, "v2", base_model="m").id == f.v2
    with pytest.raises(
        ValueError, match=r"no version named 'v9'; the versions are: base, v1, v2, v3$"
    ):
        find_version(session, "v9")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_writes_the_pairs_a_round_would_use(
    db: sessionmaker[Session], db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with db.begin() as s:
        labeled(s)
    out = tmp_path / "round.jsonl"
    assert main(["export", str(out), "--db", db_url, "--on-version", "v1"]) == 0
    assert [(r["prompt"], r["answers_version"]) for r in _rows(out)] == [
        ("on v1", "v1"),
        ("on v1 again", "v1"),
    ]
    assert "train on: parent from v1" in capsys.readouterr().out
    args = ["export", str(out), "--db", db_url, "--train-on", "newest", "--parent", "v2"]
    assert main(args) == 0
    weights = {r["prompt"]: r["weight"] for r in _rows(out)}
    assert weights["on v2"] == 1.0 and weights["on v1"] == 0.5 and weights["on base"] == 0.25
    assert main(["export", str(out), "--db", db_url]) == 0
    assert "weight" not in _rows(out)[0] and len(_rows(out)) == 9  # all, as before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train-on", "parent"], "--train-on parent needs --parent VERSION"),
        (["--on-version", "v1", "--train-on", "newest"], "--on-version V is --train-on parent"),
        (["--on-version", "v7"], "no version named 'v7'; the versions are: base, v1, v2, v3"),
        (["--on-version", "v3", "--split", "heldout"], "No pairs were labeled on v3's answers"),
    ],
    ids=["no parent", "two choices", "unknown version", "no pairs"],
)
def test_export_of_a_round_that_cannot_be_is_refused_with_a_clear_message(
    db: sessionmaker[Session],
    db_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
):
    with db.begin() as s:
        labeled(s)
    out = tmp_path / "round.jsonl"
    assert main(["export", str(out), "--db", db_url, *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_kto_rows_follow_the_rounds_choice_verdicts_on_their_answers_version(session: Session):
    """A KTO run's rows are on the version of their vote (its rewrite too) or verdict:
    train on parent keeps that version's, newest weighs them, all keeps every row at 1."""
    f = labeled(session)
    prompt_id = add_prompt(session, "judged").id
    for version, verdict in ((f.v1, "up"), (f.v2, "down")):
        answer = record_response(
            session, prompt_id=prompt_id, model_version_id=version, text=f"by {version}"
        ).id
        record_verdict(session, response_id=answer, verdict=verdict, annotator="ann")

    def rows(**selection: object) -> list[tuple[str, bool, float]]:
        found = kto_rows(session, selection=VoteSelection(**selection))  # type: ignore[arg-type]
        return [(r.completion, r.label, r.weight) for r in found.rows]

    on_v2 = rows(train_on="parent", parent_id=f.v2)
    assert {text.split(" ")[-1] for text, _, _ in on_v2 if text.startswith("by")} == {str(f.v2)}
    assert ("Better.", True, 1.0) in on_v2  # the rewrite of a vote on v2's answers
    assert not any(text.startswith(("on v1", "on base", "imported")) for text, _, _ in on_v2)
    assert kto_rows(
        session, selection=VoteSelection(train_on="parent", parent_id=f.v2)
    ).other_versions
    newest = {(t, label): w for t, label, w in rows(train_on="newest", parent_id=f.v2)}
    assert newest[(f"by {f.v1}", True)] == 0.5 and newest[(f"by {f.v2}", False)] == 1.0
    assert newest[("on base 0", True)] == 0.25 and newest[("imported 0", True)] == 0.25
    every = rows()
    assert len(every) == len(newest) and {w for _, _, w in every} == {1.0}
    weighted = kto_rows(session, selection=VoteSelection(train_on="newest", parent_id=f.v2))
    assert {row.trl().get("weight") for row in weighted.rows} == {None, 0.5, 0.25}
    with pytest.raises(ValueError, match="needs the version the run continues from"):
        rows(train_on="parent")
