"""Shared pieces of the deployment benchmarks (`bench/load.py`, `bench/faults.py`): a real app
process on the tiny model, annotator accounts, an HTTP status counter for gradio_client, the
votes as the database holds them, and percentiles."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/load.py` from the repository root
    sys.path.insert(0, str(ROOT))

from app.auth.users import UserStore  # noqa: E402
from tests.app.server import AppProcess, free_port, start_app  # noqa: E402, F401

ADMIN = "lead"


def tiny_model(directory: Path) -> Path:
    """The tests' tiny random Llama chat model, written once into `directory`."""
    from tests.tiny import save_tiny_model

    if not (directory / "config.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        save_tiny_model(directory)
    return directory


def make_users(path: Path, annotators: int) -> dict[str, str]:
    """An admin plus `annotators` annotator accounts; returns name -> password."""
    store = UserStore(path)
    accounts = {ADMIN: "lead-password-1"}
    store.add(ADMIN, "admin", accounts[ADMIN], replace=True)
    for i in range(annotators):
        name = f"ann{i:02d}"
        accounts[name] = f"{name}-password"
        store.add(name, "annotator", accounts[name], replace=True)
    return accounts


def serve(model: str, data_dir: Path, auth_file: Path | None, *extra: str) -> AppProcess:
    args = [*extra] + (["--auth-file", str(auth_file)] if auth_file else [])
    return start_app(model, data_dir, *args)


class HttpStatus:
    """Counts every HTTP response gradio_client receives, by status code (it talks through
    httpx; a patched `send` sees each response, streaming ones included)."""

    def __init__(self) -> None:
        self.codes: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, Any]] = []

    def install(self) -> HttpStatus:
        import httpx

        def wrap(cls: Any) -> None:
            original = cls.send
            is_async = cls is httpx.AsyncClient

            if is_async:

                async def send(client: Any, *args: Any, **kwargs: Any) -> Any:
                    response = await original(client, *args, **kwargs)
                    self._count(response.status_code)
                    return response
            else:

                def send(client: Any, *args: Any, **kwargs: Any) -> Any:
                    response = original(client, *args, **kwargs)
                    self._count(response.status_code)
                    return response

            cls.send = send
            self._saved.append((cls, original))

        wrap(httpx.Client)
        wrap(httpx.AsyncClient)
        return self

    def uninstall(self) -> None:
        for cls, original in self._saved:
            cls.send = original
        self._saved.clear()

    def _count(self, code: int) -> None:
        with self._lock:
            self.codes[code] += 1

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.codes.items() if code >= 500)


@dataclass(frozen=True)
class StoredVote:
    annotator: str
    prompt: str
    choice: str


def stored_votes(db_url: str) -> list[StoredVote]:
    """Every preference row with its prompt text (a fresh connection, as after a restart)."""
    from sqlalchemy import select

    from storage.db import open_db
    from storage.models import Preference, Prompt

    sm = open_db(db_url)
    try:
        with sm.begin() as s:
            rows = s.execute(
                select(Preference.annotator, Prompt.text, Preference.choice).join(
                    Prompt, Prompt.id == Preference.prompt_id
                )
            ).all()
    finally:
        sm.kw["bind"].dispose()
    return [StoredVote(*row) for row in rows]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of a live process (VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def children_peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


@dataclass
class PipedApp:
    """An app process whose output goes to a pipe (not a file on the data disk)."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    lines: deque[str]

    @property
    def db_url(self) -> str:
        return f"sqlite:///{(self.data_dir / 'studio.db').resolve()}"

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def app_command(model: str, data_dir: Path, port: int, auth_file: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "app", "--model", model, "--data-dir", str(data_dir)]
    cmd += ["--port", str(port)] + (["--auth-file", str(auth_file)] if auth_file else [])
    return cmd


def launch_piped(cmd: list[str], port: int, data_dir: Path, timeout_s: float = 300) -> PipedApp:
    """Run `cmd` (serving on `port`) with its output drained from a pipe; return once it
    answers HTTP or has exited (check `proc.poll()`)."""
    import os
    import urllib.request

    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    app = PipedApp(proc, f"http://127.0.0.1:{port}/", data_dir, deque(maxlen=2000))

    def drain() -> None:
        for raw in proc.stdout:  # type: ignore[union-attr]
            app.lines.append(raw.decode(errors="replace").rstrip("\n"))

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(app.url, timeout=5) as response:
                if response.status == 200:
                    return app
        except OSError:
            time.sleep(0.5)
    if proc.poll() is None:
        app.stop()
        raise RuntimeError(f"the app did not answer within {timeout_s} s:\n{app.output()}")
    proc.wait()
    time.sleep(0.2)  # let the drain thread read the last lines
    return app
