"""Run `python -m app` as a subprocess for HTTP tests (gradio_client) and browser tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AppProcess:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log_path: Path

    @property
    def db_url(self) -> str:
        return f"sqlite:///{(self.data_dir / 'studio.db').resolve()}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the app, and any training worker it left running (they outlive the app)."""
        for pid_path in (self.data_dir / "runs").glob("run-*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_path.read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"app.train.worker" in cmdline:  # not a reused pid
                    os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_app(model: str, data_dir: Path, *extra: str, ready_timeout_s: float = 300) -> AppProcess:
    """Start the app on a free port and wait until it answers HTTP."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"app-{port}.log"
    cmd = [
        sys.executable, "-m", "app", "--model", model, "--data-dir", str(data_dir),
        "--port", str(port), *extra,
    ]  # fmt: skip
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    app = AppProcess(proc, f"http://127.0.0.1:{port}/", data_dir, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}:\n{app.log()}")
        try:
            with urllib.request.urlopen(app.url, timeout=5) as response:
                if response.status == 200:
                    return app
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    app.stop()
    raise RuntimeError(f"the app did not answer within {ready_timeout_s} s:\n{app.log()}")


def wait_until(predicate, timeout_s: float, interval_s: float = 0.25, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`.

    Not a wall-clock assertion: the generous timeout only keeps a broken build from hanging.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
