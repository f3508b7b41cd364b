"""The app's long-lived services, made once in `main()` from the config and the loaded model:
the database sessionmaker, the served model with its versions, training, comparison and the
self-labeling job (`app.train.self_labels`), which starts when a version becomes active."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from app.compare.service import CompareService
from app.config import AppConfig
from app.serving.versions import VersionedModel
from app.train.self_labels import SelfLabelJob
from app.train.service import TrainingService
from dpo_core.modeling import LoadedModel, ModelLoadError
from dpo_core.remote_engine import ServerDown
from storage import runs
from storage.db import open_db

logger = logging.getLogger(__name__)


@dataclass
class Services:
    sm: sessionmaker[Session]
    models: VersionedModel
    training: TrainingService
    compare: CompareService
    self_labels: SelfLabelJob

    def close(self) -> None:
        """The app's shutdown: stop the training watcher and the self-labeling job and wait
        for them, so no weights are loading when the interpreter exits. Training workers keep
        running. Idempotent."""
        self.training.close()
        self.self_labels.close()


def serve_and_label(models: VersionedModel, job: SelfLabelJob) -> Callable[[str, str | None], None]:
    """What a change of the active version does: serve it, then (when the setting is on) let
    it label pairs of its own answers in the background."""

    def on_version_change(name: str, adapter_path: str | None) -> None:
        models.activate(name, adapter_path)
        job.version_activated(name, adapter_path)

    return on_version_change


def open_services(config: AppConfig, lm: LoadedModel) -> Services:
    """Open the database, recover from dead training workers, serve the active version.

    Raises `storage.db.StorageError` (a message for the user) when the database cannot be used.
    """
    db_url = config.resolved_db_url()
    sm = open_db(db_url)
    base_model = config.model
    with sm.begin() as s:
        runs.ensure_base_version(s, base_model)
    models = VersionedModel(lm, generation_url=config.generation_url)
    check_generation_server(models)
    job = SelfLabelJob(sm, models, base_model)
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
        on_version_change=serve_and_label(models, job),
    )
    training.recover()
    training.start_watcher()  # loads the active version before the first request
    if models.remote is not None and training.versions.error:  # e.g. an unreadable adapter
        training.close()
        raise ModelLoadError(training.versions.error)
    return Services(sm, models, training, CompareService(sm, models, base_model), job)


def check_generation_server(models: VersionedModel) -> None:
    """At start: say which server answers, or that it is down (requests then wait for it)."""
    if models.remote is None:
        return
    try:
        base = models.remote.check()
    except ServerDown as err:
        logger.warning("%s", err)
        return
    logger.info("answers come from %s (base model %s)", models.remote.url, base)
