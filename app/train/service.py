"""Training runs as the app sees them: start (validated), cancel, live status, history, the
served version. A thin facade: each job lives in its own module and this class hands off.

- `request.py`: what a person asks for (`TrainRequest`, the form's `SETTINGS`);
- `preflight.py`: what a run would train on, read once per start, and the refusals;
- `supervisor.py`: the worker processes (launch, wait, dead-worker checks);
- `activation.py`: the active version and its sync with the served model;
- `status.py` and `round_text.py`: the status, history and rounds as the Train tab shows them.

The run itself executes in a separate worker process (`app.train.worker`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import adapters_dir
from app.train import status as view
from app.train.activation import ActiveVersion
from app.train.preflight import preflight, refusal, run_config, started_message, summary_counts
from app.train.request import (  # noqa: F401  (re-exported: app.compare, bench/, tests)
    NAMES,
    SETTINGS,
    Setting,
    TrainRequest,
    build_train_config,
    config_default,
)
from app.train.status import (  # noqa: F401  (re-exported)
    ACTIVE_STATES,
    RunStatus,
    StartResult,
    busy_message,
    steps_table,
)
from app.train.supervisor import (  # noqa: F401  (re-exported: tests)
    STALE_AFTER_S,
    STOP_GRACE_S,
    WorkerSupervisor,
    pid_alive,
    read_host,
    read_pid,
)
from dpo_core.distributed import devices_problem
from dpo_core.modeling import remove_partial_saves
from storage import repo, runs
from storage.runs import RunStateError
from storage.selection import VoteSelection

logger = logging.getLogger(__name__)


class TrainingService:
    """Starts and watches training workers; one training job at a time.

    `on_version_change(name, adapter_path)` is called (from the watcher thread) whenever the
    database's active version differs from the one the app serves, e.g. after a run succeeded.
    `close()` stops and joins the watcher (the app's shutdown path; safe to call twice).
    """

    def __init__(
        self,
        sm: sessionmaker[Session],
        *,
        db_url: str,
        data_dir: Path,
        base_model: str,
        model_settings: dict[str, Any],
        on_version_change: Callable[[str, str | None], None] | None = None,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.sm = sm
        self.data_dir = Path(data_dir).resolve()
        self.base_model = base_model
        self.model_settings = model_settings
        self.poll_interval_s = poll_interval_s
        self.workers = WorkerSupervisor(sm, db_url=db_url, data_dir=self.data_dir)
        self.versions = ActiveVersion(sm, base_model, on_version_change)
        # One action at a time: a start and a version switch never interleave.
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def version_error(self) -> str | None:
        """Why the active version could not be loaded (None: it is served)."""
        return self.versions.error

    # --- lifecycle ---------------------------------------------------------------------------

    def recover(self) -> list[int]:
        """At app start: fail runs whose worker is gone (pid dead, or heartbeat stale)."""
        failed = self.check_workers() + self.fail_stale_runs()
        with self.sm.begin() as s:
            idle = runs.live_run(s) is None
        if idle:  # no worker can be saving: a temp directory is what a killed save left
            for tmp in remove_partial_saves(adapters_dir(self.data_dir)):
                logger.warning("removed %s, left by an adapter save that was interrupted", tmp)
        return failed

    def start_watcher(self) -> None:
        """Serve the active version now, then poll workers in the background, so a finished
        run switches the served model even when no browser is open."""
        self.sync_active_version()
        if self._watcher is None and not self._stop.is_set():
            self._watcher = threading.Thread(target=self._watch, name="train-watcher", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        """Stop the watcher and wait for it: no weights are loading once this returns. The
        workers keep running (they outlive the app by design). Idempotent."""
        self._stop.set()
        self.versions.stop()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.check_workers()
                self.fail_stale_runs()  # a worker on another replica's machine that died
                self.sync_active_version()
            except Exception:
                logger.exception("training watcher")

    # --- actions -----------------------------------------------------------------------------

    def start(self, request: TrainRequest) -> StartResult:
        """Validate, create a queued run and launch its worker. Never raises for user errors."""
        try:
            request.validate()
            build_train_config(request, self.model_settings, None)
            if problem := devices_problem(request.devices):
                raise ValueError(problem)
        except (ValueError, TypeError) as err:
            return StartResult(False, f"Invalid settings: {err}")
        with self.sm.begin() as s:
            if busy := _busy(s):
                return busy
        stopping = self.workers.wait_for_exit(STOP_GRACE_S)  # without the lock held
        if stopping:
            return StartResult(
                False, f"Run #{stopping[0]}'s worker is still stopping; try again in a moment."
            )
        with self._lock:
            return self._create_and_launch(request)

    def _create_and_launch(self, request: TrainRequest) -> StartResult:
        with self.sm.begin() as s:
            if busy := _busy(s):  # started meanwhile, while this one waited for workers
                return busy
            parent = self.versions.parent(s, request.continue_from_active)
            pre = preflight(s, request, parent)
            if problem := refusal(s, pre):
                return StartResult(False, problem)
            try:
                run = runs.create_run(
                    s,
                    base_model=self.base_model,
                    config=run_config(pre, self.base_model, self.model_settings),
                    num_pairs=pre.counts["usable"],
                    parent_version_id=parent.id,
                )
            except RunStateError as err:  # another start (or replica) made one meanwhile
                return StartResult(False, f"{err}. Wait for it to finish or cancel it.")
            run_id = run.id
        self._launch(run_id, request.devices)
        return StartResult(True, started_message(run_id, pre), run_id)

    def _launch(self, run_id: int, devices: int = 1) -> None:
        """Start the run's worker (tests replace this to run the worker in process)."""
        self.workers.launch(run_id, devices)

    def cancel(self) -> str:
        with self.sm.begin() as s:
            run = runs.live_run(s)
            if run is None:
                return "No training run is in progress."
            runs.cancel_run(s, run.id)
            return (
                f"Run #{run.id} cancelled: the worker stops after the current step; "
                "the previous version stays active."
            )

    def activate_version(self, name: str) -> StartResult:
        """Serve version `name` from now on (roll back or forward, no restart); refused while a
        run is live or when the adapter is gone (`ActiveVersion.activate`)."""
        with self._lock:
            return self.versions.activate(name)

    # --- watching ----------------------------------------------------------------------------

    def check_workers(self) -> list[int]:
        """Fail the live run when its worker process is gone; reap finished workers."""
        return self.workers.check_workers()

    def fail_stale_runs(self) -> list[int]:
        """Fail the runs whose worker stopped beating, wherever it ran."""
        return self.workers.fail_stale_runs()

    def sync_active_version(self) -> None:
        """Tell the model service when the active version changed in the database."""
        self.versions.sync()

    # --- reading -----------------------------------------------------------------------------

    def head(self) -> tuple[int | None, str]:
        """(id, status) of the run `status()` would show: a cheap check for changes."""
        with self.sm.begin() as s:
            return view.head(s)

    def status(self, run_id: int | None = None) -> RunStatus:
        """The live run, else the given or latest one (what a refreshed page re-attaches to).

        A run reported as succeeded is already serving: the model switch happens first."""
        self.sync_active_version()
        with self.sm.begin() as s:
            return view.read_status(s, run_id)

    def summary(
        self, selection: VoteSelection | None = None, fresh: bool = False
    ) -> dict[str, Any]:
        """Counts and versions for the Train tab's summary line (`preflight.summary_counts`);
        a round counts from the active version (`fresh`: from the base)."""
        with self.sm.begin() as s:
            active = self.versions.active(s)
            parent = self.versions.parent(s, continue_from_active=not fresh)
            counts = summary_counts(s, active, parent, selection)
        return {**counts, "base_model": self.base_model, "version_error": self.version_error}

    def history(self) -> list[dict[str, Any]]:
        """Every run, newest first, with its lineage and the pairs it used by version."""
        with self.sm.begin() as s:
            return view.read_history(s)

    def annotators(self) -> list[str]:
        """Everyone who has voted: the names "Leave out annotators" offers."""
        with self.sm.begin() as s:
            return repo.vote_annotators(s)


def _busy(s: Session) -> StartResult | None:
    """The refusal while a run is live (one training job at a time)."""
    live = runs.live_run(s)
    if live is None:
        return None
    return StartResult(False, busy_message(live.id, live.status), live.id)
