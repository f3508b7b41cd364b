"""The label queue's order: the uncertain-first setting, scores per version, and how
`next_prompt` uses them (least labeled still first; unscored prompts in the default order)."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage.db import open_db
from storage.repo import add_prompts, next_prompt, record_preference, record_response
from storage.runs import ensure_base_version, register_adapter_version
from storage.uncertainty import (
    LEAST_LABELED,
    UNCERTAIN_FIRST,
    PromptScore,
    queue_order,
    record_scores,
    set_queue_order,
    unscored_window,
    version_scores,
)


def prompts(session: Session, n: int) -> list[int]:
    return list(add_prompts(session, [f"p{i}" for i in range(1, n + 1)]).ids.values())


def versions(session: Session) -> tuple[int, int]:
    base = ensure_base_version(session, "m").id
    v1 = register_adapter_version(session, base_model="m", adapter_path="/a/v1", activate=False)
    return base, v1.id


def vote(session: Session, prompt_id: int, annotator: str, version_id: int) -> None:
    a, b = (
        record_response(
            session, prompt_id=prompt_id, model_version_id=version_id, text=f"{annotator} {x}"
        ).id
        for x in "xy"
    )
    record_preference(session, response_a_id=a, response_b_id=b, choice="a", annotator=annotator)


def test_the_order_is_least_labeled_until_an_admin_sets_it_and_it_persists(db_url: str):
    sm = open_db(db_url)
    with sm.begin() as s:
        assert queue_order(s) == LEAST_LABELED
        set_queue_order(s, UNCERTAIN_FIRST)
    sm.kw["bind"].dispose()
    reopened: sessionmaker[Session] = open_db(db_url)  # a restart, or another replica
    with reopened.begin() as s:
        assert queue_order(s) == UNCERTAIN_FIRST
        set_queue_order(s, LEAST_LABELED)
    with reopened.begin() as s:
        assert queue_order(s) == LEAST_LABELED
    reopened.kw["bind"].dispose()


def test_an_unknown_order_is_refused_and_the_stored_one_kept(session: Session):
    set_queue_order(session, UNCERTAIN_FIRST)
    with pytest.raises(ValueError, match="unknown queue order 'random'; choose one of"):
        set_queue_order(session, "random")
    assert queue_order(session) == UNCERTAIN_FIRST


def test_least_sure_first_among_the_least_labeled_then_unscored(session: Session):
    ids = prompts(session, 4)
    base, v1 = versions(session)
    record_scores(
        session, v1, [PromptScore(ids[2], 0.1, "implicit_reward"), PromptScore(ids[1], 0.5, "x")]
    )
    assert next_prompt(session, "ann").id == ids[0]  # the default order ignores scores
    assert next_prompt(session, "ann", uncertain_for=v1).id == ids[2]
    assert next_prompt(session, "ann", uncertain_for=v1, exclude=[ids[2]]).id == ids[1]
    assert next_prompt(session, "ann", uncertain_for=v1, exclude=ids[1:3]).id == ids[0]
    assert next_prompt(session, "ann", uncertain_for=base).id == ids[0]  # scores are per version
    vote(session, ids[2], "ann", v1)  # labeled by ann: her unlabeled prompts come first
    assert next_prompt(session, "ann", uncertain_for=v1).id == ids[1]
    vote(session, ids[1], "bob", v1)  # labeled by someone: the unlabeled ones come first
    assert next_prompt(session, "ann", uncertain_for=v1).id == ids[0]
    assert next_prompt(session, "cat", uncertain_for=v1).id == ids[0]


def test_a_prompt_keeps_its_first_score_per_version(session: Session):
    ids = prompts(session, 2)
    base, v1 = versions(session)
    assert record_scores(session, v1, [PromptScore(ids[0], 0.3, "implicit_reward")]) == 1
    assert record_scores(session, v1, [PromptScore(ids[0], 9.0, "implicit_reward")]) == 0
    assert record_scores(session, base, [PromptScore(ids[0], 2.0, "mean_logp")]) == 1
    assert version_scores(session, v1) == {ids[0]: pytest.approx(0.3)}
    assert version_scores(session, base) == {ids[0]: pytest.approx(2.0)}
    with pytest.raises(ValueError, match="a margin is >= 0"):
        record_scores(session, v1, [PromptScore(ids[1], -1.0, "implicit_reward")])


def test_the_window_is_the_least_labeled_prompts_not_yet_scored(session: Session):
    ids = prompts(session, 5)
    heldout = add_prompts(session, ["held"], split="heldout").ids["held"]
    base, v1 = versions(session)
    vote(session, ids[0], "ann", base)
    assert [c.prompt_id for c in unscored_window(session, v1, 3)] == ids[1:4]
    record_scores(session, v1, [PromptScore(ids[2], 0.2, "implicit_reward")])
    assert [c.prompt_id for c in unscored_window(session, v1, 3)] == [ids[1], ids[3]]
    assert [c.text for c in unscored_window(session, base, 1)] == ["p2"]
    assert heldout not in [c.prompt_id for c in unscored_window(session, v1, 10)]
