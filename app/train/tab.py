"""The Train tab: one-click DPO with live progress and curves, cancel, run history.

Handlers first (thin: parse, call the training service, return named updates), layout after.
A `gr.Timer` polls the database, so a refreshed page re-attaches to a running job.
"""

from __future__ import annotations

import html
import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import groupby
from typing import Any

import gradio as gr
import pandas as pd

from app.auth.users import ADMIN, require_role
from app.train.request import (
    NAMES,
    SELF_LABEL_CHOICES,
    SETTINGS,
    Setting,
    TrainRequest,
    config_default,
)
from app.train.round_text import next_round_text
from app.train.self_labels import SelfLabelJob
from app.train.service import TrainingService
from app.train.status import ACTIVE_STATES, RunStatus, StartResult, format_duration
from dpo_core.guard import few_pairs_warning
from dpo_core.losses import kto_balanced_weights
from storage.selection import DEFAULT_TRAIN_ON, VoteSelection

POLL_S = 1.0
BAR_STYLE = "width: 100%; height: 1.25rem"
KL = "eval/kl"
# Curves: plot title -> the TRL metric names it shows.
PLOTS = {
    "Loss": ("loss", "eval/loss", "sft/loss"),  # sft/loss: the SFT stage's steps, before DPO's
    "Rewards": ("rewards/margins", "rewards/chosen", "rewards/rejected"),
    "Reward accuracy": ("rewards/accuracies", "eval/rewards/accuracies"),
    "KL to base": (KL,),  # held-out, nats per sampled answer
}
KL_PLOT = "KL to base"
# The run history as the tab shows it: the four settings /train_history gives one column each
# share one here, and fixed widths keep every header on one line at 1280 px (they wrapped
# letter by letter when the note took the room).
HISTORY_COLUMNS = {  # column -> width
    "run": "4%",
    "status": "8%",
    "version": "7%",
    "lineage": "9%",  # v3 ← v2 ← v1 ← base
    "pairs": "11%",  # how many, and on which versions' answers
    "settings": "13%",
    "final loss": "6%",
    "reward acc": "7%",
    "eval acc": "6%",
    "duration": "7%",
    "started": "8%",
    "note": "14%",
}


@dataclass
class TrainTab:
    """The components handlers read and update."""

    summary: gr.Markdown
    message: gr.Markdown
    train_btn: gr.Button
    cancel_btn: gr.Button
    settings: dict[str, gr.components.Component]  # by TrainRequest field name
    progress: gr.HTML
    plots: dict[str, gr.LinePlot]
    kl_note: gr.Markdown  # said in place of the KL plot when a run has no readout
    history: gr.Dataframe
    seen: gr.State
    timer: gr.Timer
    self_label_status: gr.Markdown  # the self-labeling job's progress, or why it made none
    self_label_btn: gr.Button  # "Label with the model now" (admin)

    def selection_inputs(self) -> list[Any]:
        """The fields of SELECTION_SETTINGS, in that order."""
        return [self.settings[name] for name in SELECTION_SETTINGS]

    def refresh_outputs(self) -> list[Any]:
        return [
            self.settings["leave_out"],
            self.settings["self_labels"],
            self.progress,
            self.train_btn,
            self.cancel_btn,
            self.history,
            self.summary,
            self.seen,
            *self.plots.values(),
            self.kl_note,
            self.self_label_status,
        ]


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
    """The Run history table from `TrainingService.history()` rows."""
    shown = [{**row, "settings": settings_text(row), "pairs": pairs_text(row)} for row in rows]
    return pd.DataFrame(shown, columns=list(HISTORY_COLUMNS))


def pairs_text(row: dict[str, Any]) -> str:
    """`40 (train on parent: 40 on v2's answers)`: how many pairs a run used, what it chose to
    train on (when not all) and the versions whose answers they compare (when recorded)."""
    count = row.get("pairs")
    text = "" if count is None else str(count)
    detail = row.get("pairs used") or ""
    train_on = row.get("train on") or DEFAULT_TRAIN_ON
    if train_on != DEFAULT_TRAIN_ON:
        detail = f"train on {train_on}" + (f": {detail}" if detail else "")
    return f"{text} ({detail})" if detail else text


def settings_text(row: dict[str, Any]) -> str:
    """`sigmoid, β 0.5, lr 0.0002, 3 epochs`: a run's main settings in one cell ("" for a run
    whose config has none)."""
    if not row.get("loss"):
        return ""
    lr = row["lr"]
    lr_text = f"{lr:g}" if isinstance(lr, int | float) else str(lr)
    return f"{row['loss']}, β {row['beta']}, lr {lr_text}, {row['epochs']} epochs"


def summary_markdown(info: dict[str, Any]) -> str:
    lines = [
        f"**{info['usable_pairs']}** usable preference pairs{train_on_text(info)}"
        f"{not_used_text(info)}.",
        f"Base model: **{info['base_model']}** · active version: **{info['active_version']}**",
    ]
    if info.get("kto_rows") is not None:
        lines.insert(1, kto_line(info["kto_rows"], info.get("kto_desirable", 0)))
    if info.get("include_self"):
        lines.insert(1, self_labels_line(info.get("self_labels", 0), info.get("overridden", 0)))
    lines += rounds_lines(info)
    if info.get("version_error"):
        lines.append(f"⚠️ {html.escape(info['version_error'])}")
    warning = few_pairs_warning(info["usable_pairs"]) if info["usable_pairs"] > 0 else None
    if warning:
        lines.append(f"⚠️ {warning}")
    return "  \n".join(lines)


def self_labels_line(added: int, overridden: int) -> str:
    """What "Add the model's own labels" adds to a run: `**12** of them are the model's own
    labels (3 more were overridden by people's votes on the same answers).`"""
    line = f"**{added}** of them {'is' if added == 1 else 'are'} the model's own labels"
    if overridden:
        line += f" ({overridden} more {'was' if overridden == 1 else 'were'} overridden by "
        line += "people's votes on the same answers)"
    return line + "."


def kto_line(rows: int, desirable: int) -> str:
    """How many KTO votes there are: what the loss type `kto` trains on (app/train/kto.py),
    and how much the rarer kind weighs in the loss (dpo_core's `kto_balance`)."""
    line = (
        f"**{rows}** KTO rows ({desirable} 👍, {rows - desirable} 👎: single-answer verdicts, "
        "A/B and both-bad votes), what loss type `kto` trains on."
    )
    weights = kto_balanced_weights(desirable, rows - desirable, 1.0, 1.0)
    up = weights.desirable > 1
    weight, rarer = (weights.desirable, "👍") if up else (weights.undesirable, "👎")
    if config_default("kto_balance") and weight > 1:
        line += f" Each {rarer} weighs {weight:.3g}x in the loss, so both kinds count the same."
    return line


def train_on_text(info: dict[str, Any]) -> str:
    """` on v2's answers` / ` (all, weighted toward the newest)`: the train-on choice, when
    not all pairs (a continued run counts from the active version)."""
    train_on = info.get("train_on", DEFAULT_TRAIN_ON)
    if train_on == "parent":
        return f" on {info.get('round_parent', info['active_version'])}'s answers"
    if train_on == "newest":
        return " (all, weighted toward the newest versions' answers)"
    return ""


def rounds_lines(info: dict[str, Any]) -> list[str]:
    """The loop label → train → label the new version: the pairs labeled on the active
    version's answers since it was made, and, for a version a run made, the next round."""
    if info.get("on_active") is None:
        return []
    active, labeled = info["active_version"], info["on_active"]
    since = f" since {active} was made" if info.get("made_by_run") else ""
    pairs = "pair" if labeled == 1 else "pairs"
    lines = [f"**{labeled}** {pairs} labeled on {active}'s answers{since}."]
    size = info.get("round_size")
    if size and labeled < size:
        lines.append("Next round: " + next_round_text(active, size, labeled))
    elif size:
        lines.append(
            f"Next round: {labeled} pairs on {active}'s answers, as many as its round used: "
            "train again continuing from it (Advanced: train on parent)."
        )
    return lines


def not_used_text(info: dict[str, Any]) -> str:
    """` (2 ties and 1 both-bad votes are not used; ...)`: what the chosen votes leave out."""
    parts = [f"{info['ties']} ties and {info['both_bad']} both-bad votes are not used"]
    if info.get("undecided"):
        parts.append(f"{info['undecided']} answer pairs whose votes do not agree enough")
    if info.get("left_out"):
        parts.append(f"{info['left_out']} votes left out (AI judges, left-out annotators)")
    return f" ({'; '.join(parts)})"


def kl_note(status: RunStatus) -> str | None:
    """Why the KL plot has nothing to draw, or None when the run has a KL readout. What the
    run reads KL on is `status.readout_prompts`: the worker's count (app/train/status.py)."""
    if any(isinstance(m.get(KL), int | float) and math.isfinite(m[KL]) for m in status.metrics):
        return None
    if status.run_id is None:
        return "**KL to base**: no run yet. A run measures it on its held-out prompts."
    run = f"**KL to base**: run #{status.run_id}"
    if status.heldout_pairs == 0 and not status.readout_prompts:
        return (
            f"{run} has no held-out pairs and no prompts to read KL on, so there is no KL "
            "readout (nor held-out loss or accuracy). Import a few prompts that are not "
            "labeled (Data tab), raise the held-out fraction, label pairs on more prompts, or "
            "import held-out pairs (`python -m storage import-pairs FILE --split heldout`)."
        )
    if status.kl_prompts == 0:
        return f"{run} has the KL readout turned off (kl_prompts = 0)."
    on = readout_text(status)
    if status.active:
        return f"{run} shows it{on} at its first held-out evaluation (by default, after epoch 1)."
    return f"{run} ended before its first held-out evaluation: no KL readout{on}."


def readout_text(status: RunStatus) -> str:
    """` on 46 prompts not trained on (...)`: what the KL readout samples, as the worker
    counted it ("" when not recorded)."""
    n = status.readout_prompts
    if not n:
        return ""
    prompts = f" on {n} prompt{'s' if n != 1 else ''} not trained on"
    if status.heldout_pairs == 0:
        return prompts + " (it holds out no pairs: queue prompts no vote trains on)"
    return prompts


# --- the settings form -----------------------------------------------------------------------

# The settings that choose which votes train and from which version a round counts: the pair
# count above Train follows them.
SELECTION_SETTINGS = (
    "votes",
    "leave_out",
    "include_judge_votes",
    "self_labels",
    "train_on",
    "continue_from_active",
)


def default_values() -> dict[str, Any]:
    """The form's starting values, by setting name."""
    return {s.name: s.default for s in SETTINGS}


def selection_from_values(values: list[Any]) -> VoteSelection | None:
    """The vote selection of the form's SELECTION_SETTINGS values, in order; the ones left
    off keep their defaults (None: not a valid one). A round counts from the active version."""
    try:
        return TrainRequest.from_values(
            dict(zip(SELECTION_SETTINGS, values, strict=False))
        ).selection()
    except (ValueError, TypeError):
        return None


def request_from_values(values: dict[str, Any]) -> TrainRequest:
    """What Train does with the form's values (which may arrive as floats or strings)."""
    return TrainRequest.from_values(values)


def setting_component(
    setting: Setting, names: list[str] | None = None, values: dict[str, Any] | None = None
) -> gr.components.Component:
    """The form field for one setting; its help text is dpo_core's TrainConfig help. `names`:
    what a list-of-names setting offers (the annotators); `values`: starting values other than
    the defaults, by setting name."""
    common = {"label": setting.label, "info": setting.help, "elem_id": f"setting-{setting.name}"}
    if setting.kind == NAMES:
        return gr.Dropdown(names or [], value=[], multiselect=True, **common)
    if setting.choices:
        value = (values or {}).get(setting.name, setting.default)
        return gr.Dropdown(list(setting.choices), value=value, **common)
    if setting.kind is bool:
        return gr.Checkbox(value=setting.default, **common)
    if setting.maximum is not None:
        return gr.Slider(0.0, setting.maximum, value=setting.default, step=0.05, **common)
    return gr.Number(setting.default, precision=0 if setting.kind is int else None, **common)


# --- handlers --------------------------------------------------------------------------------


@dataclass
class TrainHandlers:
    """The tab's event handlers; each returns `{component: update}`."""

    service: TrainingService
    tab: TrainTab
    job: SelfLabelJob | None = None

    def refresh(self, seen: dict[str, Any] | None, *selection: Any) -> dict[Any, Any]:
        """Poll: the live (else latest) run's progress, curves and history, sending only what
        changed since `seen`; the pair count follows the form's `selection` of votes."""
        seen = dict(seen or {})
        jobs = self.self_labels(seen)
        run_id, state = self.service.head()
        if seen.get("run") == [run_id, state] and state not in ACTIVE_STATES:
            return {**jobs, self.tab.seen: seen}  # a finished run shown already
        status = self.service.status()
        out: dict[Any, Any] = {
            self.tab.progress: progress_html(status),
            self.tab.train_btn: gr.Button(interactive=not status.active),
            self.tab.cancel_btn: gr.Button(interactive=status.active),
            **jobs,
        }
        key = [status.run_id, status.status, len(status.metrics)]
        if seen.get("metrics") != key:
            out.update(self.curves(status))
        if seen.get("run") != [status.run_id, status.status]:
            out[self.tab.history] = history_frame(self.service.history())
            out.update(self.recount(*selection))
            out[self.tab.settings["leave_out"]] = gr.Dropdown(choices=self.service.annotators())
        seen.update(metrics=key, run=[status.run_id, status.status])
        out[self.tab.seen] = seen
        return out

    def self_labels(self, seen: dict[str, Any]) -> dict[Any, Any]:
        """The self-labeling job's line when it changed since `seen` (which it updates), and
        on a page's first poll the team's setting (an admin may have changed it since the
        page was built)."""
        if self.job is None:
            return {}
        out: dict[Any, Any] = {}
        if not seen:
            out[self.tab.settings["self_labels"]] = gr.Dropdown(
                list(SELF_LABEL_CHOICES), value=self.job.choice()
            )
        text = self.job.progress().text()
        if seen.get("self_labels") != text:
            out[self.tab.self_label_status] = text
        seen["self_labels"] = text
        return out

    def choose_self_labels(self, choice: str, request: gr.Request) -> dict[Any, Any]:
        """When an admin changes "Add the model's own labels": the team's setting, which the
        self-labeling job follows; the next run trains with the labels when on."""
        if self.job is None:
            return {}
        require_role(request, ADMIN, "change whether the model labels its own answers")
        try:
            chosen = self.job.set_choice(choice)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        return {self.tab.message: f"Add the model's own labels: **{chosen}**."}

    def label_now(self, request: gr.Request) -> dict[Any, Any]:
        """The button "Label with the model now": the self-labeling job, active version."""
        require_role(request, ADMIN, "start the model's labeling")
        if self.job is None:
            return {self.tab.message: "⚠️ This app has no self-labeling job."}
        return {
            self.tab.message: self.job.start(),
            self.tab.self_label_status: self.job.progress().text(),
        }

    def recount(self, *selection: Any) -> dict[Any, Any]:
        """The summary's pair count for the votes and round the form selects (a round counts
        from the active version, or from the base for a fresh adapter)."""
        chosen = dict(zip(SELECTION_SETTINGS, selection, strict=False))
        fresh = chosen.get("continue_from_active") is False
        summary = self.service.summary(selection_from_values(list(selection)), fresh=fresh)
        return {self.tab.summary: summary_markdown(summary)}

    def curves(self, status: RunStatus) -> dict[Any, Any]:
        """The four plots; the KL plot gives way to a note when there is no readout."""
        frames = metric_frames(status.metrics)
        out: dict[Any, Any] = {self.tab.plots[t]: frames[t] for t in PLOTS}
        note = kl_note(status)
        out[self.tab.plots[KL_PLOT]] = gr.LinePlot(frames[KL_PLOT], visible=note is None)
        out[self.tab.kl_note] = gr.Markdown(note or "", visible=note is not None)
        return out

    def start(self, values: dict[Any, Any], request: gr.Request) -> dict[Any, Any]:
        require_role(request, ADMIN, "start training")
        by_name = {name: values[component] for name, component in self.tab.settings.items()}
        result = start_run(self.service, by_name)
        icon = "" if result.ok else "⚠️ "
        return {self.tab.message: icon + result.message, self.tab.seen: {}}

    def cancel(self, request: gr.Request) -> dict[Any, Any]:
        require_role(request, ADMIN, "cancel training")
        return {self.tab.message: self.service.cancel()}


def start_run(service: TrainingService, values: dict[str, Any]) -> StartResult:
    """Start a run from settings by name (the form's or the API's); bad values are a
    StartResult that says which setting is wrong, never an exception."""
    try:
        train_request = TrainRequest.from_values(values)
    except (ValueError, TypeError) as err:
        return StartResult(False, f"Invalid settings: {err}")
    return service.start(train_request)


# --- API -------------------------------------------------------------------------------------


def train_start_signature() -> inspect.Signature:
    """/train_start's parameters: the settings, in order, with their defaults and types (made
    when the API is registered: the `devices` default asks CUDA, which import must not)."""
    return inspect.Signature(
        [
            *(
                inspect.Parameter(
                    s.name,
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    default=s.default,
                    annotation=list[str] if s.kind == NAMES else s.kind,
                )
                for s in SETTINGS
            ),
            inspect.Parameter(
                "request",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=None,
                annotation=gr.Request,
            ),
        ],
        return_annotation=dict[str, Any],
    )


def train_start_endpoint(service: TrainingService) -> Callable[..., dict[str, Any]]:
    """/train_start, with `train_start_signature()` (Gradio reads the parameters from it)."""
    signature = train_start_signature()

    def train_start(*args: Any) -> dict[str, Any]:
        """Start a DPO training run on the usable preference pairs (one run at a time).
        Returns {ok, message, run_id}; `ok` is false with a message for bad settings, zero
        usable pairs, or a run already in progress."""
        bound = signature.bind(*args)
        bound.apply_defaults()
        values = dict(bound.arguments)
        require_role(values.pop("request"), ADMIN, "start training")
        return asdict(start_run(service, values))

    train_start.__signature__ = signature  # type: ignore[attr-defined]
    train_start.__annotations__ = {
        **{p.name: p.annotation for p in signature.parameters.values()},
        "return": signature.return_annotation,
    }
    return train_start


@dataclass
class TrainApi:
    """The other named endpoints: /train_status, /train_cancel, /train_history."""

    service: TrainingService

    def train_status(self, run_id: int = 0) -> dict[str, Any]:
        """The live run (else run `run_id`, else the latest): status, step, total_steps,
        elapsed_s, eta_s, version, error, message, metrics (one dict per step)."""
        return self.service.status(run_id or None).to_dict(with_metrics=True)

    def train_cancel(self, request: gr.Request = None) -> dict[str, Any]:  # type: ignore[assignment]
        """Cancel the live run; the worker stops after its current step."""
        require_role(request, ADMIN, "cancel training")
        return {"message": self.service.cancel()}

    def train_history(self) -> list[dict[str, Any]]:
        """Every run, newest first: config, pairs, final metrics, duration, outcome, error."""
        return self.service.history()


def register_api(service: TrainingService) -> None:
    """Named endpoints for scripts and tests: /train_start, /train_status, /train_cancel,
    /train_history."""
    api = TrainApi(service)
    gr.api(train_start_endpoint(service), api_name="train_start")
    for endpoint in (api.train_status, api.train_cancel, api.train_history):
        gr.api(endpoint, api_name=endpoint.__name__)


# --- layout ----------------------------------------------------------------------------------


def layout(service: TrainingService, job: SelfLabelJob | None = None) -> TrainTab:
    """Declare the tab's components (inside the open `gr.Tab`); no events. `job`: the
    self-labeling job, whose setting the form shows."""
    summary = gr.Markdown(summary_markdown(service.summary()), elem_id="train-summary")
    with gr.Row():
        train_btn = gr.Button("Train", variant="primary", elem_id="train-button")
        cancel_btn = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel-button")
    message = gr.Markdown(elem_id="train-message")
    with gr.Accordion("Advanced", open=False):
        chosen = {"self_labels": job.choice()} if job is not None else {}
        settings = _settings_form(service.annotators(), chosen)
    with gr.Row():
        self_label_status = gr.Markdown(
            job.progress().text() if job is not None else "", elem_id="self-label-status"
        )
        self_label_btn = gr.Button(
            "Label with the model now",
            size="sm",
            scale=0,
            visible=job is not None,
            elem_id="self-label-button",
        )
    progress = gr.HTML(elem_id="train-progress")
    plots, note = _plots()
    history = gr.Dataframe(
        headers=list(HISTORY_COLUMNS),
        label="Run history",
        interactive=False,
        wrap=True,
        column_widths=list(HISTORY_COLUMNS.values()),
        elem_id="train-history",
    )
    return TrainTab(
        summary=summary,
        message=message,
        train_btn=train_btn,
        cancel_btn=cancel_btn,
        settings=settings,
        progress=progress,
        plots=plots,
        kl_note=note,
        history=history,
        seen=gr.State({}),
        timer=gr.Timer(POLL_S),
        self_label_status=self_label_status,
        self_label_btn=self_label_btn,
    )


def _settings_form(
    annotators: list[str], values: dict[str, Any]
) -> dict[str, gr.components.Component]:
    """One field per setting, in the rows the settings name; `values`: starting values other
    than the defaults (a team setting stored in the database)."""
    fields: dict[str, gr.components.Component] = {}
    for _, row in groupby(SETTINGS, key=lambda s: s.row):
        with gr.Row():
            fields.update({s.name: setting_component(s, annotators, values) for s in row})
    return fields


def _plots() -> tuple[dict[str, gr.LinePlot], gr.Markdown]:
    """The curves in a 2 x 2 grid, and the note shown instead of the KL plot when it is empty."""
    plots = {}
    empty = metric_frames([])
    titles = list(PLOTS)
    for row in (titles[:2], titles[2:]):
        with gr.Row():
            for title in row:
                with gr.Column():
                    plots[title] = gr.LinePlot(
                        empty[title],
                        x="step",
                        y="value",
                        color="metric",
                        title=title,
                        height=260,
                        visible=title != KL_PLOT,  # until a run has a readout
                        elem_id=_id(title),
                    )
                    if title == KL_PLOT:
                        note = gr.Markdown(kl_note(RunStatus()), container=True, elem_id="kl-note")
    return plots, note


def build_train_tab(
    service: TrainingService, tab_block: gr.Tab | None = None, job: SelfLabelJob | None = None
) -> TrainTab:
    """Declare the Train tab (inside the open `tab_block`) and wire its events; `job`: the
    self-labeling job ("Add the model's own labels", "Label with the model now")."""
    tab = layout(service, job)
    h = TrainHandlers(service, tab, job)
    outputs = tab.refresh_outputs()
    poll = {"show_progress": "hidden", "queue": False, "api_visibility": "private"}
    chosen = tab.selection_inputs()
    tab.timer.tick(h.refresh, inputs=[tab.seen, *chosen], outputs=outputs, **poll)
    if tab_block is not None:  # pairs labeled since the page loaded: recount on opening the tab
        tab_block.select(h.refresh, inputs=[gr.State({}), *chosen], outputs=outputs, **poll)
    for field in chosen:
        field.change(h.recount, inputs=chosen, outputs=tab.summary, **poll)
    tab.train_btn.click(
        h.start,
        inputs=set(tab.settings.values()),
        outputs=[tab.message, tab.seen],
        api_visibility="private",
    ).then(h.refresh, inputs=[tab.seen, *chosen], outputs=outputs, **poll)
    tab.cancel_btn.click(h.cancel, outputs=tab.message, api_visibility="private")
    tab.settings["self_labels"].input(
        h.choose_self_labels, inputs=tab.settings["self_labels"], outputs=tab.message, **poll
    )
    tab.self_label_btn.click(
        h.label_now, outputs=[tab.message, tab.self_label_status], api_visibility="private"
    )
    return tab


def _id(title: str) -> str:
    return "plot-" + title.lower().replace(" ", "-")
