"""The app's one shutdown path: serving ends (Ctrl-C, an error) -> `Services.close()` ->
`TrainingService.close()`, which stops the watcher and waits for it, so no weights are loading
when the interpreter exits."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import app.__main__ as app_main
from app.config import AppConfig
from app.train.service import TrainingService
from storage import runs
from storage.db import open_db


def _service(tmp_path: Path, on_version_change) -> TrainingService:
    url = f"sqlite:///{tmp_path / 'studio.db'}"
    return TrainingService(
        open_db(url),
        db_url=url,
        data_dir=tmp_path,
        base_model="tiny",
        model_settings={"model": "tiny", "device": "cpu"},
        on_version_change=on_version_change,
        poll_interval_s=0.01,
    )


def test_close_waits_for_the_watchers_version_load_and_is_idempotent(tmp_path):
    loading, loaded = threading.Event(), []

    def slow_load(name: str, path: str | None) -> None:
        if name == "v1":  # the watcher's load, after a run made v1 active
            loading.set()
            service._stop.wait()  # still loading when the app closes
            time.sleep(0.2)
            loaded.append(name)

    service = _service(tmp_path, slow_load)
    service.start_watcher()  # serves base at once
    with service.sm.begin() as s:
        runs.register_adapter_version(s, base_model="tiny", adapter_path=str(tmp_path / "v1"))
    loading.wait()
    service.close()
    assert loaded == ["v1"]  # close returned after the load ended
    assert not service._watcher.is_alive()
    service.close()  # twice: nothing to do
    service.sync_active_version()  # closed: no new load starts
    assert loaded == ["v1"]


def test_close_before_the_watcher_started_is_harmless(tmp_path):
    service = _service(tmp_path, None)
    service.close()
    service.start_watcher()  # a closed service starts no watcher
    assert service._watcher is None


class _Demo:
    def queue(self) -> _Demo:
        return self

    def launch(self, **_: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while serving


def test_serve_closes_the_services_however_serving_ends(monkeypatch):
    closed = []
    services = SimpleNamespace(sm=None, close=lambda: closed.append(True))
    state = app_main.AppState(config=AppConfig(), lm=None, model_name="x", services=services)
    monkeypatch.setattr("app.auth.web.share_sign_in", lambda sign_in, sm: None)
    monkeypatch.setattr(app_main, "build_demo", lambda state, sign_in: _Demo())
    with pytest.raises(KeyboardInterrupt):
        app_main.serve(state, {})
    assert closed == [True]
