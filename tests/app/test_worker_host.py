"""Replicas share the data directory, so a worker's pid file may come from another machine:
only a process on the worker's own machine judges it by its pid; any replica fails a run
whose heartbeat stopped (a real SQLite store, no training)."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from app.train.service import STALE_AFTER_S, TrainingService, read_host
from app.train.worker import host_file, pid_file, this_host, write_pid
from storage import runs
from storage.db import open_db
from storage.models import TrainingRun, now_utc


@pytest.fixture
def sm(tmp_path: Path):
    return open_db(f"sqlite:///{tmp_path / 'studio.db'}")


@pytest.fixture
def service(sm, tmp_path: Path) -> TrainingService:
    return TrainingService(
        sm,
        db_url=f"sqlite:///{tmp_path / 'studio.db'}",
        data_dir=tmp_path,
        base_model="tiny",
        model_settings={"model": "tiny", "dtype": "fp32", "device": "cpu"},
    )


def _running_run(sm) -> int:
    with sm.begin() as s:
        run_id = runs.create_run(s, base_model="tiny", config={}, num_pairs=1).id
        runs.start_run(s, run_id)
    return run_id


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _status(sm, run_id: int) -> str:
    with sm.begin() as s:
        return runs.get_run(s, run_id).status


def test_the_worker_records_its_host_with_its_pid(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_STUDIO_HOST_ID", "gpu7")
    write_pid(tmp_path, 3)
    assert read_host(tmp_path, 3) == "gpu7" and pid_file(tmp_path, 3).is_file()
    monkeypatch.delenv("DPO_STUDIO_HOST_ID")
    assert this_host().count("/") == 1  # host name / boot id


def test_a_dead_pid_from_another_machine_does_not_fail_the_run(service, sm, tmp_path):
    run_id = _running_run(sm)
    pid_file(tmp_path, run_id).parent.mkdir(parents=True)
    host_file(tmp_path, run_id).write_text("another-machine")
    pid_file(tmp_path, run_id).write_text(str(_dead_pid()))  # a pid that means nothing here
    assert service.check_workers() == []
    assert _status(sm, run_id) == "running"
    host_file(tmp_path, run_id).write_text(this_host())  # the same pid on this machine: dead
    assert service.check_workers() == [run_id]
    assert _status(sm, run_id) == "failed"


def test_any_replica_fails_a_run_whose_heartbeat_stopped(service, sm):
    run_id = _running_run(sm)
    assert service.fail_stale_runs() == []
    with sm.begin() as s:
        s.get(TrainingRun, run_id).heartbeat_at = now_utc() - timedelta(seconds=STALE_AFTER_S + 1)
    assert service.fail_stale_runs() == [run_id]
    with sm.begin() as s:
        assert "no heartbeat" in runs.get_run(s, run_id).error
