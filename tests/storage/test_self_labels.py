"""A version's labels of its own answers (`self:<version>` votes): stored once, never counted as
a person, trained only when chosen and with their weight, overridden by a person's vote on the
same answers, and measured against people's votes. On SQLite, and PostgreSQL when
DPO_STUDIO_TEST_PG_URL is set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.__main__ import main
from storage.agreement import agreement_report, load_judgements
from storage.annotators import is_person, person_filter, self_annotator
from storage.db import open_db
from storage.io import export_preferences
from storage.models import ModelVersion, Preference, Prompt, Response
from storage.overlap import next_shared_pair
from storage.repo import (
    add_prompt,
    preference_pairs,
    record_preference,
    record_response,
    store_stats,
)
from storage.rounds import select_round
from storage.runs import ensure_base_version, register_adapter_version
from storage.selection import VOTE_MODES, VoteSelection
from storage.self_labels import (
    AddedSelfLabels,
    SelfLabel,
    SelfLabelAgreement,
    add_self_labels,
    other_answer_votes,
    own_answer_votes,
    read_self_labels,
    self_label_agreement,
)
from storage.verdicts import kto_rows
from tests.storage.test_repo import count


def v1(session: Session) -> ModelVersion:
    """Base model `m` with its first adapter, `v1`."""
    ensure_base_version(session, "m")
    return register_adapter_version(session, base_model="m", adapter_path="/a/v1")


def label(
    prompt: str = "Name a planet.",
    chosen: str = "Mars.",
    rejected: str = "A banana.",
    **change: float | str,
) -> SelfLabel:
    """A self-label by scorer `implicit`, margin 1.5, weight 0.5 unless `change` says else."""
    values: dict[str, float | str] = {"margin": 1.5, "scorer": "implicit", "weight": 0.5} | change
    return SelfLabel(prompt, chosen, rejected, **values)


def stored_ids(session: Session, prompt: str) -> dict[str, int]:
    """Answer text -> id, for the answers to `prompt`."""
    query = select(Response.text, Response.id).join(Prompt).where(Prompt.text == prompt)
    return dict(session.execute(query).all())


def person(session: Session, ids: dict[str, int], winner: str, loser: str, who: str) -> None:
    """`who` prefers `winner` (shown on the left) over `loser`; "=" as winner: a tie."""
    if winner == "=":
        a, b, choice = ids[loser], min(i for t, i in ids.items() if t != loser), "tie"
    else:
        a, b, choice = ids[winner], ids[loser], "a"
    record_preference(session, response_a_id=a, response_b_id=b, choice=choice, annotator=who)


def test_the_one_rule_for_who_is_a_person(session: Session):
    assert [is_person(n) for n in ("ann", "import", "selfish", "judge:qwen", "self:v2")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert self_annotator("v2") == "self:v2"
    v1(session)
    add_self_labels(session, "v1", [label()])
    ids = stored_ids(session, "Name a planet.")
    for who in ("ann", "selfish", "judge:qwen"):
        person(session, ids, "Mars.", "A banana.", who)
    query = select(Preference.annotator).where(person_filter(Preference.annotator))
    assert sorted(session.scalars(query)) == ["ann", "selfish"]


def test_a_self_label_is_a_vote_of_the_version_on_its_own_answers(session: Session):
    version = v1(session)
    got = add_self_labels(session, "v1", [label(), label("Name a fruit.", "A pear.", "Mars.")])
    assert got == AddedSelfLabels("self:v1", added=2, already=0)
    votes = session.scalars(select(Preference).order_by(Preference.id)).all()
    assert [(v.annotator, v.scorer, v.margin, v.weight) for v in votes] == [
        ("self:v1", "implicit", 1.5, 0.5)
    ] * 2
    for vote in votes:
        winner = vote.response_a if vote.choice == "a" else vote.response_b
        assert winner.text in ("Mars.", "A pear.")
        assert {vote.response_a.model_version_id, vote.response_b.model_version_id} == {version.id}
        assert vote.left_response_id is None and vote.seconds_spent is None
    [pair, _] = preference_pairs(session, selection=VoteSelection(include_self=True)).pairs
    assert (pair.chosen, pair.rejected, pair.chosen_model_version) == ("Mars.", "A banana.", "v1")


def test_the_same_self_label_twice_is_one_vote(session: Session):
    v1(session)
    add_self_labels(session, "v1", [label()])
    again = add_self_labels(session, "v1", [label(), label(weight=2.0, margin=9.0)])
    assert again == AddedSelfLabels("self:v1", added=0, already=2)
    assert (count(session, Prompt), count(session, Response), count(session, Preference)) == (
        1,
        2,
        1,
    )
    assert session.scalars(select(Preference.weight)).one() == 0.5  # the first stands


def test_answers_the_version_already_gave_are_reused(session: Session):
    """Answers vK wrote in the Label tab and then self-labeled are the same answers, so a
    person's vote on them is a vote on the same pair (and overrides the model's)."""
    version = v1(session)
    assert add_self_labels(session, "v1", []) == AddedSelfLabels("self:v1", 0, 0)
    pid = add_prompt(session, "Name a planet.").id
    mars = record_response(session, prompt_id=pid, model_version_id=version.id, text="Mars.")
    add_self_labels(session, "v1", [label()])
    assert stored_ids(session, "Name a planet.")["Mars."] == mars.id
    assert count(session, Response) == 2


def test_an_unknown_version_is_a_clear_error_and_stores_nothing(session: Session):
    v1(session)
    with pytest.raises(ValueError, match=r"no version named 'v9'; the versions are: base, v1"):
        add_self_labels(session, "v9", [label()])
    assert (count(session, Prompt), count(session, Preference)) == (0, 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "  "}, "self-label 2: the prompt is empty"),
        ({"rejected": "Mars."}, "self-label 2: chosen and rejected are the same answer"),
        ({"chosen": ""}, "self-label 2: an answer is empty"),
        ({"weight": 0.0}, r"self-label 2: the weight must be a number above 0, got 0.0"),
        ({"weight": math.nan}, "the weight must be a number above 0"),
        ({"margin": math.inf}, "self-label 2: the margin must be a finite number"),
        ({"scorer": " "}, "self-label 2: the scorer needs a name of 1 to 64 characters"),
        ({"scorer": "x" * 65}, "the scorer needs a name"),
        ({"chosen": "Ma\x00rs."}, r"self-label 2: chosen contains a NUL character"),
    ],
)
def test_a_bad_self_label_is_refused_and_nothing_is_stored(session: Session, change, message):
    v1(session)
    values = {"prompt": "Name a planet.", "chosen": "Mars.", "rejected": "A banana."} | change
    with pytest.raises(ValueError, match=message):
        add_self_labels(session, "v1", [label("Ok?", "yes", "no"), label(**values)])
    assert (count(session, Prompt), count(session, Preference)) == (0, 0)


def test_self_labels_are_not_people(session: Session):
    """Not in agreement statistics, not towards an overlap's k, not in people's counts."""
    v1(session)
    add_self_labels(session, "v1", [label()])
    assert load_judgements(session) == []
    assert [j.annotator for j in load_judgements(session, people_only=False)] == ["self:v1"]
    assert next_shared_pair(session, "bob", k=2) is None  # a model's vote starts no shared pair
    ids = stored_ids(session, "Name a planet.")
    person(session, ids, "Mars.", "A banana.", "ann")
    shared = next_shared_pair(session, "bob", k=2)
    assert shared is not None and shared.votes == 1  # ann's vote, not the model's
    assert next_shared_pair(session, "cy", k=2) is None  # 1 person + bob's claim = k
    report = agreement_report(load_judgements(session))
    assert [q.annotator for q in report.annotators] == ["ann"]
    stats = store_stats(session)
    assert (stats.overall.votes, stats.people.votes, stats.by_annotator["self:v1"].votes) == (
        2,
        1,
        1,
    )


def test_self_labels_train_only_when_chosen_and_with_their_weight(session: Session, tmp_path: Path):
    v1(session)
    add_self_labels(session, "v1", [label(weight=0.25)])
    default = preference_pairs(session)
    assert (default.pairs, default.left_out) == ([], 1)
    assert VoteSelection().include_self is False
    chosen = VoteSelection(include_self=True)
    [pair] = preference_pairs(session, selection=chosen).pairs
    assert (pair.annotator, pair.weight) == ("self:v1", 0.25)
    [kept] = select_round(session, [pair], chosen)
    assert kept.weight == 0.25
    assert export_preferences(session, tmp_path / "out.jsonl", selection=chosen) == 1
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert (row["chosen"], row["rejected"], row["weight"]) == ("Mars.", "A banana.", 0.25)
    assert [(r.completion, r.weight) for r in kto_rows(session, selection=chosen).rows] == [
        ("Mars.", 0.25),
        ("A banana.", 0.25),
    ]
    assert kto_rows(session).rows == []
    assert VoteSelection.from_dict(chosen.to_dict()) == chosen
    assert "include_self" not in VoteSelection().to_dict()  # a default run's record as before


@pytest.mark.parametrize("mode", VOTE_MODES)
def test_a_persons_vote_overrides_the_models(session: Session, mode: str):
    v1(session)
    add_self_labels(session, "v1", [label(), label("Name a fruit.", "A pear.", "Mars.")])
    ids = stored_ids(session, "Name a planet.")
    person(session, ids, "A banana.", "Mars.", "ann")  # ann disagrees with the model
    chosen = VoteSelection(mode, include_self=True)
    got = preference_pairs(session, selection=chosen)
    assert [(p.chosen, p.annotator) for p in got.pairs] == [
        ("A pear.", "self:v1"),
        ("A banana.", "ann"),
    ]
    assert (got.overridden, got.left_out) == (1, 0)
    # ann left out: her vote is not read, so it overrides nothing
    without_ann = VoteSelection(mode, ("ann",), include_self=True)
    got = preference_pairs(session, selection=without_ann)
    assert [p.chosen for p in got.pairs] == ["Mars.", "A pear."]
    assert (got.overridden, got.left_out) == (0, 1)


def test_how_often_people_agreed_with_the_self_labels(session: Session):
    """v1 labels four pairs; people judge three: one agreed, one not, one a tie (not the same
    side); a pair two people judged agrees by their majority. v2 has labels nobody judged."""
    v1(session)
    register_adapter_version(session, base_model="m", adapter_path="/a/v2")
    labels = [label(f"Q{i}?", f"good {i}", f"bad {i}") for i in range(5)]
    add_self_labels(session, "v1", labels)
    add_self_labels(session, "v1", [label("Q9?", "x", "y", scorer="reward-model")])
    add_self_labels(session, "v2", [label("Q7?", "good 7", "bad 7")])
    on = {i: stored_ids(session, f"Q{i}?") for i in range(5)}
    person(session, on[0], "good 0", "bad 0", "ann")  # agrees
    person(session, on[1], "bad 1", "good 1", "ann")  # disagrees
    person(session, on[2], "=", "good 2", "ann")  # a tie: not the same side
    person(session, on[3], "good 3", "bad 3", "ann")  # two of three agree: the majority does
    person(session, on[3], "good 3", "bad 3", "bob")
    person(session, on[3], "bad 3", "good 3", "cy")
    record_preference(  # a judge's vote is not a person's
        session,
        response_a_id=on[4]["bad 4"],
        response_b_id=on[4]["good 4"],
        choice="a",
        annotator="judge:qwen",
    )
    got = self_label_agreement(session)
    assert got == [
        SelfLabelAgreement(
            "v1", "implicit", 5, judged=4, agreed=2, people_votes=6, people_agreed=3
        ),
        SelfLabelAgreement("v1", "reward-model", 1),
        SelfLabelAgreement("v2", "implicit", 1),
    ]
    assert got[0].sentence() == (
        "People agreed with v1's own labels (implicit) on 2 of 4 pairs they also judged."
    )
    assert got[0].rate == 0.5 and got[2].rate is None
    assert got[2].sentence() == (
        "People have not yet judged any of the 1 pairs of v2's own labels (implicit)."
    )


def test_the_cli_imports_self_labels_exports_them_when_chosen_and_reports_agreement(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """`python -m dpo_core self-label`'s file goes in with `import-self-labels`; `export
    --include-self` writes it with its weight; `stats` counts people apart and says how often
    people agreed."""
    sm = open_db(db_url)
    with sm.begin() as s:
        v1(s)
    sm.kw["bind"].dispose()
    made = {"margin": 2.0, "weight": 0.5, "scorer": "implicit", "annotator": "self:v1"}
    rows = [
        {"prompt": "Name a planet.", "chosen": "Mars.", "rejected": "A banana."} | made,
        {"prompt": "Name a fruit.", "chosen": "A pear.", "rejected": "Mars."} | made,
    ]
    labels = tmp_path / "self.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for _ in range(2):
        assert main(["import-self-labels", str(labels), "--db", db_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{labels}: 2 labels read, 2 new votes by self:v1, 0 already there",
        f"{labels}: 2 labels read, 0 new votes by self:v1, 2 already there",
    ]
    exported = tmp_path / "out.jsonl"
    assert main(["export", str(exported), "--db", db_url]) == 2  # people's votes only: none
    assert main(["export", str(exported), "--db", db_url, "--include-self"]) == 0
    written = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [(r["chosen"], r["weight"], r["annotator"]) for r in written] == [
        ("Mars.", 0.5, "self:v1"),
        ("A pear.", 0.5, "self:v1"),
    ]
    capsys.readouterr()
    assert main(["stats", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "votes all: 2 " in out and "votes by people: 0 " in out
    assert "over 0 pairs with two or more votes" in out
    assert "People have not yet judged any of the 2 pairs of v1's own labels (implicit)." in out


def test_cli_stats_agreement_counts_people_only(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Defect: `python -m storage stats` counted an AI judge's votes in agreement (alpha, AC1,
    per annotator) while the Data tab did not."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"prompt": "Name a planet.", "chosen": "Mars.", "rejected": "A banana."}) + "\n",
        encoding="utf-8",
    )
    for who in ("ann", "judge:qwen"):
        assert main(["import-pairs", str(pairs), "--db", db_url, "--annotator", who]) == 0
    assert main(["stats", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "over 0 pairs with two or more votes" in out
    assert "  ann: 1 votes" in out and "  judge:qwen: 1 votes" not in out


LABEL_ROW = {"annotator": "self:v1", "prompt": "p", "chosen": "a", "rejected": "b", "scorer": "s"}


@pytest.mark.parametrize(
    ("row", "version", "message"),
    [
        ("not json", None, "line 1: not JSON"),
        ([1, 2], None, "line 1: expected a JSON object"),
        (LABEL_ROW | {"annotator": None, "margin": 1}, None, "line 1: no annotator"),
        ({"annotator": "ann"}, None, "annotator 'ann' is not a version"),
        ({"annotator": "self:v2"}, "v1", "a label by v2, not by v1: one version per file"),
        (LABEL_ROW | {"prompt": ["x"]}, None, "'prompt' must be a string"),
        (LABEL_ROW | {"margin": "high"}, None, "'margin' must be a number, got 'high'"),
    ],
)
def test_a_bad_self_label_file_is_refused_naming_the_line(
    tmp_path: Path, row: object, version: str | None, message: str
):
    path = tmp_path / "self.jsonl"
    line = row if isinstance(row, str) else json.dumps(row)
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_self_labels(path, version)
    with pytest.raises(ValueError, match="cannot read the self-labels"):
        read_self_labels(tmp_path / "missing.jsonl")


def test_the_reward_model_fits_on_peoples_pairs_off_the_version_and_calibrates_on_its_own(
    session: Session,
):
    """`own_answer_votes`: people's A/B votes on two answers by the version (the scorer's
    evidence); `other_answer_votes`: the rest (base answers, imported ones), the newest
    `limit`, oldest first. Ties, the model's own votes and a pair mixing versions are in
    neither where they say nothing about a version's own answers."""
    version = v1(session)
    base = session.scalar(select(ModelVersion).where(ModelVersion.name == "base"))

    def pair(prompt: str, by: list[int | None], choice: str = "b", who: str = "ann") -> None:
        pid = add_prompt(session, prompt, source="t").id
        ids = [
            record_response(session, prompt_id=pid, model_version_id=v, text=f"{prompt} {i}").id
            for i, v in enumerate(by)
        ]
        record_preference(
            session, response_a_id=ids[0], response_b_id=ids[1], choice=choice, annotator=who
        )

    pair("Base one?", [base.id, base.id])
    pair("Imported?", [None, None], choice="a")
    pair("Base two?", [base.id, base.id])
    pair("A tie?", [base.id, base.id], choice="tie")
    pair("By the model?", [base.id, base.id], who="self:v1")
    pair("Own?", [version.id, version.id])
    pair("Mixed?", [base.id, version.id])
    own = own_answer_votes(session, version.id)
    assert [(v.prompt, v.chosen, v.rejected) for v in own] == [("Own?", "Own? 1", "Own? 0")]
    others = other_answer_votes(session, version.id, limit=10)
    assert [(v.prompt, v.chosen) for v in others] == [
        ("Base one?", "Base one? 1"),
        ("Imported?", "Imported? 0"),
        ("Base two?", "Base two? 1"),
    ]
    assert [v.prompt for v in other_answer_votes(session, version.id, limit=2)] == [
        "Imported?",
        "Base two?",
    ]
