"""Switching the served version through the training service (in-process, tiny model, real
SQLite): a version that does not load leaves the previous one active and serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.serving.versions import VersionedModel
from app.train.service import TrainingService
from storage import runs
from storage.db import open_db
from tests.tiny import save_random_adapter


@pytest.fixture
def setup(tiny_lm, tiny_model_dir: Path, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'studio.db'}"
    sm = open_db(url)
    models = VersionedModel(tiny_lm)
    service = TrainingService(
        sm,
        db_url=url,
        data_dir=tmp_path,
        base_model="tiny",
        model_settings={},
        on_version_change=models.activate,
    )
    with sm.begin() as s:
        runs.ensure_base_version(s, "tiny")
    service.sync_active_version()
    return service, models, tmp_path


def _register(service: TrainingService, path: Path) -> None:
    with service.sm.begin() as s:
        runs.register_adapter_version(s, base_model="tiny", adapter_path=str(path), activate=False)


def _stored_active(service: TrainingService) -> str:
    with service.sm.begin() as s:
        return runs.active_version(s, "tiny").name


def test_a_version_that_does_not_load_leaves_the_previous_one_serving(setup, tiny_model_dir):
    service, models, tmp_path = setup
    good = save_random_adapter(tiny_model_dir, tmp_path / "adapters" / "v1")
    broken = save_random_adapter(tiny_model_dir, tmp_path / "adapters" / "v2", seed=1)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    _register(service, good)
    _register(service, broken)

    result = service.activate_version("v1")
    assert result.ok and models.active == "v1" == _stored_active(service)
    result = service.activate_version("v2")
    assert result.ok is False
    assert result.message.startswith("version v2 could not be loaded: ")
    assert result.message.endswith("v1 stays active.")
    assert models.active == "v1" == _stored_active(service)
    assert service.version_error is None  # v1 serves: nothing to warn about in the Train tab
    assert service.activate_version("base").ok and models.active == "base"
