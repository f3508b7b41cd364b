"""Which model version the app serves: the database's active version (a run that succeeded
makes its own version active; a person may switch back or forward in the Train tab), kept in
step with the served model through the `on_version_change` callback."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.train.status import StartResult
from dpo_core.modeling import is_adapter_dir
from storage import runs

logger = logging.getLogger(__name__)


class ActiveVersion:
    """The served version and its sync with the database.

    `on_version_change(name, adapter_path)` is called whenever the database's active version
    differs from the one served (at most one load at a time; none once `stop` was called)."""

    def __init__(
        self,
        sm: sessionmaker[Session],
        base_model: str,
        on_version_change: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.sm = sm
        self.base_model = base_model
        self.on_version_change = on_version_change
        self.served: str | None = None
        self.error: str | None = None  # why the active version could not be loaded
        self._sync_lock = threading.Lock()
        self._stopped = False

    def active(self, s: Session) -> Any:
        """The database's active version (the base until a run or a person made another)."""
        return runs.active_version(s, self.base_model) or runs.ensure_base_version(
            s, self.base_model
        )

    def parent(self, s: Session, continue_from_active: bool) -> Any:
        """The version a run starts from: the active one, or the base for a fresh adapter."""
        if continue_from_active:
            return self.active(s)
        return runs.ensure_base_version(s, self.base_model)

    def stop(self) -> None:
        """No new loads from now on; waits for one in progress to end (the app is closing)."""
        with self._sync_lock:
            self._stopped = True

    def sync(self) -> None:
        """Tell the model service when the active version changed in the database."""
        with self._sync_lock:
            if not self._stopped:
                self._sync()

    def _sync(self) -> None:
        with self.sm.begin() as s:
            active = self.active(s)
            name, path = active.name, active.adapter_path
        if name == self.served:
            return
        self.served = name  # tried once; a broken version is not retried every second
        self.error = None
        logger.info("active version is now %s", name)
        if self.on_version_change is None:
            return
        try:
            self.on_version_change(name, path)
        except Exception as err:  # deleted directory, broken JSON or safetensors, wrong shapes
            self.error = f"version {name} could not be loaded: {err}"
            logger.error("%s", self.error)

    def activate(self, name: str) -> StartResult:
        """Serve version `name` from now on (roll back or forward, no restart): stored as the
        active version, then loaded through `sync` as after a run. Refused while a run is live
        (it would make its own version active) or when the adapter is gone; a version that
        does not load is undone. The caller keeps runs from starting meanwhile."""
        with self.sm.begin() as s:
            live = runs.live_run(s)
            if live is not None:
                return StartResult(False, switch_busy_message(live.id, live.status), live.id)
            versions = {v.name: v for v in runs.list_versions(s, self.base_model)}
            previous = self.active(s).name
            problem = version_problem(versions.get(name), name, list(versions), previous)
            if problem:
                return StartResult(False, problem)
            if name == previous and self.error is None:
                return StartResult(True, f"{name} is already the active version.")
            runs.activate_version(s, versions[name].id)
        self.sync()
        error = self.error
        if error is None and self.served == name:
            return StartResult(True, f"{name} is now the active version (was {previous}).")
        with self.sm.begin() as s:  # it did not load: put the previous version back
            runs.activate_version(s, versions[previous].id)
        self.sync()
        return StartResult(False, f"{error or name + ' did not load'}. {previous} stays active.")


def switch_busy_message(run_id: int, status: str) -> str:
    return (
        f"Run #{run_id} is {status}: versions cannot be switched during a run (it makes its own "
        "version active when it ends). Wait for it to finish or cancel it."
    )


def version_problem(version: Any, name: str, names: list[str], active: str) -> str | None:
    """Why version `name` cannot be served, or None when its adapter is there to load."""
    if version is None:
        return f"No version named {name!r}; the versions are {', '.join(names)}."
    path = version.adapter_path
    if version.kind == "adapter" and not is_adapter_dir(path):
        return (
            f"Version {name}'s adapter directory {path} is missing or incomplete (no "
            f"adapter_config.json): was it moved or deleted? {active} stays active."
        )
    return None
