"""Rounds in the Train tab: label the active version's answers, train on them (train on parent),
label the new version's answers. The count "since vK was made", the invitation to the next
round, what a run with train_on=parent or newest uses (the service's count and the worker's
own read), the lineage in the run history and the versions table. On a real database (SQLite,
and PostgreSQL when DPO_STUDIO_TEST_PG_URL is set), the worker launch left out; where the
worker reads its pairs, the model load and the training loop are stubbed (no training here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.train.service import TrainingService, TrainRequest
from app.train.tab import history_frame, summary_markdown
from app.train.version_panel import version_rows
from storage import repo, runs
from tests.app.worker_pairs import worker_read
from tests.storage.conftest import db, db_url  # noqa: F401 (fixtures: both back ends)

MODEL = "tiny"


@pytest.fixture
def service(db: sessionmaker[Session], db_url: str, tmp_path: Path, monkeypatch):  # noqa: F811
    svc = TrainingService(
        db,
        db_url=db_url,
        data_dir=tmp_path,
        base_model=MODEL,
        model_settings={"model": MODEL, "dtype": "fp32", "device": "cpu"},
    )
    monkeypatch.setattr(svc, "_launch", lambda run_id, devices=1: None)
    return svc


def label(sm: sessionmaker[Session], version: str, *prompts: str) -> None:
    """A vote on two answers to each prompt, written by `version`."""
    with sm.begin() as s:
        version_id = next(v.id for v in runs.list_versions(s, MODEL) if v.name == version)
        for prompt in prompts:
            prompt_id = repo.add_prompt(s, prompt).id
            a, b = (
                repo.record_response(
                    s, prompt_id=prompt_id, model_version_id=version_id, text=f"{prompt} {i}"
                )
                for i in range(2)
            )
            repo.record_preference(
                s, response_a_id=a.id, response_b_id=b.id, choice="a", annotator="ann"
            )


def finish(sm: sessionmaker[Session], run_id: int, name: str) -> None:
    """The worker's last move: the run succeeded and its adapter is the new active version."""
    with sm.begin() as s:
        runs.start_run(s, run_id)
        runs.finish_run(s, run_id, adapter_path=f"/adapters/{name}")


@pytest.fixture
def round_two(service: TrainingService, db: sessionmaker[Session]) -> TrainingService:  # noqa: F811
    """Round 1: three pairs of the base's answers made v1 (active); then two pairs labeled on
    v1's answers."""
    with db.begin() as s:
        runs.ensure_base_version(s, MODEL)
    label(db, "base", "base one", "base two", "base three")
    first = service.start(TrainRequest())
    assert first.ok, first.message
    finish(db, first.run_id, "v1")
    label(db, "v1", "v1 one", "v1 two")
    return service


def test_the_tab_counts_pairs_on_the_active_versions_answers_and_invites_the_next_round(
    round_two: TrainingService,
):
    info = round_two.summary()
    assert (info["active_version"], info["on_active"], info["round_size"]) == ("v1", 2, 3)
    text = summary_markdown(info)
    assert "**2** pairs labeled on v1's answers since v1 was made." in text
    assert (
        "Next round: v1 is now serving in Label: label ~3 pairs of its answers (2 so far)" in text
    )
    assert "**5** usable preference pairs" in text  # the default trains on all of them
    parent_only = round_two.summary(TrainRequest(train_on="parent").selection())
    assert parent_only["usable_pairs"] == 2
    assert "**2** usable preference pairs on v1's answers" in summary_markdown(parent_only)
    fresh = round_two.summary(TrainRequest(train_on="parent").selection(), fresh=True)
    assert "**3** usable preference pairs on base's answers" in summary_markdown(fresh)


def test_a_run_on_the_parents_answers_uses_only_those_and_records_them(
    round_two: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
):
    assert TrainRequest().train_on == "all"  # the default until an experiment says otherwise
    result = round_two.start(TrainRequest(train_on="parent"))
    assert result.ok, result.message
    assert "2 on v1's answers" in result.message
    with db.begin() as s:
        run = runs.get_run(s, result.run_id)
        assert run.num_pairs == 2
        assert run.config["pairs_by_version"] == {"v1": 2}
        assert run.config["votes"]["train_on"] == "parent"
        assert run.config["parent_version"] == "v1"


def test_the_run_history_shows_lineage_and_the_pairs_used_by_version(
    round_two: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
):
    run_id = round_two.start(TrainRequest(train_on="parent")).run_id
    finish(db, run_id, "v2")
    newest, first = round_two.history()
    assert (newest["lineage"], newest["pairs used"]) == ("v2 ← v1 ← base", "2 on v1's answers")
    assert (first["lineage"], first["pairs used"]) == ("v1 ← base", "3 on base's answers")
    frame = history_frame(round_two.history())
    assert frame["lineage"].tolist() == ["v2 ← v1 ← base", "v1 ← base"]
    assert frame["pairs"].tolist() == [
        "2 (train on parent: 2 on v1's answers)",
        "3 (3 on base's answers)",
    ]
    message = round_two.status().message
    assert "v2 is the new version" in message
    assert "v2 is now serving in Label: label ~2 pairs of its answers" in message
    rows = {r["version"]: r for r in version_rows(round_two)}
    assert rows["v2"]["lineage"] == "v2 ← v1 ← base"
    assert [rows[v]["pairs on its answers"] for v in ("base", "v1", "v2")] == [3, 2, 0]


def test_parent_with_no_pairs_on_its_answers_is_refused_with_a_clear_message(
    round_two: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
):
    run_id = round_two.start(TrainRequest(train_on="parent")).run_id
    finish(db, run_id, "v2")
    result = round_two.start(TrainRequest(train_on="parent"))
    assert not result.ok
    assert result.message.startswith("No pairs were labeled on v2's answers yet: label some")
    assert "choose train on: all" in result.message
    with db.begin() as s:
        assert len(runs.list_runs(s)) == 2
    assert round_two.start(TrainRequest(train_on="all")).ok  # all pairs still train


@pytest.mark.parametrize(
    ("train_on", "expected"),
    [
        ("parent", {"v1 one": None, "v1 two": None}),
        (
            "newest",
            {"v1 one": 1.0, "v1 two": 1.0, "base one": 0.5, "base two": 0.5, "base three": 0.5},
        ),
    ],
)
def test_the_worker_trains_on_the_round_the_run_chose(
    round_two: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
    tmp_path: Path,
    monkeypatch,
    train_on: str,
    expected: dict[str, float | None],
):
    """The worker's own read of the pairs: which, and their weights (none unless newest)."""
    read = worker_read(round_two, db, TrainRequest(train_on=train_on), tmp_path, monkeypatch)
    got = {p["prompt"]: p.get("weight") for p in read.pairs}
    assert got == expected


def test_an_unknown_train_on_choice_is_refused_before_any_run(
    service: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
):
    result = service.start(TrainRequest(train_on="latest"))
    assert not result.ok
    assert result.message == (
        "Invalid settings: train on must be one of parent, all, newest, got 'latest'"
    )
    with db.begin() as s:
        assert runs.list_runs(s) == []
