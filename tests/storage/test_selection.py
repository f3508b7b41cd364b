"""What trains when several annotators judged the same two answers: majority, unanimous, every;
leaving annotators out; AI judges' votes off unless chosen. On a real database (SQLite, and
PostgreSQL when DPO_STUDIO_TEST_PG_URL is set)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage.__main__ import main
from storage.repo import preference_pairs, record_preference, unknown_annotators, vote_annotators
from storage.selection import VoteSelection, agreed_outcome
from tests.storage.test_repo import answers

HUMANS = ("ann", "bob", "cat")


def vote(
    session: Session,
    ids: list[int],
    choice: str,
    annotator: str,
    *,
    swap: bool = False,
    rewrite: str | None = None,
) -> None:
    """`choice` about ids[0] (`a`) and ids[1] (`b`); `swap`: shown the other way round."""
    a, b = ids
    if swap:
        a, b, choice = b, a, {"a": "b", "b": "a"}.get(choice, choice)
    record_preference(
        session,
        response_a_id=a,
        response_b_id=b,
        choice=choice,
        annotator=annotator,
        rewrite=rewrite,
    )


def three_annotators(session: Session) -> None:
    """Five prompts, each pair of answers judged by ann, bob and cat (sides vary):
    split 2-1 (A wins), unanimous (B wins), a 1-1-1 three-way split, 1-1 between two voters
    (cat skipped it), and 2-1 where the one is a tie (still a majority)."""
    split = answers(session, "split", "split-A", "split-B")
    for who, choice, swap in (("ann", "a", False), ("bob", "a", True), ("cat", "b", False)):
        vote(session, split, choice, who, swap=swap)
    same = answers(session, "same", "same-A", "same-B")
    for who in HUMANS:
        vote(session, same, "b", who, swap=who == "bob")
    three = answers(session, "three-way", "three-A", "three-B")
    for who, choice in zip(HUMANS, ("a", "b", "tie"), strict=True):
        vote(session, three, choice, who)
    even = answers(session, "even", "even-A", "even-B")
    vote(session, even, "a", "ann")
    vote(session, even, "b", "bob", swap=True)
    tie_blocks = answers(session, "tie minority", "tm-A", "tm-B")
    for who, choice in zip(HUMANS, ("b", "tie", "b"), strict=True):
        vote(session, tie_blocks, choice, who)


def got(session: Session, **selection: object) -> list[tuple[str, str, str]]:
    result = preference_pairs(session, selection=VoteSelection(**selection))  # type: ignore[arg-type]
    return [(p.prompt, p.chosen, p.rejected) for p in result.pairs]


def test_majority_trains_the_agreed_answer_once_and_ties_of_votes_not_at_all(session: Session):
    three_annotators(session)
    result = preference_pairs(session)  # the default is majority
    assert [(p.prompt, p.chosen, p.rejected) for p in result.pairs] == [
        ("split", "split-A", "split-B"),
        ("same", "same-B", "same-A"),
        ("tie minority", "tm-B", "tm-A"),
    ]
    assert result.undecided == 2  # the three-way split and the 1-1
    assert [p.annotator for p in result.pairs] == ["ann, bob", "ann, bob, cat", "ann, cat"]


def test_unanimous_trains_only_pairs_everyone_agreed_on(session: Session):
    three_annotators(session)
    assert got(session, votes="unanimous") == [("same", "same-B", "same-A")]
    assert preference_pairs(session, selection=VoteSelection("unanimous")).undecided == 4


def test_every_vote_is_its_own_pair(session: Session):
    three_annotators(session)
    result = preference_pairs(session, selection=VoteSelection("every"))
    assert len(result.pairs) == 3 + 3 + 2 + 2 + 2  # every A/B vote
    assert ("even", "even-B", "even-A") in [(p.prompt, p.chosen, p.rejected) for p in result.pairs]
    assert (result.excluded_ties, result.undecided) == (2, 0)


def test_a_tie_or_both_bad_can_block_a_majority(session: Session):
    ids = answers(session, "p", "A", "B")
    vote(session, ids, "a", "ann")
    vote(session, ids, "both_bad", "bob")
    assert got(session) == []
    vote(session, ids, "both_bad", "cat")  # now both-bad is the majority: still nothing trains
    result = preference_pairs(session)
    assert (result.pairs, result.excluded_both_bad, result.undecided) == ([], 1, 0)


def test_rewrites_by_those_who_agreed_train_against_the_rejected_answer(session: Session):
    ids = answers(session, "p", "A", "B")
    vote(session, ids, "a", "ann", rewrite="A, but better")
    vote(session, ids, "a", "bob")
    vote(session, ids, "b", "cat", rewrite="B, but better")  # outvoted: its rewrite is not used
    assert got(session) == [("p", "A, but better", "B"), ("p", "A", "B")]
    assert sorted(got(session, votes="every")) == [
        ("p", "A", "B"),
        ("p", "A, but better", "B"),
        ("p", "B, but better", "A"),
    ]


def test_one_vote_per_pair_gives_the_same_pairs_in_every_mode(session: Session):
    for i, (choice, rewrite) in enumerate([("a", None), ("b", "better"), ("both_bad", "fix")]):
        vote(session, answers(session, f"p{i}", "A", "B"), choice, "ann", rewrite=rewrite)
    assert got(session) == got(session, votes="unanimous") == got(session, votes="every")
    assert len(got(session)) == 4


def test_leave_out_ignores_an_annotator_s_votes(session: Session):
    three_annotators(session)
    result = preference_pairs(session, selection=VoteSelection(leave_out=("cat",)))
    assert [(p.prompt, p.chosen) for p in result.pairs] == [
        ("split", "split-A"),
        ("same", "same-B"),
        # three-way: ann a, bob b: 1-1, undecided; even: 1-1; tie minority: ann b, bob tie
    ]
    assert (result.undecided, result.left_out) == (3, 4)
    assert "cat" not in ", ".join(p.annotator for p in result.pairs)


def test_judge_votes_are_off_unless_chosen(session: Session):
    ids = answers(session, "p", "A", "B")
    vote(session, ids, "a", "ann")
    vote(session, ids, "b", "judge:qwen")
    vote(session, ids, "b", "judge:llama", swap=True)
    result = preference_pairs(session)
    assert ([(p.chosen, p.annotator) for p in result.pairs], result.left_out) == ([("A", "ann")], 2)
    with_judges = VoteSelection(include_judges=True)
    (pair,) = preference_pairs(session, selection=with_judges).pairs
    assert (pair.chosen, pair.annotator) == ("B", "judge:qwen, judge:llama")
    only_one_judge = VoteSelection(votes="every", leave_out=("judge:qwen",), include_judges=True)
    assert {p.annotator for p in preference_pairs(session, selection=only_one_judge).pairs} == {
        "ann",
        "judge:llama",
    }


def test_unknown_annotators_are_named(session: Session):
    vote(session, answers(session, "p", "A", "B"), "a", "ann")
    assert vote_annotators(session) == ["ann"]
    selection = VoteSelection(leave_out=("ann", "nobody", " "))
    assert selection.leave_out == ("ann", "nobody")  # blank names dropped
    assert unknown_annotators(session, selection) == ["nobody"]


def test_an_unknown_votes_mode_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="votes must be one of majority, unanimous, every"):
        VoteSelection(votes="most")


def test_selection_round_trips_through_a_run_config():
    selection = VoteSelection("unanimous", ("b", "a"), include_judges=True)
    assert VoteSelection.from_dict(json.loads(json.dumps(selection.to_dict()))) == selection
    assert VoteSelection.from_dict(None) == VoteSelection()  # a run from before the setting


@pytest.mark.parametrize(
    ("choices", "majority", "unanimous"),
    [
        (["a"], "a", "a"),
        (["a", "a", "b"], "a", None),
        (["a", "b"], None, None),
        (["a", "b", "tie"], None, None),
        (["tie", "tie", "a"], "tie", None),
        ([], None, None),
    ],
)
def test_agreed_outcome(choices: list[str], majority: str | None, unanimous: str | None):
    assert agreed_outcome(choices, "majority") == majority
    assert agreed_outcome(choices, "unanimous") == unanimous


def test_export_cli_flags(
    db: sessionmaker[Session], db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with db.begin() as s:
        three_annotators(s)
        vote(s, answers(s, "judged", "j-A", "j-B"), "a", "judge:qwen")

    def export(*flags: str) -> list[str]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.jsonl"
        assert main(["export", str(out), "--db", db_url, *flags]) == 0
        return [json.loads(line)["prompt"] for line in out.read_text().splitlines()]

    assert export() == ["split", "same", "tie minority"]
    assert export("--votes", "unanimous") == ["same"]
    assert len(export("--votes", "every")) == 12
    only_ann = ["split", "same", "three-way", "even", "tie minority"]
    assert export("--leave-out", "cat", "--leave-out", "bob") == only_ann
    assert export("--include-judges") == ["split", "same", "tie minority", "judged"]
    capsys.readouterr()
    assert export("--leave-out", "dave") == ["split", "same", "tie minority"]
    assert "no votes by 'dave'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "x.jsonl"), "--db", db_url, "--votes", "most"])
    assert "invalid choice: 'most'" in capsys.readouterr().err
