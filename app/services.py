"""The app's long-lived services, made once in `main()` from the config and the loaded model:
the database sessionmaker, the served model with its versions, training and comparison."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from app.compare.service import CompareService
from app.config import AppConfig
from app.serving.versions import VersionedModel
from app.train.service import TrainingService
from dpo_core.modeling import LoadedModel
from storage import runs
from storage.db import open_db

logger = logging.getLogger(__name__)


@dataclass
class Services:
    sm: sessionmaker[Session]
    models: VersionedModel
    training: TrainingService
    compare: CompareService

    def close(self) -> None:
        """The app's shutdown: stop the training watcher and wait for it, so no weights are
        loading when the interpreter exits. Training workers keep running. Idempotent."""
        self.training.close()


def open_services(config: AppConfig, lm: LoadedModel) -> Services:
    """Open the database, recover from dead training workers, serve the active version.

    Raises `storage.db.StorageError` (a message for the user) when the database cannot be used.
    """
    db_url = config.resolved_db_url()
    sm = open_db(db_url)
    base_model = config.model
    with sm.begin() as s:
        runs.ensure_base_version(s, base_model)
    models = VersionedModel(lm)
    training = TrainingService(
        sm,
        db_url=db_url,
        data_dir=config.data_dir,
        base_model=base_model,
        model_settings={
            "model": config.model,
            "dtype": config.dtype,
            "load_in_4bit": config.load_in_4bit,
            "device": config.device,
        },
        on_version_change=models.activate,
    )
    training.recover()
    training.start_watcher()  # loads the active version before the first request
    return Services(sm, models, training, CompareService(sm, models, base_model))
