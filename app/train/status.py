"""The Train tab's view of runs: one run's live status (step, ETA, the KL readout it reads
on, the message), the run history's rows, and their words and numbers. Read from storage; the
rounds' words (lineage, the next round) come from `app.train.round_text`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.train.round_text import invitation, round_columns
from storage import runs
from storage.rounds import Lineage

ACTIVE_STATES = ("queued", "running")
# Metric names beyond TRL's: the run's planned number of optimizer steps, held-out accuracy.
TOTAL_STEPS = "total_steps"
TIME_S = "time_s"
EVAL_ACCURACY = "eval/rewards/accuracies"
# How many prompts the run's KL readout samples, as the worker read them (a step-0 metric);
# before the worker got there, the count the start's preflight recorded in the run's config.
READOUT_PROMPTS = "kl_readout_prompts"
NUM_READOUT_PROMPTS = "num_kl_readout_prompts"


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
    # prompts the KL readout samples from (the worker's count; None: not recorded)
    readout_prompts: int | None = None
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


def age_s(when: datetime | None) -> float | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (datetime.now(UTC) - when).total_seconds()


def read_status(s: Session, run_id: int | None = None) -> RunStatus:
    """The live run, else run `run_id`, else the latest one (what a refreshed page re-attaches
    to); an idle RunStatus when there is no run."""
    run = runs.live_run(s)
    if run is None and run_id:
        run = runs.get_run(s, run_id)
    if run is None:
        latest = runs.list_runs(s)
        run = latest[0] if latest else None
    if run is None:
        return RunStatus()
    return run_status(run, steps_table(runs.run_metrics(s, run.id)), *_output(s, run))


def read_history(s: Session) -> list[dict[str, Any]]:
    """Every run, newest first, with its lineage and the pairs it used by version."""
    lineage = Lineage.load(s)
    rows = []
    for run in runs.list_runs(s):
        row = history_row(run, steps_table(runs.run_metrics(s, run.id)), *_output(s, run))
        rows.append({**row, **round_columns(s, run, lineage)})
    return rows


def head(s: Session) -> tuple[int | None, str]:
    """(id, status) of the run `read_status` would show: a cheap check for changes."""
    run = runs.live_run(s) or next(iter(runs.list_runs(s)), None)
    return (run.id, run.status) if run is not None else (None, "idle")


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
        readout_prompts=readout_prompts(metrics, config),
        version=version,
        error=run.error,
        message=status_message(run.status, run.id, version, run.error, step, note)
        + invitation(run, version),
        metrics=metrics,
    )


def readout_prompts(metrics: list[dict[str, Any]], config: dict[str, Any]) -> int | None:
    """How many prompts the run's KL readout samples: what the worker read, else what the
    start's preflight counted with the same rule (`app.train.run_inputs.kl_readout_prompts`)."""
    read = _last(metrics, READOUT_PROMPTS)
    if read is None:
        read = config.get(NUM_READOUT_PROMPTS)
    return None if read is None else int(read)


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
        return age_s(run.started_at)
    return (run.finished_at - run.started_at).total_seconds()


def busy_message(run_id: int, status: str) -> str:
    return (
        f"Run #{run_id} is {status}: one training job at a time. "
        "Wait for it to finish or cancel it."
    )


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
