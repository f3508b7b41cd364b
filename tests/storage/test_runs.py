"""Model versions and the training-run lifecycle."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from storage.models import TrainingRun, now_utc
from storage.runs import (
    RunStateError,
    activate_version,
    active_version,
    append_metrics,
    cancel_run,
    create_run,
    ensure_base_version,
    fail_dead_runs,
    fail_run,
    finish_run,
    get_run,
    heartbeat,
    list_runs,
    list_versions,
    live_run,
    output_version,
    register_adapter_version,
    run_metrics,
    start_run,
)

CONFIG = {"loss_type": "sigmoid", "beta": 0.1, "learning_rate": 5e-5, "epochs": 1}


def new_run(session: Session, **kw) -> TrainingRun:
    base = ensure_base_version(session, "m")
    return create_run(
        session, base_model="m", config=CONFIG, num_pairs=12, parent_version_id=base.id, **kw
    )


def test_base_version_is_created_once_and_active(session: Session):
    base = ensure_base_version(session, "m")
    assert ensure_base_version(session, "m").id == base.id
    assert (base.name, base.kind, base.adapter_path) == ("base", "base", None)
    assert active_version(session, "m").id == base.id
    other = ensure_base_version(session, "another/model")  # versions belong to one base model
    assert active_version(session, "another/model").id == other.id
    assert active_version(session, "m").id == base.id


def test_adapter_versions_are_numbered_and_activated(session: Session):
    base = ensure_base_version(session, "m")
    v1 = register_adapter_version(session, base_model="m", adapter_path="/a/v1", parent_id=base.id)
    v2 = register_adapter_version(
        session, base_model="m", adapter_path="/a/v2", parent_id=v1.id, activate=False
    )
    assert (v1.name, v2.name) == ("v1", "v2")
    assert v2.parent.name == "v1"
    assert active_version(session, "m").id == v1.id
    activate_version(session, base.id)
    assert active_version(session, "m").id == base.id
    assert [v.name for v in list_versions(session, "m")] == ["base", "v1", "v2"]
    assert [v.is_active for v in list_versions(session, "m")] == [True, False, False]
    with pytest.raises(ValueError, match="no model version"):
        activate_version(session, 999_999)


def test_run_lifecycle_to_a_new_active_version(session: Session):
    run = new_run(session)
    assert (run.status, run.num_pairs, run.config) == ("queued", 12, CONFIG)
    assert live_run(session).id == run.id
    start_run(session, run.id)
    assert run.status == "running" and run.started_at is not None
    before = run.heartbeat_at
    assert heartbeat(session, run.id).heartbeat_at >= before
    append_metrics(session, run.id, 1, {"loss": 0.69, "rewards/margins": 0.0})
    append_metrics(session, run.id, 2, {"loss": 0.5, "rewards/margins": 0.3})
    version = finish_run(session, run.id, adapter_path="/adapters/v1")
    assert run.status == "succeeded" and run.finished_at >= run.started_at
    assert (version.name, version.training_run_id, version.parent.name) == ("v1", run.id, "base")
    assert active_version(session, "m").id == version.id
    assert output_version(session, run.id).id == version.id
    assert live_run(session) is None
    assert run_metrics(session, run.id) == {
        "loss": [(1, 0.69), (2, 0.5)],
        "rewards/margins": [(1, 0.0), (2, 0.3)],
    }


def test_one_live_run_at_a_time(session: Session):
    first = new_run(session)
    with pytest.raises(RunStateError, match=f"training run {first.id} is queued"):
        new_run(session)
    start_run(session, first.id)
    with pytest.raises(RunStateError, match="is running"):
        new_run(session)
    fail_run(session, first.id, "CUDA out of memory")
    second = new_run(session)  # a finished run frees the slot
    assert [r.id for r in list_runs(session)] == [second.id, first.id]


def test_the_database_itself_refuses_a_second_live_run(session: Session):
    first = new_run(session)
    session.add(TrainingRun(base_model="m", config={}, num_pairs=0, status="running"))
    with pytest.raises(Exception, match="uq_training_runs_one_live"):
        session.flush()
    session.rollback()
    assert first.id is not None


@pytest.mark.parametrize(
    ("steps", "move"),
    [
        ((), "finish"),  # a queued run cannot succeed
        (("start", "finish"), "start"),
        (("cancel",), "start"),
        (("start", "fail"), "cancel"),
        (("start", "cancel"), "finish"),
    ],
)
def test_impossible_moves_are_refused(session: Session, steps: tuple[str, ...], move: str):
    run = new_run(session)
    moves = {
        "start": lambda: start_run(session, run.id),
        "finish": lambda: finish_run(session, run.id, adapter_path="/a/v1"),
        "fail": lambda: fail_run(session, run.id, "boom"),
        "cancel": lambda: cancel_run(session, run.id),
    }
    for step in steps:
        moves[step]()
    status = run.status
    with pytest.raises(RunStateError, match=f"is {status}; it cannot become"):
        moves[move]()
    assert get_run(session, run.id).status == status


def test_a_cancel_reaches_the_worker_through_its_heartbeat(session: Session):
    run = new_run(session)
    start_run(session, run.id)
    cancel_run(session, run.id)
    assert heartbeat(session, run.id).status == "cancelled"  # the worker stops here
    assert active_version(session, "m").name == "base"


def test_metrics_are_idempotent_and_non_finite_values_become_null(session: Session):
    run = new_run(session)
    start_run(session, run.id)
    append_metrics(session, run.id, 1, {"loss": float("nan"), "grad_norm": math.inf})
    append_metrics(session, run.id, 1, {"loss": 0.1})  # a retried step changes nothing
    append_metrics(session, run.id, 2, {})
    assert run_metrics(session, run.id) == {"loss": [(1, None)], "grad_norm": [(1, None)]}


def test_runs_whose_worker_died_are_marked_failed(session: Session):
    stale = now_utc() - timedelta(seconds=120)
    dead = new_run(session)
    start_run(session, dead.id)
    session.execute(update(TrainingRun).values(heartbeat_at=stale))
    assert fail_dead_runs(session, timeout_s=300) == []  # not stale enough yet
    failed = fail_dead_runs(session, timeout_s=60)
    assert [r.id for r in failed] == [dead.id]
    assert dead.status == "failed" and "no heartbeat for 60 s" in dead.error
    never_started = new_run(session)
    session.execute(
        update(TrainingRun).where(TrainingRun.id == never_started.id).values(created_at=stale)
    )
    assert [r.id for r in fail_dead_runs(session, timeout_s=60)] == [never_started.id]
    assert "not started" in get_run(session, never_started.id).error
    alive = new_run(session)
    start_run(session, alive.id)
    assert fail_dead_runs(session, timeout_s=60) == []


def test_unknown_ids(session: Session):
    with pytest.raises(ValueError, match="no training run with id 42"):
        start_run(session, 42)
    with pytest.raises(ValueError, match="no model version with id 7"):
        create_run(session, base_model="m", config={}, num_pairs=0, parent_version_id=7)
