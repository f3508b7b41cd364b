"""Training runs as the app sees them: start (validated), cancel, live status, history.

The run itself executes in a separate worker process (`app.train.worker`); this module creates the
queued run, launches the worker with `subprocess`, watches it, marks runs whose worker died as
failed, and tells the model service when a new version became active.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import Field, asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_type_hints

from sqlalchemy.orm import Session, sessionmaker

from app.config import adapters_dir
from app.train.kto import KTO, kto_summary, no_kto_message, training_rows
from app.train.run_inputs import sft_examples
from app.train.worker import host_file, log_file, pid_file, this_host
from dpo_core.distributed import devices_problem, launch_command, visible_devices
from dpo_core.heldout import MAX_HELDOUT_FRACTION
from dpo_core.losses import LOSS_TYPES
from dpo_core.modeling import is_adapter_dir, remove_partial_saves
from storage import repo, runs
from storage.rounds import Lineage, counts_text, no_parent_pairs_message
from storage.runs import RunStateError
from storage.selection import DEFAULT_TRAIN_ON, DEFAULT_VOTES, TRAIN_ON, VOTE_MODES, VoteSelection

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ACTIVE_STATES = ("queued", "running")
# A worker that wrote no heartbeat for this long is dead (it beats every 2 s, even mid-step).
STALE_AFTER_S = 60.0
# A queued run whose worker never started (e.g. it failed to import) is dead after this long.
START_TIMEOUT_S = 120.0
NAMES = tuple[str, ...]  # the kind of a setting that lists names (annotators to leave out)
# Metric names beyond TRL's: the run's planned number of optimizer steps, held-out accuracy.
TOTAL_STEPS = "total_steps"
TIME_S = "time_s"
EVAL_ACCURACY = "eval/rewards/accuracies"
# How long Train waits for the previous worker to exit (it stops within one step of a cancel).
STOP_GRACE_S = 10.0


def config_default(name: str) -> Any:
    """A TrainConfig field's default: the Train tab's defaults are dpo_core's."""
    return _config_field(name).default


def _config_field(name: str) -> Field[Any]:
    from dpo_core.config import TrainConfig

    return {f.name: f for f in fields(TrainConfig)}[name]


def _setting(name: str, label: str, row: int, **extra: Any) -> Any:
    """A TrainRequest field for TrainConfig's `name`: dpo_core's default and help text, and
    how the Train tab shows it (its label, its row in the Advanced accordion, `choices` or a
    `maximum` where the form offers a list or a slider)."""
    field_ = _config_field(name)
    help_ = field_.metadata["help"]
    return field(
        default=field_.default, metadata={"label": label, "row": row, "help": help_, **extra}
    )


@dataclass(frozen=True)
class TrainRequest:
    """What the person chooses in the Train tab or sends to /train_start. Each setting is
    declared here once; `SETTINGS` (below) derives the form, the API and the parsing from it."""

    loss_type: str = _setting("loss_type", "Loss type", 0, choices=LOSS_TYPES)
    beta: float = _setting("beta", "beta", 0)
    label_smoothing: float = _setting("label_smoothing", "Label smoothing", 0)
    learning_rate: float = _setting("learning_rate", "Learning rate", 0)
    epochs: int = _setting("epochs", "Epochs", 1)
    batch_size: int = _setting("batch_size", "Batch size (pairs)", 1)
    grad_accum: int = _setting("grad_accum", "Gradient accumulation", 1)
    max_length: int = _setting("max_length", "Max length (tokens)", 1)
    lora_r: int = _setting("lora_r", "LoRA rank r", 2)
    lora_alpha: int = _setting("lora_alpha", "LoRA alpha", 2)
    heldout_fraction: float = _setting(
        "heldout_fraction", "Held-out fraction", 2, maximum=MAX_HELDOUT_FRACTION
    )
    continue_from_active: bool = field(
        default=True,
        metadata={
            "label": "Continue from the active adapter",
            "row": 3,
            "help": "off: a fresh adapter on the base model (the reference is the base either way)",
        },
    )
    train_on: str = field(
        default=DEFAULT_TRAIN_ON,
        metadata={
            "label": "Train on",
            "row": 3,
            "help": "all: every pair; parent: only pairs labeled on the answers of the version "
            "the run continues from (a round on its own answers); newest: all, weighted toward "
            "the newest versions' answers (x0.5 per version back)",
            "choices": TRAIN_ON,
        },
    )
    devices: int = field(
        default=visible_devices(),
        metadata={
            "label": "Devices",
            "row": 3,
            "help": "training processes, one per GPU (default: every visible GPU; 1 on CPU); "
            "more than 1 runs the worker under torchrun, data-parallel, same steps",
        },
    )
    votes: str = field(
        default=DEFAULT_VOTES,
        metadata={
            "label": "Pairs judged by several annotators",
            "row": 4,
            "help": "majority: the choice of more than half of the votes trains (a tie of votes "
            "does not); unanimous: only when all agree; every: each vote is its own pair",
            "choices": VOTE_MODES,
        },
    )
    leave_out: tuple[str, ...] = field(
        default=(),
        metadata={
            "label": "Leave out annotators",
            "row": 4,
            "help": "their votes do not train (e.g. those the Data tab flags for position bias)",
        },
    )
    include_judge_votes: bool = field(
        default=False,
        metadata={
            "label": "Include AI judges' votes",
            "row": 4,
            "help": "votes by annotators named judge:<name> (AI feedback); off: human votes only",
        },
    )
    sft_on_rewrites: bool = field(
        default=False,
        metadata={
            "label": "SFT on rewrites first",
            "row": 5,
            "help": "a short supervised stage (as many epochs as DPO's) on the 'Write a better "
            "answer' texts before DPO, in the same run; DPO then starts from that model",
        },
    )
    sft_include_chosen: bool = field(
        default=False,
        metadata={
            "label": "SFT on chosen answers too",
            "row": 5,
            "help": "the SFT stage also trains on every training pair's chosen answer",
        },
    )

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> TrainRequest:
        """A request from loosely typed values (a form sends floats, strings or None): each is
        converted to its setting's type; ValueError names the setting that is not."""
        return cls(**{s.name: s.parse(values[s.name]) for s in SETTINGS if s.name in values})

    def sft(self) -> dict[str, bool]:
        """What the SFT stage trains on (`app.train.run_inputs.sft_examples`' choices)."""
        return {"rewrites": self.sft_on_rewrites, "chosen": self.sft_include_chosen}

    def selection(self, parent_id: int | None = None) -> VoteSelection:
        """Which votes train, and which rounds of them (`parent_id`: the version the run
        continues from). ValueError for an unknown votes mode or train-on choice."""
        return VoteSelection(
            self.votes,
            self.leave_out,
            include_judges=self.include_judge_votes,
            train_on=self.train_on,
            parent_id=parent_id,
        )

    def validate(self) -> None:
        """Raise ValueError naming the setting for a value no run could use (TrainConfig checks
        the rest when the run's config is built)."""
        self.selection()
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if setting.kind is int and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{setting.spoken} must be a positive integer: {value}")
            if setting.maximum is not None and not 0.0 <= value <= setting.maximum:
                raise ValueError(
                    f"{setting.spoken} must be between 0 and {setting.maximum}, got {value}"
                )


@dataclass(frozen=True)
class Setting:
    """One training setting as the Train tab and /train_start expose it (from TrainRequest)."""

    name: str
    kind: Any  # str, float, int, bool, or NAMES (a list of names)
    default: Any
    label: str
    help: str
    row: int  # the row of the Advanced accordion it sits in
    choices: tuple[str, ...] = ()  # a str setting with a fixed list of values
    maximum: float | None = None  # a float setting the form offers as a slider from 0

    @property
    def spoken(self) -> str:
        """The name as error messages say it: `lora r`, `batch size`, `held-out fraction`."""
        return self.name.replace("_", " ").replace("heldout", "held-out")

    def parse(self, value: Any) -> Any:
        """`value` as this setting's type; ValueError with the setting's name if it is not one."""
        if self.kind == NAMES:
            return parse_names(value, self.spoken)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.spoken} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            return str(value)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{self.spoken} is empty")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.spoken} must be a number (could not convert {value!r})"
            ) from None
        if self.kind is int:
            if not math.isfinite(number) or number != int(number):
                raise ValueError(f"{self.spoken} must be a whole number, got {value}")
            return int(number)
        return number


def parse_names(value: Any, spoken: str) -> tuple[str, ...]:
    """Names from a list (the form's multiselect, the API) or one comma-separated string."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{spoken} must be a list of names, got {value!r}")
    return tuple(v.strip() for v in value if v.strip())


def _settings() -> tuple[Setting, ...]:
    hints = get_type_hints(TrainRequest)
    return tuple(
        Setting(
            name=f.name,
            kind=hints[f.name],
            default=f.default,
            label=f.metadata["label"],
            help=f.metadata["help"],
            row=f.metadata["row"],
            choices=tuple(f.metadata.get("choices", ())),
            maximum=f.metadata.get("maximum"),
        )
        for f in fields(TrainRequest)
    )


SETTINGS = _settings()


@dataclass(frozen=True)
class StartResult:
    ok: bool
    message: str
    run_id: int | None = None


@dataclass
class RunStatus:
    """One run's live state for the progress bar (and the `train_status` API)."""

    run_id: int | None = None
    status: str = "idle"
    step: int = 0
    total_steps: int | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    num_pairs: int | None = None
    heldout_pairs: int | None = None  # held out when the run started (None: not recorded)
    kl_prompts: int | None = None  # answers sampled per KL readout (0: no readout)
    version: str | None = None
    error: str | None = None
    message: str = "No training run yet."
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

    def to_dict(self, with_metrics: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_metrics:
            out.pop("metrics")
        return out


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


def _age_s(when: datetime | None) -> float | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (datetime.now(UTC) - when).total_seconds()


class TrainingService:
    """Starts and watches training workers; one training job at a time.

    `on_version_change(name, adapter_path)` is called (from the watcher thread) whenever the
    database's active version differs from the one the app serves, e.g. after a run succeeded.
    """

    def __init__(
        self,
        sm: sessionmaker[Session],
        *,
        db_url: str,
        data_dir: Path,
        base_model: str,
        model_settings: dict[str, Any],
        on_version_change: Callable[[str, str | None], None] | None = None,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.sm = sm
        self.db_url = db_url
        self.data_dir = Path(data_dir).resolve()
        self.base_model = base_model
        self.model_settings = model_settings
        self.on_version_change = on_version_change
        self.poll_interval_s = poll_interval_s
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._served_version: str | None = None
        self.version_error: str | None = None
        self._sync_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    def recover(self) -> list[int]:
        """At app start: fail runs whose worker is gone (pid dead, or heartbeat stale)."""
        failed = self.check_workers() + self.fail_stale_runs()
        with self.sm.begin() as s:
            idle = runs.live_run(s) is None
        if idle:  # no worker can be saving: a temp directory is what a killed save left
            for tmp in remove_partial_saves(adapters_dir(self.data_dir)):
                logger.warning("removed %s, left by an adapter save that was interrupted", tmp)
        return failed

    def start_watcher(self) -> None:
        """Serve the active version now, then poll workers in the background, so a finished
        run switches the served model even when no browser is open."""
        self.sync_active_version()
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="train-watcher", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.check_workers()
                self.fail_stale_runs()  # a worker on another replica's machine that died
                self.sync_active_version()
            except Exception:
                logger.exception("training watcher")

    def _active(self, s: Session) -> Any:
        return runs.active_version(s, self.base_model) or runs.ensure_base_version(
            s, self.base_model
        )

    # --- actions -----------------------------------------------------------------------------

    def start(self, request: TrainRequest) -> StartResult:
        """Validate, create a queued run and launch its worker. Never raises for user errors."""
        try:
            request.validate()
            build_train_config(request, self.model_settings, None)
            if problem := devices_problem(request.devices):
                raise ValueError(problem)
        except (ValueError, TypeError) as err:
            return StartResult(False, f"Invalid settings: {err}")
        with self._lock:
            with self.sm.begin() as s:
                live = runs.live_run(s)
                if live is not None:
                    return StartResult(False, busy_message(live.id, live.status), live.id)
            stopping = self._wait_for_workers(STOP_GRACE_S)
            if stopping:
                return StartResult(
                    False, f"Run #{stopping[0]}'s worker is still stopping; try again in a moment."
                )
            with self.sm.begin() as s:
                parent = self._parent(s, request.continue_from_active)
                selection = round_selection(request, parent.id)
                counts = pair_counts(s, request.heldout_fraction, selection, request.loss_type)
                unknown = repo.unknown_annotators(s, selection)
                if counts["usable"] == 0:
                    parent_name = parent.name if request.train_on == "parent" else None
                    if request.loss_type == KTO:
                        return StartResult(False, no_kto_message(counts["ties"], parent_name))
                    return StartResult(False, no_pairs_message(counts, parent_name))
                if problem := sft_problem(s, request, selection):
                    return StartResult(False, problem)
                config = self._run_config(request, counts, parent, selection)
                try:
                    run = runs.create_run(
                        s,
                        base_model=self.base_model,
                        config=config,
                        num_pairs=counts["usable"],
                        parent_version_id=parent.id,
                    )
                except RunStateError as err:
                    return StartResult(False, f"{err}. Wait for it to finish or cancel it.")
                run_id = run.id
            self._launch(run_id, request.devices)
        what = "KTO rows" if request.loss_type == KTO else "pairs"
        return StartResult(
            True,
            f"Run #{run_id} started on {counts['train']} {what} ({counts['heldout']} held out"
            + (f"; {counts_text(counts['by_version'])}" if counts["by_version"] else "")
            + ")."
            + unknown_note(unknown),
            run_id,
        )

    def _parent(self, s: Session, continue_from_active: bool) -> Any:
        """The version a run starts from: the active one, or the base for a fresh adapter."""
        if continue_from_active:
            return self._active(s)
        return runs.ensure_base_version(s, self.base_model)

    def _wait_for_workers(self, timeout_s: float) -> list[int]:
        """Give workers that are finishing (after success or a cancel) a moment to exit, so two
        never hold the model at once. Returns the runs whose worker is still alive."""
        alive = []
        for run_id, proc in self._procs.items():
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                alive.append(run_id)
        return alive

    def _run_config(
        self, request: TrainRequest, counts: dict[str, Any], parent: Any, selection: VoteSelection
    ) -> dict[str, Any]:
        """Everything the worker needs, saved with the run: the resolved TrainConfig (model,
        hyperparameters, the adapter to continue from), the held-out split, which votes and
        rounds train, provenance (the pairs per version whose answers they compare)."""
        return {
            "base_model": self.base_model,
            "train": build_train_config(request, self.model_settings, parent.adapter_path),
            "heldout_fraction": request.heldout_fraction,
            "continue_from_active": request.continue_from_active,
            "votes": selection.to_dict(),
            "sft": request.sft(),
            "parent_version": parent.name,
            "num_train_pairs": counts["train"],
            "num_heldout_pairs": counts["heldout"],
            "pairs_by_version": counts["by_version"],
        }

    def _launch(self, run_id: int, devices: int = 1) -> None:
        """Start the run's worker: one process, or `devices` under torchrun."""
        args = ["--db", self.db_url, "--run-id", str(run_id), "--data-dir", str(self.data_dir)]
        cmd = launch_command(devices, "app.train.worker", args)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
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
                    env=env,
                    start_new_session=True,
                )
        except OSError as err:
            with self.sm.begin() as s:
                runs.fail_run(s, run_id, f"could not start the training worker: {err}")
            return
        self._procs[run_id] = proc
        logger.info("run %d: worker pid %d, log %s", run_id, proc.pid, log_path)

    def cancel(self) -> str:
        with self.sm.begin() as s:
            run = runs.live_run(s)
            if run is None:
                return "No training run is in progress."
            runs.cancel_run(s, run.id)
            return (
                f"Run #{run.id} cancelled: the worker stops after the current step; "
                "the previous version stays active."
            )

    def activate_version(self, name: str) -> StartResult:
        """Serve version `name` from now on (roll back or forward, no restart): stored as the
        active version, then loaded through `sync_active_version` as after a run. Refused while
        a run is live (it would make its own version active) or when the adapter is gone."""
        with self._lock:
            with self.sm.begin() as s:
                live = runs.live_run(s)
                if live is not None:
                    return StartResult(False, switch_busy_message(live.id, live.status), live.id)
                versions = {v.name: v for v in runs.list_versions(s, self.base_model)}
                previous = self._active(s).name
                problem = version_problem(versions.get(name), name, list(versions), previous)
                if problem:
                    return StartResult(False, problem)
                if name == previous and self.version_error is None:
                    return StartResult(True, f"{name} is already the active version.")
                runs.activate_version(s, versions[name].id)
            self.sync_active_version()
            error = self.version_error
            if error is None and self._served_version == name:
                return StartResult(True, f"{name} is now the active version (was {previous}).")
            with self.sm.begin() as s:  # it did not load: put the previous version back
                runs.activate_version(s, versions[previous].id)
            self.sync_active_version()
            return StartResult(
                False, f"{error or name + ' did not load'}. {previous} stays active."
            )

    # --- watching ----------------------------------------------------------------------------

    def check_workers(self) -> list[int]:
        """Fail the live run when its worker process is gone; reap finished workers."""
        failed = []
        with self._lock, self.sm.begin() as s:
            live = runs.live_run(s)
            for run_id, proc in list(self._procs.items()):
                if proc.poll() is None:
                    continue
                del self._procs[run_id]
                if live is not None and live.id == run_id:
                    runs.fail_run(s, run_id, self._exit_error(run_id, proc.returncode))
                    failed.append(run_id)
                    live = None
            if live is not None and live.id not in self._procs and self._worker_gone(live):
                pid = read_pid(self.data_dir, live.id)
                runs.fail_run(
                    s,
                    live.id,
                    f"the training worker (pid {pid}) is gone: it was killed or crashed. "
                    "The previous version stays active.",
                )
                failed.append(live.id)
        return failed

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
        age = _age_s(run.created_at)
        return age is not None and age > START_TIMEOUT_S

    def _exit_error(self, run_id: int, code: int) -> str:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = _tail(log_file(self.data_dir, run_id))
        return f"the training worker {how}. The previous version stays active.\n{tail}".strip()

    def sync_active_version(self) -> None:
        """Tell the model service when the active version changed in the database."""
        with self._sync_lock:
            self._sync_active_version()

    def _sync_active_version(self) -> None:
        with self.sm.begin() as s:
            active = self._active(s)
            name, path = active.name, active.adapter_path
        if name == self._served_version:
            return
        self._served_version = name  # tried once; a broken version is not retried every second
        self.version_error = None
        logger.info("active version is now %s", name)
        if self.on_version_change is None:
            return
        try:
            self.on_version_change(name, path)
        except Exception as err:  # deleted directory, broken JSON or safetensors, wrong shapes
            self.version_error = f"version {name} could not be loaded: {err}"
            logger.error("%s", self.version_error)

    # --- reading -----------------------------------------------------------------------------

    def head(self) -> tuple[int | None, str]:
        """(id, status) of the run `status()` would show: a cheap check for changes."""
        with self.sm.begin() as s:
            run = runs.live_run(s) or next(iter(runs.list_runs(s)), None)
            return (run.id, run.status) if run is not None else (None, "idle")

    def status(self, run_id: int | None = None) -> RunStatus:
        """The live run, else the given or latest one (what a refreshed page re-attaches to).

        A run reported as succeeded is already serving: the model switch happens first."""
        self.sync_active_version()
        with self.sm.begin() as s:
            run = runs.live_run(s)
            if run is None and run_id:
                run = runs.get_run(s, run_id)
            if run is None:
                latest = runs.list_runs(s)
                run = latest[0] if latest else None
            if run is None:
                return RunStatus()
            return run_status(run, steps_table(runs.run_metrics(s, run.id)), *_output(s, run))

    def summary(
        self, selection: VoteSelection | None = None, fresh: bool = False
    ) -> dict[str, Any]:
        """Counts and versions for the Train tab's summary line; the pairs are those that
        `selection` (the form's choice of votes and rounds; default: the default choice)
        picks, a round counted from the active version (`fresh`: from the base, as a fresh
        adapter's run). Also the rounds: the pairs labeled on the active version's answers,
        and the size of the round that made it."""
        selection = selection or VoteSelection()
        fraction = TrainRequest().heldout_fraction
        with self.sm.begin() as s:
            active = self._active(s)
            parent = self._parent(s, continue_from_active=not fresh)
            if selection.train_on != DEFAULT_TRAIN_ON and selection.parent_id is None:
                selection = replace(selection, parent_id=parent.id)
            counts = pair_counts(s, fraction, selection)
            kto = kto_summary(s, selection)
            own = replace(selection, train_on="parent", parent_id=active.id)
            return {
                "kto_rows": len(kto.rows),  # what the loss type `kto` trains on
                "kto_desirable": kto.desirable,
                "usable_pairs": counts["usable"],
                "ties": counts["ties"],
                "both_bad": counts["both_bad"],
                "undecided": counts["undecided"],
                "left_out": counts["left_out"],
                "base_model": self.base_model,
                "active_version": active.name,
                "version_error": self.version_error,
                "train_on": selection.train_on,
                "round_parent": parent.name,
                "on_active": pair_counts(s, fraction, own)["usable"],
                "made_by_run": active.training_run_id,
                "round_size": made_round_size(s, active),
            }

    def history(self) -> list[dict[str, Any]]:
        """Every run, newest first, with its lineage and the pairs it used by version."""
        with self.sm.begin() as s:
            lineage = Lineage.load(s)
            rows = []
            for run in runs.list_runs(s):
                row = history_row(run, steps_table(runs.run_metrics(s, run.id)), *_output(s, run))
                rows.append({**row, **round_columns(s, run, lineage)})
            return rows

    def annotators(self) -> list[str]:
        """Everyone who has voted: the names "Leave out annotators" offers."""
        with self.sm.begin() as s:
            return repo.vote_annotators(s)


def _output(s: Session, run: Any) -> tuple[str | None, str]:
    """The version a succeeded run made, and the trainer's note on how it ended (from the
    `metrics.json` saved beside the adapter, e.g. "stopped early at step 12: ...")."""
    version = runs.output_version(s, run.id) if run.status == "succeeded" else None
    if version is None:
        return None, ""
    try:
        saved = json.loads((Path(version.adapter_path) / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        return version.name, ""
    return version.name, str(saved.get("stop_reason") or "")


def unknown_note(unknown: list[str]) -> str:
    """Said when "leave out" names someone with no votes: the run goes on, nothing is left out
    for them (a typo should not block training, but should not pass unseen either)."""
    if not unknown:
        return ""
    return f" Nobody named {', '.join(map(repr, unknown))} has voted: nothing left out for them."


def pair_counts(
    s: Session,
    heldout_fraction: float,
    selection: VoteSelection | None = None,
    loss_type: str = "",
) -> dict[str, Any]:
    """Usable pairs (from the votes and rounds `selection` picks; KTO rows for the loss type
    `kto`), how a run would split them, and what does not train: ties / both-bad, pairs of
    answers without agreement, votes left out; `by_version`: the usable pairs per version whose
    answers they compare (none for KTO rows)."""
    min_heldout = config_default("min_heldout_pairs")
    pairs = training_rows(s, loss_type, heldout_fraction, min_heldout, selection)
    return {
        "usable": len(pairs.train) + len(pairs.heldout),
        "train": len(pairs.train),
        "heldout": len(pairs.heldout),
        "ties": pairs.ties,
        "both_bad": pairs.both_bad,
        "empty": pairs.empty,
        "undecided": pairs.undecided,
        "left_out": pairs.left_out,
        "by_version": pairs.by_version,
    }


def round_selection(request: TrainRequest, parent_id: int) -> VoteSelection:
    """The request's choice of votes and rounds for a run continuing from `parent_id` (a run
    on all pairs records no parent: its record reads as before rounds had a name)."""
    return request.selection(None if request.train_on == DEFAULT_TRAIN_ON else parent_id)


def round_size(config: dict[str, Any], num_pairs: int) -> int:
    """How many pairs a run used on its parent's answers (its round), else all it used."""
    by_version = config.get("pairs_by_version") or {}
    return int(by_version.get(config.get("parent_version"), 0)) or num_pairs


def made_round_size(s: Session, version: Any) -> int | None:
    """The round size of the run that made `version` (None: not made by a run here)."""
    if version.training_run_id is None:
        return None
    run = runs.get_run(s, version.training_run_id)
    return round_size(run.config or {}, run.num_pairs)


def next_round_text(version: str, size: int, labeled: int | None = None) -> str:
    """The invitation to the next round, after a run made `version`."""
    so_far = "" if labeled is None else f" ({labeled} so far)"
    return (
        f"{version} is now serving in Label: label ~{size} pairs of its answers{so_far}, then "
        "train again continuing from it (Advanced: train on parent)."
    )


def round_columns(s: Session, run: Any, lineage: Lineage) -> dict[str, Any]:
    """A run's lineage (`v3 ← v2 ← v1 ← base`; a run that made no version: `from v2 ← ...`),
    what it trained on, and the pairs it used per version whose answers they compare."""
    config = run.config or {}
    made = runs.output_version(s, run.id) if run.status == "succeeded" else None
    if made is not None:
        text = lineage.text(made.id)
    elif run.parent_version_id is not None:
        text = "from " + lineage.text(run.parent_version_id)
    else:
        text = ""
    by_version = config.get("pairs_by_version") or {}
    return {
        "lineage": text,
        "train on": (config.get("votes") or {}).get("train_on", DEFAULT_TRAIN_ON),
        "pairs by version": by_version,
        "pairs used": counts_text(by_version),
    }


def steps_table(series: dict[str, list[tuple[int, float | None]]]) -> list[dict[str, Any]]:
    """`{name: [(step, value)]}` -> one dict per step: `[{"step": 1, "loss": 0.69, ...}]`."""
    by_step: dict[int, dict[str, Any]] = {}
    for name, points in series.items():
        for step, value in points:
            by_step.setdefault(step, {"step": step})[name] = value
    return [by_step[step] for step in sorted(by_step)]


def run_status(
    run: Any, metrics: list[dict[str, Any]], version: str | None, note: str = ""
) -> RunStatus:
    step = max((m["step"] for m in metrics), default=0)
    total = _last(metrics, TOTAL_STEPS)
    total = int(total) if total else None
    elapsed = _elapsed_s(run)
    eta = eta_s(metrics, total) if run.status == "running" else None
    config = run.config or {}
    return RunStatus(
        run_id=run.id,
        status=run.status,
        step=step,
        total_steps=total,
        elapsed_s=elapsed,
        eta_s=eta,
        num_pairs=run.num_pairs,
        heldout_pairs=config.get("num_heldout_pairs"),
        kl_prompts=config.get("train", {}).get("kl_prompts"),
        version=version,
        error=run.error,
        message=status_message(run.status, run.id, version, run.error, step, note)
        + invitation(run, version),
        metrics=metrics,
    )


def invitation(run: Any, version: str | None) -> str:
    """After a run made `version`: the invitation to the next round (storage/rounds.py)."""
    if run.status != "succeeded" or not version:
        return ""
    return " " + next_round_text(version, round_size(run.config or {}, run.num_pairs))


def eta_s(metrics: list[dict[str, Any]], total: int | None) -> float | None:
    """Seconds left: the mean time per step so far (from the steps' `time_s`) times the steps
    left. None before two steps have been timed."""
    timed = [(m["step"], m[TIME_S]) for m in metrics if m.get(TIME_S) is not None]
    if not total or len(timed) < 2:
        return None
    (first_step, first_t), (last_step, last_t) = timed[0], timed[-1]
    per_step = (last_t - first_t) / (last_step - first_step)
    return per_step * max(total - last_step, 0)


def _last(metrics: list[dict[str, Any]], name: str) -> float | None:
    values = [m[name] for m in metrics if m.get(name) is not None]
    return values[-1] if values else None


def _elapsed_s(run: Any) -> float | None:
    if run.started_at is None:
        return None
    if run.finished_at is None:
        return _age_s(run.started_at)
    return (run.finished_at - run.started_at).total_seconds()


def busy_message(run_id: int, status: str) -> str:
    return (
        f"Run #{run_id} is {status}: one training job at a time. "
        "Wait for it to finish or cancel it."
    )


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


def status_message(
    status: str,
    run_id: int,
    version: str | None,
    error: str | None,
    step: int = 0,
    note: str = "",
) -> str:
    if status == "queued":
        return f"Run #{run_id} is starting…"
    if status == "running" and step == 0:
        return f"Run #{run_id} is preparing (loading the model, scoring pairs with the base)…"
    if status == "running":
        return f"Run #{run_id} is training."
    if status == "succeeded":
        return f"Run #{run_id} succeeded: {version} is the new version. {note}".strip()
    if status == "cancelled":
        return f"Run #{run_id} was cancelled; the previous version stays active."
    first_line = (error or "unknown error").splitlines()[0]
    return f"Run #{run_id} failed: {first_line}"


def history_row(
    run: Any, metrics: list[dict[str, Any]], version: str | None, note: str = ""
) -> dict[str, Any]:
    train = (run.config or {}).get("train", {})
    return {
        "run": run.id,
        "status": run.status,
        "version": version or "",
        "pairs": run.num_pairs,
        "loss": train.get("loss_type", ""),
        "beta": train.get("beta", ""),
        "lr": train.get("learning_rate", ""),
        "epochs": train.get("epochs", ""),
        "final loss": _fmt(_last(metrics, "loss")),
        "reward acc": _fmt(_last(metrics, "rewards/accuracies")),
        "eval acc": _fmt(_last(metrics, EVAL_ACCURACY)),
        "duration": format_duration(_elapsed_s(run)),
        "started": run.started_at.strftime("%Y-%m-%d %H:%M") if run.started_at else "",
        "note": run.error or note,
    }


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else ""


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def no_pairs_message(counts: dict[str, Any], parent: str | None = None) -> str:
    """Why Train found nothing to train on; `parent`: the run trains on that version's answers
    only (train on parent)."""
    if parent is not None:
        return no_parent_pairs_message(parent)
    ties, bad, empty = (counts.get(k, 0) for k in ("ties", "both_bad", "empty"))
    extra = f" ({ties} ties and {bad} both-bad votes are not usable for DPO)" if ties or bad else ""
    if empty:
        extra += f" ({empty} votes beside an empty answer cannot train)"
    return (
        "No usable preference pairs yet" + extra + ". Label some pairs in the Label tab "
        "(pick A or B, or write a better answer), or import pairs with "
        "`python -m storage import-pairs FILE`, then click Train again."
    )


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


def build_train_config(
    request: TrainRequest, model_settings: dict[str, Any], init_adapter: str | None
) -> dict[str, Any]:
    """The resolved dpo_core TrainConfig for a request, as a dict (validated by TrainConfig).

    Everything the form does not set (evaluation points, the early-stopping guard, ...) keeps
    dpo_core's defaults."""
    from dpo_core.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in asdict(request).items() if k in names}
    values.update({k: v for k, v in model_settings.items() if k in names})
    if any(request.sft().values()):  # the SFT stage: as many epochs as DPO's
        values["sft_epochs"] = request.epochs
    return TrainConfig(**values, init_adapter=init_adapter).to_dict()


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def sft_problem(s: Session, request: TrainRequest, selection: VoteSelection) -> str | None:
    """Why the SFT stage the request asks for has nothing to train on (None: it has, or
    there is no SFT stage); `selection`: the run's choice of votes and rounds."""
    if not any(request.sft().values()):
        return None
    min_heldout = config_default("min_heldout_pairs")
    pairs = training_rows(s, request.loss_type, request.heldout_fraction, min_heldout, selection)
    if sft_examples(s, pairs, **request.sft()):
        return None
    return (
        "SFT on rewrites is on, but no training pair has a rewrite yet: write a better answer "
        "in the Label tab (or turn on SFT on chosen answers too), or turn SFT on rewrites off."
    )
