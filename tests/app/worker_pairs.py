"""The training worker's own read of a run's pairs, with the model load and the training loop
stubbed: what a run started from the Train tab would train on, and with which weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.train.service import TrainingService, TrainRequest
from storage import runs


@dataclass(frozen=True)
class WorkerRead:
    run_id: int
    pairs: list[dict]  # training pairs, then held-out ones, as the worker handed them over


def worker_read(
    service: TrainingService,
    sm: sessionmaker[Session],
    request: TrainRequest,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> WorkerRead:
    """Start a run with `request` and let the worker read its pairs; the run ends cancelled."""
    import dpo_core.modeling
    import dpo_core.trainer
    from app.train import worker

    seen: list[list[dict]] = []

    def fake_train(lm, train_pairs, config, out_dir, *, heldout, **_):
        seen.append(train_pairs + heldout)
        return SimpleNamespace(cancelled=True, adapter_dir=None)

    monkeypatch.setattr(dpo_core.modeling, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(dpo_core.trainer, "train", fake_train)
    started = service.start(request)
    assert started.ok, started.message
    with sm.begin() as s:
        config = runs.get_run(s, started.run_id).config
    assert worker.train_and_register(sm, started.run_id, config, data_dir) == "cancelled"
    return WorkerRead(started.run_id, seen[0])
