"""The Train tab: one-click DPO with live progress and curves, cancel, run history.

Handlers first (thin: parse, call the training service, return named updates), layout after.
A `gr.Timer` polls the database, so a refreshed page re-attaches to a running job.
"""

from __future__ import annotations

import html
import math
from dataclasses import asdict, dataclass
from typing import Any

import gradio as gr
import pandas as pd

from app.auth.users import ADMIN, require_role
from app.train.service import (
    ACTIVE_STATES,
    RunStatus,
    TrainingService,
    TrainRequest,
    format_duration,
)
from dpo_core.guard import few_pairs_warning
from dpo_core.losses import LOSS_TYPES

POLL_S = 1.0
BAR_STYLE = "width: 100%; height: 1.25rem"
# Curves: plot title -> the TRL metric names it shows.
PLOTS = {
    "Loss": ("loss", "eval/loss"),
    "Rewards": ("rewards/margins", "rewards/chosen", "rewards/rejected"),
    "Reward accuracy": ("rewards/accuracies", "eval/rewards/accuracies"),
    "KL to base": ("eval/kl",),  # held-out, nats per sampled answer
}
HISTORY_COLUMNS = [
    "run",
    "status",
    "version",
    "pairs",
    "loss",
    "beta",
    "lr",
    "epochs",
    "final loss",
    "reward acc",
    "eval acc",
    "duration",
    "started",
    "note",
]
INIT_CHOICES = {
    "Continue from the active adapter": True,
    "Fresh adapter on the base model": False,
}


@dataclass
class TrainTab:
    """The components handlers read and update."""

    summary: gr.Markdown
    message: gr.Markdown
    train_btn: gr.Button
    cancel_btn: gr.Button
    settings: dict[str, gr.components.Component]
    progress: gr.HTML
    plots: dict[str, gr.LinePlot]
    history: gr.Dataframe
    seen: gr.State
    timer: gr.Timer


# --- pure view helpers -----------------------------------------------------------------------


def progress_html(status: RunStatus) -> str:
    """A <progress> bar with step / total, elapsed and ETA (numbers only: nothing to escape
    except the message, which is escaped)."""
    if status.run_id is None:
        return f"<div class='train-progress idle'>{html.escape(status.message)}</div>"
    total = status.total_steps or 0
    bar = (
        f"<progress value='{status.step}' max='{total}' style='{BAR_STYLE}'></progress>"
        if total
        else f"<progress style='{BAR_STYLE}'></progress>"  # indeterminate while it loads
    )
    parts = [f"step {status.step} / {total or '?'}"]
    if status.elapsed_s is not None:
        parts.append(f"elapsed {format_duration(status.elapsed_s)}")
    if status.eta_s is not None:
        parts.append(f"ETA {format_duration(status.eta_s)}")
    bar_html = bar if status.active or status.status == "succeeded" else ""
    return (
        f"<div class='train-progress {status.status}' data-status='{status.status}'>"
        f"{bar_html}<div class='train-progress-text'>{' · '.join(parts)}</div>"
        f"<div class='train-progress-message'>{html.escape(status.message)}</div></div>"
    )


def metric_frames(metrics: list[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """Long-format frames (step, value, metric) for each plot, from per-step metric dicts.

    Every frame starts with one placeholder row per curve of its plot (value NaN, which Vega
    leaves out): the plot takes its colour domain from the data it is first drawn with and
    keeps it on later updates, so a curve absent from the first frame would never be drawn.
    """
    rows: dict[str, list[tuple[int, float, str]]] = {
        title: [(1, math.nan, name) for name in names] for title, names in PLOTS.items()
    }
    for row in metrics:
        step = int(row["step"])
        for title, names in PLOTS.items():
            for name in names:
                value = row.get(name)
                if isinstance(value, int | float) and math.isfinite(value):
                    rows[title].append((step, float(value), name))
    # Explicit dtypes: the plot takes its axis types from the first frame it gets.
    dtypes = {"step": "int64", "value": "float64", "metric": "str"}
    return {
        title: pd.DataFrame(data, columns=list(dtypes)).astype(dtypes)
        for title, data in rows.items()
    }


def history_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def summary_markdown(info: dict[str, Any]) -> str:
    lines = [
        f"**{info['usable_pairs']}** usable preference pairs "
        f"({info['ties']} ties and {info['both_bad']} both-bad votes are not used).",
        f"Base model: **{info['base_model']}** · active version: **{info['active_version']}**",
    ]
    if info.get("version_error"):
        lines.append(f"⚠️ {html.escape(info['version_error'])}")
    warning = few_pairs_warning(info["usable_pairs"]) if info["usable_pairs"] > 0 else None
    if warning:
        lines.append(f"⚠️ {warning}")
    return "  \n".join(lines)


def request_from_values(values: dict[str, Any]) -> TrainRequest:
    """Turn the Advanced settings into a TrainRequest (values may arrive as floats/strings)."""
    kwargs = dict(values)
    kwargs["continue_from_active"] = INIT_CHOICES.get(str(values["continue_from_active"]), True)
    for name in ("epochs", "batch_size", "grad_accum", "lora_r", "lora_alpha", "max_length"):
        value = _number(name, kwargs[name])
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{_label(name)} must be a whole number, got {kwargs[name]}")
        kwargs[name] = int(value)
    for name in ("beta", "label_smoothing", "learning_rate", "heldout_fraction"):
        kwargs[name] = _number(name, kwargs[name])
    return TrainRequest(**kwargs)


def _number(name: str, value: Any) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{_label(name)} is empty")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_label(name)} must be a number (could not convert {value!r})") from None


def _label(name: str) -> str:
    return name.replace("_", " ")


# --- handlers --------------------------------------------------------------------------------


def make_handlers(service: TrainingService, tab: TrainTab) -> dict[str, Any]:
    """Handlers bound to the training service."""

    def refresh(seen: dict[str, Any] | None) -> dict[Any, Any]:
        seen = dict(seen or {})
        run_id, state = service.head()
        if seen.get("run") == [run_id, state] and state not in ACTIVE_STATES:
            return {tab.seen: seen}  # a finished run shown already: nothing else to send
        status = service.status()
        out: dict[Any, Any] = {
            tab.progress: progress_html(status),
            tab.train_btn: gr.Button(interactive=not status.active),
            tab.cancel_btn: gr.Button(interactive=status.active),
        }
        key = [status.run_id, status.status, len(status.metrics)]
        if seen.get("metrics") != key:
            frames = metric_frames(status.metrics)
            out.update({tab.plots[t]: frames[t] for t in PLOTS})
        if seen.get("run") != [status.run_id, status.status]:
            out[tab.history] = history_frame(service.history())
            out[tab.summary] = summary_markdown(service.summary())
        seen.update(metrics=key, run=[status.run_id, status.status])
        out[tab.seen] = seen
        return out

    def start(values: dict[Any, Any], request: gr.Request) -> dict[Any, Any]:
        require_role(request, ADMIN, "start training")
        by_name = {name: values[comp] for name, comp in tab.settings.items()}
        try:
            train_request = request_from_values(by_name)
        except (ValueError, TypeError) as err:
            return {tab.message: f"⚠️ Invalid settings: {err}"}
        result = service.start(train_request)
        icon = "" if result.ok else "⚠️ "
        return {tab.message: icon + result.message, tab.seen: {}}

    def cancel(request: gr.Request) -> dict[Any, Any]:
        require_role(request, ADMIN, "cancel training")
        return {tab.message: service.cancel()}

    return {"refresh": refresh, "start": start, "cancel": cancel}


def register_api(service: TrainingService) -> None:
    """Named endpoints for scripts and tests: /train_start, /train_status, /train_cancel."""
    d = TrainRequest()

    def train_start(
        loss_type: str = d.loss_type,
        beta: float = d.beta,
        label_smoothing: float = d.label_smoothing,
        learning_rate: float = d.learning_rate,
        epochs: int = d.epochs,
        batch_size: int = d.batch_size,
        grad_accum: int = d.grad_accum,
        lora_r: int = d.lora_r,
        lora_alpha: int = d.lora_alpha,
        max_length: int = d.max_length,
        heldout_fraction: float = d.heldout_fraction,
        continue_from_active: bool = d.continue_from_active,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Start a DPO training run on the usable preference pairs (one run at a time).
        Returns {ok, message, run_id}; `ok` is false with a message for bad settings, zero
        usable pairs, or a run already in progress."""
        require_role(request, ADMIN, "start training")
        train_request = TrainRequest(
            loss_type=loss_type,
            beta=beta,
            label_smoothing=label_smoothing,
            learning_rate=learning_rate,
            epochs=epochs,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            max_length=max_length,
            heldout_fraction=heldout_fraction,
            continue_from_active=continue_from_active,
        )
        result = service.start(train_request)
        return {"ok": result.ok, "message": result.message, "run_id": result.run_id}

    def train_status(run_id: int = 0) -> dict[str, Any]:
        """The live run (else run `run_id`, else the latest): status, step, total_steps,
        elapsed_s, eta_s, version, error, message, metrics (one dict per step)."""
        return service.status(run_id or None).to_dict(with_metrics=True)

    def train_cancel(request: gr.Request = None) -> dict[str, Any]:  # type: ignore[assignment]
        """Cancel the live run; the worker stops after its current step."""
        require_role(request, ADMIN, "cancel training")
        return {"message": service.cancel()}

    def train_history() -> list[dict[str, Any]]:
        """Every run, newest first: config, pairs, final metrics, duration, outcome, error."""
        return service.history()

    gr.api(train_start, api_name="train_start")
    gr.api(train_status, api_name="train_status")
    gr.api(train_cancel, api_name="train_cancel")
    gr.api(train_history, api_name="train_history")


def default_values() -> dict[str, Any]:
    values = asdict(TrainRequest())
    values["continue_from_active"] = next(iter(INIT_CHOICES))
    return values


# --- layout ----------------------------------------------------------------------------------


def build_train_tab(service: TrainingService, tab_block: gr.Tab | None = None) -> TrainTab:
    """Declare the Train tab (inside the open `tab_block`) and wire its events."""
    d = default_values()
    summary = gr.Markdown(summary_markdown(service.summary()), elem_id="train-summary")
    with gr.Row():
        train_btn = gr.Button("Train", variant="primary", elem_id="train-button")
        cancel_btn = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel-button")
    message = gr.Markdown(elem_id="train-message")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            loss_type = gr.Dropdown(list(LOSS_TYPES), value=d["loss_type"], label="Loss type")
            beta = gr.Number(d["beta"], label="beta (strength of the pull to the base)")
            label_smoothing = gr.Number(d["label_smoothing"], label="Label smoothing")
            learning_rate = gr.Number(d["learning_rate"], label="Learning rate")
        with gr.Row():
            epochs = gr.Number(d["epochs"], label="Epochs", precision=0)
            batch_size = gr.Number(d["batch_size"], label="Batch size (pairs)", precision=0)
            grad_accum = gr.Number(d["grad_accum"], label="Gradient accumulation", precision=0)
            max_length = gr.Number(d["max_length"], label="Max length (tokens)", precision=0)
        with gr.Row():
            lora_r = gr.Number(d["lora_r"], label="LoRA rank r", precision=0)
            lora_alpha = gr.Number(d["lora_alpha"], label="LoRA alpha", precision=0)
            heldout_fraction = gr.Slider(
                0.0, 0.5, value=d["heldout_fraction"], step=0.05, label="Held-out fraction"
            )
        continue_from_active = gr.Radio(
            list(INIT_CHOICES), value=d["continue_from_active"], label="Start from"
        )
    progress = gr.HTML(elem_id="train-progress")
    plots = {}
    empty_frames = metric_frames([])
    titles = list(PLOTS)
    for row in (titles[:2], titles[2:]):  # a 2 x 2 grid
        with gr.Row():
            for title in row:
                plots[title] = gr.LinePlot(
                    empty_frames[title],
                    x="step",
                    y="value",
                    color="metric",
                    title=title,
                    height=260,
                    elem_id=_id(title),
                )
    history = gr.Dataframe(
        headers=HISTORY_COLUMNS,
        label="Run history",
        interactive=False,
        wrap=True,
        elem_id="train-history",
    )
    seen = gr.State({})
    timer = gr.Timer(POLL_S)
    settings = {
        "loss_type": loss_type,
        "beta": beta,
        "label_smoothing": label_smoothing,
        "learning_rate": learning_rate,
        "epochs": epochs,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "max_length": max_length,
        "heldout_fraction": heldout_fraction,
        "continue_from_active": continue_from_active,
    }
    tab = TrainTab(
        summary, message, train_btn, cancel_btn, settings, progress, plots, history, seen, timer
    )
    _wire(tab, make_handlers(service, tab), tab_block)
    return tab


def _wire(tab: TrainTab, h: dict[str, Any], tab_block: gr.Tab | None) -> None:
    refresh_outputs = [
        tab.progress,
        tab.train_btn,
        tab.cancel_btn,
        tab.history,
        tab.summary,
        tab.seen,
        *tab.plots.values(),
    ]
    poll = {"show_progress": "hidden", "queue": False, "api_visibility": "private"}
    tab.timer.tick(h["refresh"], inputs=tab.seen, outputs=refresh_outputs, **poll)
    if tab_block is not None:  # pairs labeled since the page loaded: recount on opening the tab
        tab_block.select(h["refresh"], inputs=gr.State({}), outputs=refresh_outputs, **poll)
    tab.train_btn.click(
        h["start"],
        inputs=set(tab.settings.values()),
        outputs=[tab.message, tab.seen],
        api_visibility="private",
    ).then(h["refresh"], inputs=tab.seen, outputs=refresh_outputs, **poll)
    tab.cancel_btn.click(h["cancel"], outputs=tab.message, api_visibility="private")


def _id(title: str) -> str:
    return "plot-" + title.lower().replace(" ", "-")
