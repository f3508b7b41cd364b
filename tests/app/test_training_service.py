"""The training service on a real SQLite store: refusals, cancel, dead-worker recovery, status."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.train.pairs import stored_pairs
from app.train.service import TrainingService, TrainRequest, pid_alive, steps_table
from app.train.worker import pid_file
from storage import repo, runs
from storage.db import open_db


@pytest.fixture
def sm(tmp_path: Path):
    return open_db(f"sqlite:///{tmp_path / 'studio.db'}")


@pytest.fixture
def service(sm, tmp_path: Path) -> TrainingService:
    svc = TrainingService(
        sm,
        db_url=f"sqlite:///{tmp_path / 'studio.db'}",
        data_dir=tmp_path,
        base_model="tiny",
        model_settings={"model": "tiny", "dtype": "fp32", "device": "cpu"},
    )
    svc.recover()
    return svc


def _vote(sm, prompt: str, choice: str, split: str = "train") -> None:
    with sm.begin() as s:
        prompt_id = repo.add_prompt(s, prompt, split=split).id
        a, b = (
            repo.record_response(s, prompt_id=prompt_id, model_version_id=None, text=text)
            for text in (f"first answer to {prompt}", f"second answer to {prompt}")
        )
        repo.record_preference(
            s, response_a_id=a.id, response_b_id=b.id, choice=choice, annotator="ann"
        )


def _run_count(sm) -> int:
    with sm.begin() as s:
        return len(runs.list_runs(s))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_zero_usable_pairs_is_refused_with_a_clear_message(service, sm):
    _vote(sm, "Is water wet?", "tie")
    _vote(sm, "Name a colour.", "both_bad")
    result = service.start(TrainRequest())
    assert not result.ok
    assert "No usable preference pairs" in result.message
    assert "1 ties and 1 both-bad" in result.message
    assert _run_count(sm) == 0
    assert service.summary()["usable_pairs"] == 0


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"beta": 0.0}, "beta"),
        ({"learning_rate": -1.0}, "learning"),
        ({"heldout_fraction": 0.9}, "held-out fraction"),
        ({"epochs": 0}, "epochs"),
        ({"loss_type": "nope"}, "nope"),
    ],
)
def test_invalid_settings_are_refused_before_any_run(service, sm, settings, needle):
    _vote(sm, "Name a planet.", "a")
    result = service.start(TrainRequest(**settings))
    assert not result.ok
    assert result.message.startswith("Invalid settings")
    assert needle in result.message
    assert _run_count(sm) == 0


def test_one_job_at_a_time(service, sm):
    _vote(sm, "Name a planet.", "a")
    with sm.begin() as s:
        live = runs.create_run(s, base_model="tiny", config={}, num_pairs=1)
        runs.start_run(s, live.id)
    pid_file(service.data_dir, live.id).parent.mkdir(parents=True, exist_ok=True)
    pid_file(service.data_dir, live.id).write_text(str(os.getpid()))
    result = service.start(TrainRequest())
    assert not result.ok
    assert f"Run #{live.id} is running: one training job at a time" in result.message
    assert _run_count(sm) == 1


def test_cancel_marks_the_live_run_cancelled(service, sm):
    assert service.cancel() == "No training run is in progress."
    with sm.begin() as s:
        run_id = runs.create_run(s, base_model="tiny", config={}, num_pairs=1).id
    assert f"Run #{run_id} cancelled" in service.cancel()
    assert service.status().status == "cancelled"


def test_recover_fails_a_run_whose_worker_is_gone(service, sm):
    with sm.begin() as s:
        run_id = runs.create_run(s, base_model="tiny", config={}, num_pairs=1).id
        runs.start_run(s, run_id)
    pid = _dead_pid()
    assert not pid_alive(pid)
    pid_file(service.data_dir, run_id).parent.mkdir(parents=True, exist_ok=True)
    pid_file(service.data_dir, run_id).write_text(str(pid))
    assert service.recover() == [run_id]
    status = service.status()
    assert status.status == "failed"
    assert f"pid {pid}" in status.error and "gone" in status.error
    assert status.message.startswith(f"Run #{run_id} failed")


def _partial_save(service: TrainingService) -> tuple[Path, Path]:
    """What a worker killed inside `save_adapter` leaves (a temp dir), next to a saved v1."""
    adapters = service.data_dir / "adapters"
    (adapters / "v1").mkdir(parents=True)
    (adapters / "v1" / "adapter_config.json").write_text("{}")
    (adapters / ".v2-k1ll3d").mkdir()
    (adapters / ".v2-k1ll3d" / "adapter_model.safetensors").write_bytes(b"half")
    return adapters / "v1", adapters / ".v2-k1ll3d"


def test_recover_removes_what_a_killed_adapter_save_left(service):
    saved, partial = _partial_save(service)
    service.recover()
    assert not partial.exists()
    assert (saved / "adapter_config.json").is_file()  # saved versions are never touched


def test_recover_keeps_a_run_whose_worker_is_alive(service, sm):
    with sm.begin() as s:
        run_id = runs.create_run(s, base_model="tiny", config={}, num_pairs=1).id
        runs.start_run(s, run_id)
    pid_file(service.data_dir, run_id).parent.mkdir(parents=True, exist_ok=True)
    pid_file(service.data_dir, run_id).write_text(str(os.getpid()))
    _saved, partial = _partial_save(service)
    assert service.recover() == []
    assert service.status().status == "running"
    assert partial.exists()  # the live worker may be writing it


def test_status_reports_step_total_and_eta(service, sm):
    with sm.begin() as s:
        run_id = runs.create_run(s, base_model="tiny", config={}, num_pairs=8).id
        runs.start_run(s, run_id)
        for step, time_s in ((1, 10.0), (2, 14.0)):  # 4 s per step
            metrics = {"loss": 0.7 - 0.1 * step, "total_steps": 8, "time_s": time_s}
            runs.append_metrics(s, run_id, step, metrics)
    pid_file(service.data_dir, run_id).parent.mkdir(parents=True, exist_ok=True)
    pid_file(service.data_dir, run_id).write_text(str(os.getpid()))
    status = service.status()
    assert (status.run_id, status.status, status.step, status.total_steps) == (
        run_id,
        "running",
        2,
        8,
    )
    assert status.eta_s == pytest.approx(6 * 4.0)  # 6 steps left at 4 s each
    assert service.head() == (run_id, "running")
    assert [m["loss"] for m in status.metrics] == pytest.approx([0.6, 0.5])


def test_the_kl_readout_samples_every_heldout_prompt_also_those_without_a_pair(sm):
    _vote(sm, "Tell me about tea.", "a")
    _vote(sm, "Tell me about jazz.", "b", split="heldout")
    _vote(sm, "Tell me about salt.", "tie", split="heldout")  # no usable pair
    with sm.begin() as s:
        repo.add_prompt(s, "Why is the sea salty?", split="heldout")  # no votes yet
        pairs = stored_pairs(s, heldout_fraction=0.0, min_heldout=8)
    assert [p["prompt"] for p in pairs.train] == ["Tell me about tea."]
    assert [p["prompt"] for p in pairs.heldout] == ["Tell me about jazz."]
    assert pairs.readout_prompts == [
        "Tell me about jazz.", "Tell me about salt.", "Why is the sea salty?",
    ]  # fmt: skip


def test_steps_table_pivots_series_by_step():
    series = {"loss": [(1, 0.7), (2, 0.6)], "rewards/margins": [(2, 0.1)]}
    assert steps_table(series) == [
        {"step": 1, "loss": 0.7},
        {"step": 2, "loss": 0.6, "rewards/margins": 0.1},
    ]


@pytest.mark.slow
def test_the_worker_gets_the_database_url_from_its_environment_not_its_command_line(
    service, sm, tmp_path
):
    """`ps` shows every process's argv to every user: a PostgreSQL password in the URL would
    be there. The worker still reaches the database (it marks the run started)."""
    _vote(sm, "Name a planet.", "a")
    started = service.start(TrainRequest(epochs=1))  # model "tiny" does not load: it fails
    assert started.ok, started.message
    proc = service.workers.procs[started.run_id]
    url = f"sqlite:///{tmp_path / 'studio.db'}"
    argv = [str(a) for a in proc.args]
    assert not any(url in a or "studio.db" in a for a in argv), argv
    assert "--db" not in argv
    proc.wait()
    with sm.begin() as s:
        run = runs.get_run(s, started.run_id)
        assert run.started_at is not None  # the worker's own write
        assert run.status == "failed" and not run.error.startswith("the training worker")


class _SlowToExit:
    """A worker process that is still stopping: `wait` blocks until released."""

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.release = threading.Event()
        self.args = ["worker"]

    def wait(self, timeout: float | None = None) -> int:
        self.waiting.set()
        self.release.wait()
        raise subprocess.TimeoutExpired(self.args, timeout or 0)

    def poll(self) -> int | None:
        return None


def test_waiting_for_a_stopping_worker_does_not_hold_the_service_lock(service, sm):
    """Train waits up to STOP_GRACE_S for the previous worker; the watcher and a version
    switch must not wait with it."""
    _vote(sm, "Name a planet.", "a")
    stopping = _SlowToExit()
    service.workers.procs[41] = stopping  # type: ignore[assignment]
    results = []
    starter = threading.Thread(target=lambda: results.append(service.start(TrainRequest())))
    starter.start()
    stopping.waiting.wait()
    try:
        assert not service._lock.locked()
        assert service.check_workers() == []  # the watcher's check goes on meanwhile
        assert "No version named 'v9'" in service.activate_version("v9").message  # takes the lock
    finally:
        stopping.release.set()
        starter.join()
    assert not results[0].ok and "Run #41's worker is still stopping" in results[0].message
    assert _run_count(sm) == 0


def test_a_run_without_held_out_pairs_reports_the_prompts_its_kl_readout_reads(
    service, sm, tmp_path, monkeypatch
):
    """The KL note's number comes from the worker's own read (before it: the start's count by
    the same rule, `app.train.run_inputs.kl_readout_prompts`)."""
    from app.train import worker
    from app.train.tab import kl_note

    monkeypatch.setattr(service, "_launch", lambda run_id, devices=1: None)
    for i in range(6):
        _vote(sm, f"Name planet number {i}.", "a")
    with sm.begin() as s:
        for i in range(3):
            repo.add_prompt(s, f"A prompt nobody labeled, {i}?")
    run_id = service.start(TrainRequest(heldout_fraction=0.0)).run_id
    status = service.status(run_id)
    assert (status.heldout_pairs, status.readout_prompts) == (0, 3)
    assert "3 prompts not trained on" in kl_note(status)
    with sm.begin() as s:
        repo.add_prompt(s, "A prompt added before the worker read, 4?")
        config = runs.get_run(s, run_id).config
    worker.read_job(sm, run_id, config, tmp_path)
    status = service.status(run_id)
    assert status.readout_prompts == 4  # what the worker read
    assert "4 prompts not trained on" in kl_note(status)
