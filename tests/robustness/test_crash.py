"""kill -9 the app in the middle of a burst of votes: every vote a client got an answer for is in
the database afterwards (opened fresh, as the restarted app opens it). `bench/faults.py votes`
runs the same with sign-in and a restart of the app."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from gradio_client import Client

from bench.harness import stored_votes
from bench.label_api import LabelApi
from tests.app.server import start_app, wait_until

pytestmark = pytest.mark.slow


def _burst(url: str, name: str, stop: threading.Event, acked: list[str]) -> None:
    label = LabelApi(Client(url, verbose=False))
    i = 0
    while not stop.is_set():
        prompt = f"[{name} #{i}] crash burst"
        i += 1
        try:
            pair = label.generate(prompt, annotator=name)
            # Without sign-in the annotator is the free-text name, sent with the vote.
            label.vote(pair, "a", annotator=name)
        except Exception:  # the app is gone: unacknowledged votes may be lost, that is all
            return
        acked.append(prompt)


def test_acknowledged_votes_survive_kill_9(tiny_model_dir: Path, tmp_path: Path):
    app = start_app(str(tiny_model_dir), tmp_path / "data", "--dtype", "fp32", "--device", "cpu")
    stop = threading.Event()
    logs: dict[str, list[str]] = {f"crash{i}": [] for i in range(3)}
    threads = [threading.Thread(target=_burst, args=(app.url, n, stop, logs[n])) for n in logs]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: sum(map(len, logs.values())) >= 15, 300, what="15 votes")
        app.proc.send_signal(signal.SIGKILL)
        app.proc.wait()
    finally:
        stop.set()
        app.stop()
        for t in threads:
            t.join(timeout=60)
    time.sleep(0.1)
    acked = {(name, prompt) for name, prompts in logs.items() for prompt in prompts}
    stored = {(v.annotator, v.prompt) for v in stored_votes(app.db_url)}
    assert len(acked) >= 15
    assert acked <= stored, f"lost: {sorted(acked - stored)}"
