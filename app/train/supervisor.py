"""Worker supervision: the training worker runs in its own process (`app.train.worker`); this
module starts it with `subprocess`, waits for it, and tells when it died (its exit code, its pid
file, its heartbeat), failing the run it was running.

The database URL (which may hold a PostgreSQL password) reaches the worker through its
environment (`WORKER_DB_ENV`), never its command line, which any user of the machine can read
with `ps`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.train.status import age_s
from app.train.worker import WORKER_DB_ENV, host_file, log_file, pid_file, this_host
from dpo_core.distributed import launch_command
from storage import runs

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# A worker that wrote no heartbeat for this long is dead (it beats every 2 s, even mid-step).
STALE_AFTER_S = 60.0
# A queued run whose worker never started (e.g. it failed to import) is dead after this long.
START_TIMEOUT_S = 120.0
# How long Train waits for the previous worker to exit (it stops within one step of a cancel).
STOP_GRACE_S = 10.0


class WorkerSupervisor:
    """The worker processes this app started, by run id, and the checks that find dead ones.

    Its lock guards only the process table: nothing waits on a process while holding it."""

    def __init__(self, sm: sessionmaker[Session], *, db_url: str, data_dir: Path) -> None:
        self.sm = sm
        self.db_url = db_url
        self.data_dir = data_dir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def launch(self, run_id: int, devices: int = 1) -> None:
        """Start the run's worker: one process, or `devices` under torchrun. A worker that
        cannot start fails the run."""
        args = ["--run-id", str(run_id), "--data-dir", str(self.data_dir)]
        cmd = launch_command(devices, "app.train.worker", args)
        log_path = log_file(self.data_dir, run_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as log:
                # Own session: the worker survives a restart of the app (and its Ctrl-C).
                proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=REPO_ROOT,
                    env=self.worker_env(),
                    start_new_session=True,
                )
        except OSError as err:
            with self.sm.begin() as s:
                runs.fail_run(s, run_id, f"could not start the training worker: {err}")
            return
        with self._lock:
            self.procs[run_id] = proc
        logger.info("run %d: worker pid %d, log %s", run_id, proc.pid, log_path)

    def worker_env(self) -> dict[str, str]:
        """The app's environment, with the repository importable and the database URL."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env[WORKER_DB_ENV] = self.db_url
        return env

    def wait_for_exit(self, timeout_s: float) -> list[int]:
        """Give workers that are finishing (after success or a cancel) a moment to exit, so two
        never hold the model at once. Returns the runs whose worker is still alive. Waits
        without the lock: the watcher and the other actions go on meanwhile."""
        with self._lock:
            procs = list(self.procs.items())
        alive = []
        for run_id, proc in procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                alive.append(run_id)
        return alive

    def check_workers(self) -> list[int]:
        """Fail the live run when its worker process is gone; reap finished workers."""
        failed = []
        with self.sm.begin() as s:
            live = runs.live_run(s)
            for run_id, code in self._reap():
                if live is not None and live.id == run_id:
                    runs.fail_run(s, run_id, self._exit_error(run_id, code))
                    failed.append(run_id)
                    live = None
            if live is not None and not self._started_here(live.id) and self._worker_gone(live):
                pid = read_pid(self.data_dir, live.id)
                runs.fail_run(
                    s,
                    live.id,
                    f"the training worker (pid {pid}) is gone: it was killed or crashed. "
                    "The previous version stays active.",
                )
                failed.append(live.id)
        return failed

    def _reap(self) -> list[tuple[int, int]]:
        """(run id, exit code) of each worker that exited, dropped from the table."""
        with self._lock:
            done = [
                (run_id, proc) for run_id, proc in self.procs.items() if proc.poll() is not None
            ]
            for run_id, _ in done:
                del self.procs[run_id]
        return [(run_id, proc.returncode) for run_id, proc in done]

    def _started_here(self, run_id: int) -> bool:
        with self._lock:
            return run_id in self.procs

    def fail_stale_runs(self) -> list[int]:
        """Fail the runs whose worker stopped beating, wherever it ran: the check that works
        across replicas (a pid means something only on its own machine)."""
        with self.sm.begin() as s:
            failed = [run.id for run in runs.fail_dead_runs(s, timeout_s=STALE_AFTER_S)]
        if failed:
            logger.warning("marked dead training runs as failed (no heartbeat): %s", failed)
        return failed

    def _worker_gone(self, run: Any) -> bool:
        host = read_host(self.data_dir, run.id)
        if host is not None and host != this_host():
            return False  # another machine's worker: its heartbeat tells (fail_stale_runs)
        pid = read_pid(self.data_dir, run.id)
        if pid is not None:
            return not pid_alive(pid)
        age = age_s(run.created_at)
        return age is not None and age > START_TIMEOUT_S

    def _exit_error(self, run_id: int, code: int) -> str:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = _tail(log_file(self.data_dir, run_id))
        return f"the training worker {how}. The previous version stays active.\n{tail}".strip()


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(data_dir: Path, run_id: int) -> int | None:
    try:
        return int(pid_file(data_dir, run_id).read_text().strip())
    except (OSError, ValueError):
        return None


def read_host(data_dir: Path, run_id: int) -> str | None:
    """The machine the run's worker runs on (`this_host` there); None before it started."""
    try:
        return host_file(data_dir, run_id).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])
