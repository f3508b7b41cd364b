"""The Train tab's view helpers and handlers, without a server: plot frames (the browser test
checks that Vega draws them), the KL note, the history table, and the training settings
declared once (form fields, API parameters and parsing all come from `SETTINGS`)."""

from __future__ import annotations

import math
from dataclasses import fields

import gradio as gr
import pytest
from gradio.utils import get_function_params

from app.train.service import NAMES, SETTINGS, RunStatus, StartResult, TrainRequest
from app.train.tab import (
    HISTORY_COLUMNS,
    PLOTS,
    TrainHandlers,
    history_frame,
    kl_note,
    layout,
    metric_frames,
    summary_markdown,
    train_start_endpoint,
)
from storage.selection import VoteSelection


def test_every_curve_is_in_the_first_frame_so_the_plot_can_colour_it():
    # Vega keeps the colour domain of the first frame: a curve missing from it is never drawn.
    frames = metric_frames([])
    for title, names in PLOTS.items():
        assert list(frames[title]["metric"]) == list(names)
        assert frames[title]["value"].isna().all()


def test_metrics_become_points_of_their_curves_and_non_finite_values_are_left_out():
    metrics = [
        {"step": 1, "loss": 0.69, "rewards/margins": 0.0},
        {"step": 2, "loss": 0.5, "rewards/margins": math.inf, "eval/loss": 0.6},
    ]
    frames = metric_frames(metrics)
    loss = frames["Loss"].dropna()
    assert loss.values.tolist() == [[1, 0.69, "loss"], [2, 0.5, "loss"], [2, 0.6, "eval/loss"]]
    rewards = frames["Rewards"].dropna()
    assert rewards.values.tolist() == [[1, 0.0, "rewards/margins"]]
    assert str(frames["Loss"]["step"].dtype) == "int64"
    assert str(frames["Loss"]["value"].dtype) == "float64"


def test_the_kl_plot_gives_way_to_a_note_that_says_why_there_is_no_readout():
    ran = [{"step": 1, "loss": 0.69}]
    no_heldout = RunStatus(run_id=3, status="succeeded", heldout_pairs=0, kl_prompts=8, metrics=ran)
    assert "run #3 has no held-out pairs" in kl_note(no_heldout)
    assert "--split heldout" in kl_note(no_heldout)
    assert "no run yet" in kl_note(RunStatus())
    off = RunStatus(run_id=4, status="succeeded", heldout_pairs=5, kl_prompts=0, metrics=ran)
    assert "turned off" in kl_note(off)
    waiting = RunStatus(run_id=5, status="running", heldout_pairs=5, kl_prompts=8, metrics=ran)
    assert "first held-out evaluation" in kl_note(waiting)
    measured = [*ran, {"step": 2, "eval/kl": 0.4}]
    assert kl_note(RunStatus(run_id=6, status="running", heldout_pairs=5, metrics=measured)) is None


def test_the_plots_update_hides_the_empty_kl_plot_and_shows_the_note():
    with gr.Blocks():
        tab = layout(StubService())
    h = TrainHandlers(StubService(), tab)
    no_heldout = RunStatus(run_id=3, status="succeeded", heldout_pairs=0, kl_prompts=8)
    out = h.curves(no_heldout)
    assert out[tab.plots["KL to base"]].visible is False
    assert out[tab.kl_note].visible is True and "no held-out pairs" in out[tab.kl_note].value
    measured = RunStatus(run_id=4, status="running", metrics=[{"step": 2, "eval/kl": 0.4}])
    out = h.curves(measured)
    assert out[tab.plots["KL to base"]].visible is True and out[tab.kl_note].visible is False


def test_the_history_table_puts_a_runs_settings_in_one_column():
    row = {"run": 1, "status": "succeeded", "loss": "sigmoid", "beta": 0.5, "lr": 0.0002}
    row.update(version="v1", pairs=10, epochs=3, note="")
    frame = history_frame([row, {"run": 2, "status": "failed", "loss": ""}])
    assert list(frame.columns) == list(HISTORY_COLUMNS)
    assert frame["settings"].tolist() == ["sigmoid, β 0.5, lr 0.0002, 3 epochs", ""]


def test_each_setting_is_one_form_field_and_one_api_parameter_with_its_default():
    with gr.Blocks():
        tab = layout(StubService())
    assert (
        list(tab.settings) == [s.name for s in SETTINGS] == [f.name for f in fields(TrainRequest)]
    )
    with gr.Blocks():
        params = get_function_params(train_start_endpoint(StubService()))
    assert [(name, default, hint) for name, _, default, hint in params] == [
        (s.name, s.default, list[str] if s.kind == NAMES else s.kind) for s in SETTINGS
    ]  # gr.Request is left out, as Gradio leaves it out of the API
    assert {s.kind for s in SETTINGS} == {str, float, int, bool, NAMES}


def test_the_api_and_the_form_parse_values_the_same_way():
    service = StubService()
    endpoint = train_start_endpoint(service)
    defaults = [s.default for s in SETTINGS]
    assert endpoint(*defaults, None)["ok"] and service.started == [TrainRequest()]
    bad = endpoint(*[2.5 if s.name == "epochs" else s.default for s in SETTINGS], None)
    message = "Invalid settings: epochs must be a whole number, got 2.5"
    assert bad == {"ok": False, "message": message, "run_id": None}
    with gr.Blocks():
        tab = layout(StubService())
    form = {tab.settings[s.name]: ("2" if s.name == "epochs" else s.default) for s in SETTINGS}
    TrainHandlers(service, tab).start(form, None)
    assert service.started[-1] == TrainRequest(epochs=2)


class StubService:
    """What the Train tab reads from the training service, without a database."""

    def __init__(self) -> None:
        self.started: list[TrainRequest] = []

    def annotators(self) -> list[str]:
        return ["ann", "judge:qwen"]

    def summary(self, selection: VoteSelection | None = None, fresh: bool = False) -> dict:
        self.selection = selection
        counts = {"usable_pairs": 0, "ties": 0, "both_bad": 0}
        return {**counts, "base_model": "tiny", "active_version": "base"}

    def start(self, request: TrainRequest) -> StartResult:
        self.started.append(request)
        return StartResult(True, "started", 1)


def test_the_votes_settings_reach_the_request_and_the_pair_count():
    service = StubService()
    with gr.Blocks():
        tab = layout(service)
    leave_out = tab.settings["leave_out"]
    assert leave_out.multiselect and [c[0] for c in leave_out.choices] == ["ann", "judge:qwen"]
    form = {tab.settings[s.name]: s.default for s in SETTINGS}
    form.update({tab.settings["votes"]: "unanimous", leave_out: ["ann"]})
    TrainHandlers(service, tab).start(form, None)
    assert service.started[-1] == TrainRequest(votes="unanimous", leave_out=("ann",))
    TrainHandlers(service, tab).recount("every", ["ann"], True)
    assert service.selection == VoteSelection("every", ("ann",), include_judges=True)


def test_an_unknown_votes_mode_is_refused_and_names_arrive_as_a_list_or_text():
    with pytest.raises(ValueError, match="votes must be one of majority, unanimous, every"):
        TrainRequest.from_values({"votes": "most"}).validate()
    service = StubService()
    names = [(["a", " b "] if s.name == "leave_out" else s.default) for s in SETTINGS]
    assert train_start_endpoint(service)(*names, None)["ok"]
    assert service.started[-1].leave_out == ("a", "b")
    assert TrainRequest.from_values({"leave_out": "a, b,"}).leave_out == ("a", "b")
    with pytest.raises(ValueError, match="leave out must be a list of names"):
        TrainRequest.from_values({"leave_out": 3})


def test_the_summary_says_what_the_chosen_votes_leave_out():
    info = {"usable_pairs": 3, "ties": 1, "both_bad": 0, "undecided": 2, "left_out": 4}
    text = summary_markdown({**info, "base_model": "m", "active_version": "base"})
    assert "2 answer pairs whose votes do not agree enough" in text
    assert "4 votes left out" in text


def test_the_kl_note_of_a_run_without_held_out_pairs_says_what_it_reads_kl_on():
    """A 6-pair run holds out none but reads KL on the queue's unlabeled prompts: the note
    says so during the run and after, never "no prompts to read KL on"."""
    ran = [{"step": 0, "total_steps": 6, "kl_readout_prompts": 46}, {"step": 1, "loss": 0.69}]
    running = RunStatus(run_id=9, status="running", heldout_pairs=0, kl_prompts=8, metrics=ran)
    running.readout_prompts = 46
    note = kl_note(running)
    assert "no prompts to read KL on" not in note
    assert "46 prompts not trained on" in note and "first held-out evaluation" in note
    ended = RunStatus(run_id=9, status="cancelled", heldout_pairs=0, kl_prompts=8, metrics=ran)
    ended.readout_prompts = 46
    assert "no prompts to read KL on" not in kl_note(ended)
    assert "46 prompts not trained on" in kl_note(ended)
