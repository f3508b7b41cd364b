"""Repository functions for model versions and the training-run lifecycle.

A run goes queued -> running -> succeeded | failed | cancelled; any other move raises
`RunStateError`. The worker calls `heartbeat` every step and stops when the run it gets back is
no longer `running` (cancelled from the UI, or declared dead by `fail_dead_runs`).
Like every repository function, these take a session and never commit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import StorageError
from storage.models import (
    LIVE_RUN_STATUSES,
    ModelVersion,
    RunMetric,
    TrainingRun,
    now_utc,
)
from storage.repo import insert_ignore

BASE = "base"


class RunStateError(StorageError):
    """A training run cannot make the asked move from the state it is in."""


def ensure_base_version(session: Session, base_model: str) -> ModelVersion:
    """The `base` version of `base_model`, created on first use; active if nothing else is."""
    row = {"base_model": base_model, "name": BASE, "kind": "base", "created_at": now_utc()}
    insert_ignore(session, ModelVersion, [row], ["base_model", "name"])
    base = session.scalars(select(ModelVersion).filter_by(base_model=base_model, name=BASE)).one()
    if active_version(session, base_model) is None:
        activate_version(session, base.id)
    return base


def register_adapter_version(
    session: Session,
    *,
    base_model: str,
    adapter_path: str,
    parent_id: int | None = None,
    training_run_id: int | None = None,
    activate: bool = True,
) -> ModelVersion:
    """Register a saved adapter directory as the next version (`v1`, `v2`, ...)."""
    names = session.scalars(
        select(ModelVersion.name).filter_by(base_model=base_model, kind="adapter")
    ).all()
    number = 1 + max((int(name[1:]) for name in names), default=0)
    version = ModelVersion(
        base_model=base_model,
        name=f"v{number}",
        kind="adapter",
        adapter_path=adapter_path,
        parent_id=parent_id,
        training_run_id=training_run_id,
    )
    session.add(version)
    session.flush()
    if activate:
        activate_version(session, version.id)
    return version


def activate_version(session: Session, version_id: int) -> ModelVersion:
    """Make this version the one that answers for its base model."""
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise ValueError(f"no model version with id {version_id}")
    # Deactivate first: the partial unique index allows one active version per base model.
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.base_model == version.base_model, ModelVersion.is_active)
        .values(is_active=False)
    )
    session.execute(
        update(ModelVersion).where(ModelVersion.id == version_id).values(is_active=True)
    )
    session.refresh(version)
    return version


def active_version(session: Session, base_model: str) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).filter_by(base_model=base_model, is_active=True)
    ).first()


def list_versions(session: Session, base_model: str | None = None) -> list[ModelVersion]:
    query = select(ModelVersion).order_by(ModelVersion.id)
    if base_model is not None:
        query = query.where(ModelVersion.base_model == base_model)
    return list(session.scalars(query))


def create_run(
    session: Session,
    *,
    base_model: str,
    config: Mapping[str, Any],
    num_pairs: int,
    parent_version_id: int | None = None,
) -> TrainingRun:
    """Queue a run. Raises RunStateError while another run is queued or running."""
    live = live_run(session)
    if live is not None:
        raise RunStateError(f"training run {live.id} is {live.status}; one run at a time")
    if parent_version_id is not None and session.get(ModelVersion, parent_version_id) is None:
        raise ValueError(f"no model version with id {parent_version_id}")
    run = TrainingRun(
        base_model=base_model,
        config=dict(config),
        num_pairs=num_pairs,
        parent_version_id=parent_version_id,
    )
    try:
        with session.begin_nested():  # the one-live-run index decides between two racing clicks
            session.add(run)
    except IntegrityError as err:
        raise RunStateError("another training run was queued just now; one run at a time") from err
    return run


def live_run(session: Session) -> TrainingRun | None:
    """The queued or running run, if any."""
    return session.scalars(
        select(TrainingRun).where(TrainingRun.status.in_(LIVE_RUN_STATUSES))
    ).first()


def get_run(session: Session, run_id: int) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise ValueError(f"no training run with id {run_id}")
    return run


def list_runs(session: Session) -> list[TrainingRun]:
    """Every run, newest first."""
    return list(session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc())))


def start_run(session: Session, run_id: int) -> TrainingRun:
    run = _transition(session, run_id, "running", ("queued",))
    run.started_at = run.heartbeat_at = now_utc()
    return run


def heartbeat(session: Session, run_id: int) -> TrainingRun:
    """Record that the worker is alive; the run comes back so the worker can see a cancel."""
    run = _locked_run(session, run_id)
    if run.status == "running":
        run.heartbeat_at = now_utc()
    return run


def append_metrics(session: Session, run_id: int, step: int, metrics: Mapping[str, float]) -> None:
    """Store one step's scalars; sending the same step again is a no-op. NaN/inf become NULL."""
    rows = [
        {"run_id": run_id, "step": step, "name": name, "value": _finite_or_none(value)}
        for name, value in metrics.items()
    ]
    insert_ignore(session, RunMetric, rows, ["run_id", "step", "name"])


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def run_metrics(session: Session, run_id: int) -> dict[str, list[tuple[int, float | None]]]:
    """`{name: [(step, value), ...]}` in step order, ready to plot."""
    series: dict[str, list[tuple[int, float | None]]] = {}
    rows = session.execute(
        select(RunMetric.name, RunMetric.step, RunMetric.value)
        .where(RunMetric.run_id == run_id)
        .order_by(RunMetric.step, RunMetric.name)
    )
    for name, step, value in rows:
        series.setdefault(name, []).append((step, value))
    return series


def finish_run(
    session: Session, run_id: int, *, adapter_path: str, activate: bool = True
) -> ModelVersion:
    """Mark the run succeeded and register its adapter as the next version (active by default)."""
    run = _transition(session, run_id, "succeeded", ("running",))
    run.finished_at = now_utc()
    return register_adapter_version(
        session,
        base_model=run.base_model,
        adapter_path=adapter_path,
        parent_id=run.parent_version_id,
        training_run_id=run.id,
        activate=activate,
    )


def fail_run(session: Session, run_id: int, error: str) -> TrainingRun:
    run = _transition(session, run_id, "failed", LIVE_RUN_STATUSES)
    run.finished_at = now_utc()
    run.error = error
    return run


def cancel_run(session: Session, run_id: int) -> TrainingRun:
    run = _transition(session, run_id, "cancelled", LIVE_RUN_STATUSES)
    run.finished_at = now_utc()
    return run


def fail_dead_runs(session: Session, *, timeout_s: float) -> list[TrainingRun]:
    """Mark failed the runs whose worker died: running with no heartbeat for `timeout_s`,
    or queued for `timeout_s` without a worker picking them up."""
    cutoff = now_utc() - timedelta(seconds=timeout_s)
    dead = session.scalars(
        select(TrainingRun)
        .where(
            ((TrainingRun.status == "running") & (TrainingRun.heartbeat_at < cutoff))
            | ((TrainingRun.status == "queued") & (TrainingRun.created_at < cutoff))
        )
        .with_for_update()
    ).all()
    for run in dead:
        what = "no heartbeat" if run.status == "running" else "not started"
        fail_run(session, run.id, f"the training worker stopped ({what} for {timeout_s:g} s)")
    return list(dead)


def output_version(session: Session, run_id: int) -> ModelVersion | None:
    """The version a succeeded run produced."""
    return session.scalars(select(ModelVersion).filter_by(training_run_id=run_id)).first()


def _locked_run(session: Session, run_id: int) -> TrainingRun:
    run = session.get(TrainingRun, run_id, with_for_update=True, populate_existing=True)
    if run is None:
        raise ValueError(f"no training run with id {run_id}")
    return run


def _transition(
    session: Session, run_id: int, to: str, allowed_from: tuple[str, ...]
) -> TrainingRun:
    run = _locked_run(session, run_id)
    if run.status not in allowed_from:
        raise RunStateError(f"training run {run_id} is {run.status}; it cannot become {to}")
    run.status = to
    return run
