"""Repository functions for prompts, responses, votes, training pairs, stats and blind votes."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Preference, Prompt, Response
from storage.repo import (
    Matchup,
    add_prompt,
    add_prompts,
    comparison_counts,
    list_prompts,
    next_prompt,
    preference_pairs,
    record_comparison_vote,
    record_preference,
    record_response,
    store_stats,
)
from storage.runs import ensure_base_version, register_adapter_version


def answers(
    session: Session, prompt_text: str, *texts: str, new_adapter: bool = False
) -> list[int]:
    """Responses to one prompt from `base` (or from a newly registered adapter); their ids."""
    prompt = add_prompt(session, prompt_text)
    version_id = ensure_base_version(session, "m").id
    if new_adapter:
        version_id = register_adapter_version(
            session, base_model="m", adapter_path="/adapters/x", activate=False
        ).id
    return [
        record_response(
            session,
            prompt_id=prompt.id,
            model_version_id=version_id,
            text=t,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=64,
            seed=i,
            num_tokens=3,
            latency_s=0.5,
        ).id
        for i, t in enumerate(texts)
    ]


def count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model))


def test_add_prompts_deduplicates_and_keeps_input_order(session: Session):
    first = add_prompts(session, ["b", "a", "  b  ", "", "   "], source="file.txt")
    assert (first.added, first.duplicates, first.blank) == (2, 1, 2)
    assert list(first.ids) == ["b", "a"]
    assert [session.get_one(Prompt, i).text for i in first.ids.values()] == ["b", "a"]
    again = add_prompts(session, ["c", "a"], split="heldout")
    assert (again.added, again.duplicates) == (1, 1)
    assert again.ids["a"] == first.ids["a"]
    assert session.get_one(Prompt, again.ids["a"]).split == "train"  # first write wins
    assert [p.text for p in list_prompts(session, split="heldout")] == ["c"]


def test_add_prompts_in_bulk(session: Session):
    result = add_prompts(session, [f"prompt {i}" for i in range(1234)] * 2)
    assert (result.added, result.duplicates, len(result.ids)) == (1234, 1234, 1234)
    assert count(session, Prompt) == 1234


def test_bad_prompt_input(session: Session):
    with pytest.raises(ValueError, match="empty"):
        add_prompt(session, "  \n ")
    with pytest.raises(ValueError, match=r"NUL character \(U\+0000\)"):
        add_prompt(session, "a\x00b")
    with pytest.raises(ValueError, match="unknown split"):
        add_prompts(session, ["x"], split="test")


def test_next_prompt_unlabeled_by_me_first_then_least_labeled(session: Session):
    ids = list(add_prompts(session, ["p1", "p2", "p3"]).ids.values())
    heldout = add_prompt(session, "held out", split="heldout")
    assert next_prompt(session, "ann").id == ids[0]

    def vote(prompt: str, annotator: str) -> None:
        a, b = answers(session, prompt, f"{prompt} {annotator} x", f"{prompt} {annotator} y")
        record_preference(
            session, response_a_id=a, response_b_id=b, choice="a", annotator=annotator
        )

    vote("p1", "ann")
    vote("p2", "other")
    vote("p2", "third")
    vote("p3", "other")
    # p2 and p3 are unlabeled by ann; p3 has fewer votes overall.
    assert next_prompt(session, "ann").id == ids[2]
    assert next_prompt(session, "ann", exclude=[ids[2]]).id == ids[1]
    assert next_prompt(session, "ann", exclude=ids[1:]).id == ids[0]  # all mine come last
    assert next_prompt(session, "ann", split="heldout").id == heldout.id
    assert next_prompt(session, "ann", exclude=ids) is None


def test_record_response_keeps_how_it_was_made(session: Session):
    (rid,) = answers(session, "p", "an answer")
    response = session.get_one(Response, rid)
    assert response.model_version.name == "base"
    assert (response.temperature, response.top_p, response.seed) == (0.8, 0.95, 0)
    assert (response.num_tokens, response.latency_s, response.max_new_tokens) == (3, 0.5, 64)


def test_a_response_with_a_nul_character_is_refused(session: Session):
    prompt = add_prompt(session, "p")
    with pytest.raises(ValueError, match="the response contains a NUL character"):
        record_response(session, prompt_id=prompt.id, model_version_id=None, text="a\x00")


def test_a_vote_twice_is_one_vote(session: Session):
    a, b = answers(session, "p", "x", "y")
    first, created = record_preference(
        session, response_a_id=a, response_b_id=b, choice="a", annotator="ann", seconds_spent=4.0
    )
    assert created
    again, created_again = record_preference(
        session, response_a_id=a, response_b_id=b, choice="a", annotator="ann"
    )
    swapped, created_swapped = record_preference(  # the same two answers shown the other way
        session, response_a_id=b, response_b_id=a, choice="b", annotator="ann"
    )
    changed, created_changed = record_preference(
        session, response_a_id=a, response_b_id=b, choice="tie", annotator="ann"
    )
    assert not (created_again or created_swapped or created_changed)
    assert again.id == swapped.id == changed.id == first.id
    assert changed.choice == "a"  # the first vote stands
    assert count(session, Preference) == 1
    _, other = record_preference(
        session, response_a_id=a, response_b_id=b, choice="b", annotator="someone else"
    )
    assert other
    assert count(session, Preference) == 2


def test_swapped_display_order_keeps_the_meaning_of_the_vote(session: Session):
    a, b = answers(session, "p", "good", "bad")
    record_preference(session, response_a_id=b, response_b_id=a, choice="b", annotator="ann")
    (pair,) = preference_pairs(session).pairs
    assert (pair.chosen, pair.rejected) == ("good", "bad")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"choice": "skip"}, "unknown choice"),
        ({"annotator": "  "}, "annotator name is empty"),
        ({"seconds_spent": -1.0}, "seconds_spent"),
        ({"response_b_id": "same"}, "two different responses"),
        ({"response_b_id": 999_999}, "no response with id 999999"),
        ({"response_b_id": "other prompt"}, "different prompts"),
        ({"rewrite": "nul\x00"}, "the rewrite contains a NUL character"),
    ],
)
def test_bad_votes_are_refused(session: Session, change: dict, message: str):
    a, b = answers(session, "p", "x", "y")
    (elsewhere,) = answers(session, "another prompt", "z")
    vote = {"response_a_id": a, "response_b_id": b, "choice": "a", "annotator": "ann", **change}
    vote["response_b_id"] = {"same": a, "other prompt": elsewhere}.get(
        vote["response_b_id"], vote["response_b_id"]
    )
    with pytest.raises(ValueError, match=message):
        record_preference(session, **vote)
    assert count(session, Preference) == 0


def test_preference_pairs_from_each_kind_of_vote(session: Session):
    def vote(prompt: str, choice: str, rewrite: str | None = None) -> None:
        a, b = answers(session, prompt, f"{prompt}-A", f"{prompt}-B")
        record_preference(
            session,
            response_a_id=a,
            response_b_id=b,
            choice=choice,
            annotator="ann",
            rewrite=rewrite,
        )

    vote("p1", "a")
    vote("p2", "b")
    vote("p3", "tie")
    vote("p4", "both_bad")
    vote("p5", "b", rewrite="p5-better")
    vote("p6", "both_bad", rewrite="p6-better")
    vote("p7", "a", rewrite="   ")  # a blank rewrite is no rewrite
    result = preference_pairs(session)
    got = [(p.prompt, p.chosen, p.rejected) for p in result.pairs]
    assert got == [
        ("p1", "p1-A", "p1-B"),
        ("p2", "p2-B", "p2-A"),
        ("p5", "p5-better", "p5-A"),
        ("p6", "p6-better", "p6-A"),
        ("p6", "p6-better", "p6-B"),
        ("p7", "p7-A", "p7-B"),
    ]
    assert (result.excluded_ties, result.excluded_both_bad) == (1, 1)
    provenance = {
        (p.prompt, p.chosen_model_version, p.rejected_model_version) for p in result.pairs
    }
    assert ("p1", "base", "base") in provenance
    assert ("p5", None, "base") in provenance  # a human rewrite has no model version
    assert store_stats(session).overall.usable_pairs == len(result.pairs)


def test_preference_pairs_by_split(session: Session):
    held = add_prompt(session, "held", split="heldout")
    a, b = answers(session, "train prompt", "x", "y")
    c, d = answers(session, held.text, "x", "y")
    for r1, r2 in ((a, b), (c, d)):
        record_preference(session, response_a_id=r1, response_b_id=r2, choice="a", annotator="n")
    assert [p.prompt for p in preference_pairs(session).pairs] == ["train prompt"]
    assert [p.prompt for p in preference_pairs(session, split="heldout").pairs] == ["held"]
    assert len(preference_pairs(session, split=None).pairs) == 2


def test_adapter_versions_are_named_in_pairs(session: Session):
    (a,) = answers(session, "p", "from base")
    (b,) = answers(session, "p", "from v1", new_adapter=True)
    record_preference(session, response_a_id=a, response_b_id=b, choice="b", annotator="ann")
    (pair,) = preference_pairs(session).pairs
    assert (pair.chosen_model_version, pair.rejected_model_version) == ("v1", "base")


def test_stats_per_annotator_and_overall(session: Session):
    add_prompt(session, "unlabeled", split="heldout")
    for i, (annotator, choice) in enumerate(
        [("ann", "a"), ("ann", "tie"), ("bob", "b"), ("bob", "both_bad"), ("bob", "a")]
    ):
        a, b = answers(session, f"p{i}", "x", "y")
        record_preference(
            session, response_a_id=a, response_b_id=b, choice=choice, annotator=annotator
        )
    stats = store_stats(session)
    assert stats.prompts == {"train": 5, "heldout": 1}
    assert stats.responses == 10
    assert stats.overall.votes == 5
    assert stats.overall.by_choice == {"a": 2, "b": 1, "tie": 1, "both_bad": 1}
    assert stats.overall.usable_pairs == 3
    assert list(stats.by_annotator) == ["ann", "bob"]
    assert (stats.by_annotator["ann"].votes, stats.by_annotator["ann"].usable_pairs) == (2, 1)
    assert stats.by_annotator["bob"].by_choice == {"a": 1, "b": 1, "tie": 0, "both_bad": 1}


def test_stats_on_an_empty_database(session: Session):
    stats = store_stats(session)
    assert stats.prompts == {"train": 0, "heldout": 0}
    assert (stats.responses, stats.overall.votes, stats.by_annotator) == (0, 0, {})


def test_repository_functions_never_commit(db: sessionmaker[Session]):
    with db() as session:
        a, b = answers(session, "p", "x", "y")
        record_preference(session, response_a_id=a, response_b_id=b, choice="a", annotator="n")
        session.rollback()
    with db() as session:
        assert count(session, Preference) == count(session, Prompt) == 0


def test_blind_votes_and_win_table(session: Session):
    base_ids = answers(session, "p", "base 1", "base 2", "base 3")
    v1_ids = answers(session, "p", "v1 1", "v1 2", "v1 3", new_adapter=True)
    winners = ["left", "right", "tie"]  # v1 shown left: v1 wins, base wins, tie
    for left, right, winner in zip(v1_ids, base_ids, winners, strict=True):
        _, created = record_comparison_vote(
            session, response_left_id=left, response_right_id=right, winner=winner, annotator="a"
        )
        assert created
    _, created = record_comparison_vote(  # once more: a no-op
        session,
        response_left_id=v1_ids[0],
        response_right_id=base_ids[0],
        winner="left",
        annotator="a",
    )
    assert not created
    record_comparison_vote(  # base shown left and winning
        session,
        response_left_id=base_ids[0],
        response_right_id=v1_ids[1],
        winner="left",
        annotator="a",
    )
    assert comparison_counts(session) == [Matchup("base", "v1", x_wins=2, ties=1, y_wins=1)]


def test_blind_votes_need_two_versions(session: Session):
    a, b = answers(session, "p", "x", "y")
    with pytest.raises(ValueError, match="two different model versions"):
        record_comparison_vote(
            session, response_left_id=a, response_right_id=b, winner="left", annotator="ann"
        )
    with pytest.raises(ValueError, match="unknown winner"):
        record_comparison_vote(
            session, response_left_id=a, response_right_id=b, winner="a", annotator="ann"
        )
