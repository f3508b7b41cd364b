"""Which votes train, as the Train tab sees it: the pair count before Train follows the choice,
and the run's config records it. On a real database (SQLite, and PostgreSQL when
DPO_STUDIO_TEST_PG_URL is set), with the worker launch left out (no training here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.compare.service import _latest_selection
from app.train.pairs import stored_pairs
from app.train.service import TrainingService, TrainRequest
from storage import runs
from storage.selection import VoteSelection
from tests.app.worker_pairs import worker_read
from tests.storage.conftest import db, db_url  # noqa: F401 (fixtures: both back ends)
from tests.storage.test_repo import answers
from tests.storage.test_selection import three_annotators, vote


@pytest.fixture
def service(db: sessionmaker[Session], db_url: str, tmp_path: Path, monkeypatch):  # noqa: F811
    svc = TrainingService(
        db,
        db_url=db_url,
        data_dir=tmp_path,
        base_model="tiny",
        model_settings={"model": "tiny", "dtype": "fp32", "device": "cpu"},
    )
    monkeypatch.setattr(svc, "_launch", lambda run_id, devices=1: None)
    with db.begin() as s:
        three_annotators(s)
        vote(s, answers(s, "judged", "j-A", "j-B"), "a", "judge:qwen")
    return svc


def test_the_pair_count_before_train_follows_the_votes_chosen(service: TrainingService):
    def usable(**chosen: object) -> int:
        return service.summary(VoteSelection(**chosen))["usable_pairs"]  # type: ignore[arg-type]

    assert service.summary()["usable_pairs"] == usable() == 3  # majority of human votes
    assert service.summary()["undecided"] == 2 and service.summary()["left_out"] == 1
    assert usable(votes="unanimous") == 1
    assert usable(votes="every") == 12
    assert usable(votes="every", include_judges=True) == 13
    assert usable(leave_out=("bob", "cat")) == 5
    assert service.annotators() == ["ann", "bob", "cat", "judge:qwen"]


def test_the_run_config_records_the_choice_and_the_run_reads_it_back(
    service: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
):
    request = TrainRequest(votes="every", leave_out=("cat", "dave"), include_judge_votes=True)
    result = service.start(request)
    assert result.ok, result.message
    assert "Nobody named 'dave' has voted" in result.message
    with db.begin() as s:
        run = runs.get_run(s, result.run_id)
        chosen = run.config["votes"]
        assert chosen == {"votes": "every", "leave_out": ["cat", "dave"], "include_judges": True}
        assert "votes" not in run.config["train"]  # not a dpo_core setting
        again = stored_pairs(s, run.config["heldout_fraction"], 1, VoteSelection.from_dict(chosen))
        # every A/B vote by ann and bob (2 + 2 + 2 + 2 + 1), and the judge's
        assert run.num_pairs == len(again.train) + len(again.heldout) == 9 + 1
        # Compare's held-out pairs (the reward evaluation) use the same choice of votes
        assert _latest_selection(s) == VoteSelection.from_dict(chosen)


def test_an_unknown_votes_mode_is_refused_before_any_run(
    service: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
):
    result = service.start(TrainRequest(votes="most"))
    assert not result.ok
    assert result.message == (
        "Invalid settings: votes must be one of majority, unanimous, every, got 'most'"
    )
    with db.begin() as s:
        assert runs.list_runs(s) == []


def test_the_worker_trains_on_the_votes_the_run_chose(
    service: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
    tmp_path: Path,
    monkeypatch,
):
    """The worker's own read of the pairs (the model load and the training loop stubbed)."""
    read = worker_read(service, db, TrainRequest(votes="unanimous"), tmp_path, monkeypatch)
    assert [p["prompt"] for p in read.pairs] == ["same"]
