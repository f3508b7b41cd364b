"""The Compare tab: two versions side by side, blind votes with a win rate, batch before/after,
and held-out implicit-reward accuracy.

Handlers first (thin: parse, call the compare service, return named updates), layout after.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import gradio as gr
import pandas as pd

from app.auth.users import annotator_name
from app.choices import refreshed_choice
from app.compare.service import CompareService, write_csv
from app.safe_text import safe_markdown
from storage import repo
from storage.db import StorageError

WIN_COLUMNS = ["version", "vs", "wins", "ties", "losses", "votes", "win rate", "95% CI"]
ACCURACY_COLUMNS = ["version", "held-out pairs", "reward accuracy", "mean margin"]
BLIND_WINNERS = {"Left is better": "left", "Tie": "tie", "Right is better": "right"}
USER_ERRORS = (ValueError, StorageError)  # bad input, or a write the database refused
NO_PROMPT = (
    "⚠️ There is no prompt to compare on yet: type one in the Prompt box (or import held-out "
    "prompts in the Data tab)."
)


@dataclass
class CompareTab:
    version_a: gr.Dropdown
    version_b: gr.Dropdown
    seed: gr.Number
    prompt: gr.Textbox
    heldout: gr.Dropdown
    message: gr.Markdown  # what is missing or wrong, said in the page
    answer_a: gr.Markdown
    answer_b: gr.Markdown
    compare_btn: gr.Button
    annotator: gr.Textbox
    blind_btn: gr.Button
    blind_left: gr.Markdown
    blind_right: gr.Markdown
    vote_btns: dict[str, gr.Button]
    blind_state: gr.State
    reveal: gr.Markdown
    win_table: gr.Dataframe
    batch_n: gr.Slider
    batch_btn: gr.Button
    batch_table: gr.Dataframe
    batch_file: gr.File
    accuracy_btn: gr.Button
    accuracy_table: gr.Dataframe


def suggested_prompt(service: CompareService) -> str:
    """A prompt to start from: the first held-out prompt, else the first prompt of the
    labeling queue, else "" (the page then says what is missing)."""
    heldout = service.heldout_prompts(limit=1)
    if heldout:
        return heldout[0]
    with service.sm.begin() as s:
        queue = repo.list_prompts(s, split="train", limit=1)
        return queue[0].text if queue else ""


def win_frame(service: CompareService) -> pd.DataFrame:
    return pd.DataFrame(service.win_rate_rows(), columns=WIN_COLUMNS)


# --- handlers --------------------------------------------------------------------------------


@dataclass
class CompareHandlers:
    """The tab's event handlers; each returns `{component: update}`. A user error (an empty
    prompt, one version twice, ...) is a message in the page, never a red "Error" box."""

    service: CompareService
    tab: CompareTab
    rng: random.Random

    def problem(self, err: Exception | str) -> dict[Any, Any]:
        return {self.tab.message: err if isinstance(err, str) else f"⚠️ {err}"}

    def refresh(
        self, prompt: str | None, a: str | None = None, b: str | None = None
    ) -> dict[Any, Any]:
        """On opening the tab: versions and held-out prompts (a run may have added some), and
        a prompt to start from when the box is empty. The versions the user picked stay."""
        names = self.service.version_names()
        base, active = self.service.default_pair()
        out = {
            self.tab.version_a: refreshed_choice(names, a, base),
            self.tab.version_b: refreshed_choice(names, b, active),
            self.tab.heldout: gr.Dropdown(choices=self.service.heldout_prompts(), value=None),
            self.tab.win_table: win_frame(self.service),
        }
        if not (prompt or "").strip():
            suggestion = suggested_prompt(self.service)
            out[self.tab.prompt] = suggestion
            out[self.tab.message] = "" if suggestion else NO_PROMPT
        return out

    def side_by_side(self, a: str, b: str, prompt: str, seed: float) -> dict[Any, Any]:
        try:
            answers = self.service.side_by_side(a, b, prompt, int(seed or 0))
        except USER_ERRORS as err:
            return self.problem(err)
        return {
            self.tab.message: "",
            self.tab.answer_a: f"**{answers[0].version}**\n\n{safe_markdown(answers[0].text)}",
            self.tab.answer_b: f"**{answers[1].version}**\n\n{safe_markdown(answers[1].text)}",
        }

    def blind_round(self, a: str, b: str, prompt: str, seed: float) -> dict[Any, Any]:
        try:
            rnd = self.service.blind_round(a, b, prompt, int(seed or 0), self.rng)
        except USER_ERRORS as err:
            return self.problem(err)
        return {
            self.tab.message: "",
            self.tab.blind_left: safe_markdown(rnd.left.text),
            self.tab.blind_right: safe_markdown(rnd.right.text),
            self.tab.blind_state: rnd.public(),
            self.tab.reveal: "Which answer is better? The versions are shown after your vote.",
            **{btn: gr.Button(interactive=True) for btn in self.tab.vote_btns.values()},
        }

    def vote_for(self, label: str) -> Callable[..., dict[Any, Any]]:
        """The click handler of the blind vote button `label`."""

        def blind_vote_click(
            state: dict[str, Any] | None, annotator: str, request: gr.Request
        ) -> dict[Any, Any]:
            return self.vote(BLIND_WINNERS[label], state, annotator_name(request, annotator))

        return blind_vote_click

    def vote(self, winner: str, state: dict[str, Any] | None, annotator: str) -> dict[Any, Any]:
        if not state:
            return self.problem("⚠️ Generate a blind pair first.")
        left, right = state["left_response_id"], state["right_response_id"]
        try:
            reveal = self.service.blind_vote(left, right, winner, annotator)
        except USER_ERRORS as err:
            return self.problem(err)
        return {
            self.tab.message: "",
            self.tab.reveal: f"Vote recorded. {reveal}",
            self.tab.blind_state: None,
            self.tab.win_table: win_frame(self.service),
            **{btn: gr.Button(interactive=False) for btn in self.tab.vote_btns.values()},
        }

    def batch(self, a: str, b: str, n: float, seed: float) -> dict[Any, Any]:
        try:
            rows = self.service.batch(a, b, int(n), int(seed or 0))
        except USER_ERRORS as err:
            return self.problem(err)
        return {
            self.tab.message: "",
            self.tab.batch_table: pd.DataFrame(rows),
            self.tab.batch_file: str(write_csv(rows)),
        }

    def accuracy(self, a: str, b: str) -> dict[Any, Any]:
        try:
            rows = self.service.reward_accuracy([a, b])
        except USER_ERRORS as err:
            return self.problem(err)
        return {
            self.tab.message: "",
            self.tab.accuracy_table: pd.DataFrame(rows, columns=ACCURACY_COLUMNS),
        }


# --- API -------------------------------------------------------------------------------------


@dataclass
class CompareApi:
    """Named endpoints: /compare, /blind_pair, /blind_vote, /win_rates, /compare_batch,
    /reward_accuracy. Bad input raises a `gr.Error` with a clear message."""

    service: CompareService
    rng: random.Random

    def compare(self, version_a: str, version_b: str, prompt: str, seed: int = 0) -> dict:
        """Both versions answer `prompt` with the same sampling seed."""
        answers = _api_errors(self.service.side_by_side, version_a, version_b, prompt, seed)
        return {"answers": [asdict(a) for a in answers]}

    def blind_pair(self, version_a: str, version_b: str, prompt: str, seed: int = 0) -> dict:
        """Two answers in random order, without saying which version wrote which."""
        args = (version_a, version_b, prompt, seed, self.rng)
        return _api_errors(self.service.blind_round, *args).public()

    def blind_vote(
        self,
        left_response_id: int,
        right_response_id: int,
        winner: str,
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Record a blind vote (`left`, `right` or `tie`); returns the reveal and the table."""
        name = annotator_name(request, annotator)
        args = (left_response_id, right_response_id, winner, name)
        reveal = _api_errors(self.service.blind_vote, *args)
        return {"reveal": reveal, "win_rates": self.service.win_rate_rows()}

    def win_rates(self) -> list[dict[str, Any]]:
        """Blind win / tie / loss per pair of versions, win rate and 95% Wilson interval."""
        return self.service.win_rate_rows()

    def compare_batch(self, version_a: str, version_b: str, n: int = 5, seed: int = 0) -> list:
        """Run `n` held-out prompts through both versions; one row per prompt."""
        return _api_errors(self.service.batch, version_a, version_b, n, seed)

    def reward_accuracy(self, versions: list[str]) -> list[dict[str, Any]]:
        """Implicit-reward accuracy of each version on the held-out preference pairs."""
        return _api_errors(self.service.reward_accuracy, versions)


def register_api(service: CompareService) -> None:
    """Register `CompareApi`'s endpoints under their method names."""
    api = CompareApi(service, random.Random())
    for fn in (
        api.compare,
        api.blind_pair,
        api.blind_vote,
        api.win_rates,
        api.compare_batch,
        api.reward_accuracy,
    ):
        gr.api(fn, api_name=fn.__name__)


def _api_errors(fn: Callable[..., Any], *args: Any) -> Any:
    """Call `fn`; a user error becomes a `gr.Error` the caller reads, no traceback."""
    try:
        return fn(*args)
    except USER_ERRORS as err:
        raise gr.Error(str(err)) from err


# --- layout ----------------------------------------------------------------------------------


def layout(service: CompareService) -> CompareTab:
    """Declare the tab's components (inside the open `gr.Tab`); no events."""
    names = service.version_names()
    base, active = service.default_pair()
    with gr.Row():
        version_a = gr.Dropdown(names, value=base, label="Version A", elem_id="compare-a")
        version_b = gr.Dropdown(names, value=active, label="Version B", elem_id="compare-b")
        seed = gr.Number(0, label="Sampling seed (same for both)", precision=0)
    prompt_text = suggested_prompt(service)
    with gr.Row():
        prompt = gr.Textbox(prompt_text, label="Prompt", lines=2, scale=3, elem_id="compare-prompt")
        heldout = gr.Dropdown(
            service.heldout_prompts(), value=None, label="…or a held-out prompt", scale=2
        )
    message = gr.Markdown("" if prompt_text else NO_PROMPT, elem_id="compare-message")
    with gr.Tab("Side by side"):
        compare_btn = gr.Button("Generate both", variant="primary", elem_id="compare-button")
        answer_a, answer_b = _answer_row("compare-answer-a", "compare-answer-b")
    blind = _blind_tab(service)
    batch = _batch_tab()
    with gr.Tab("Held-out accuracy"):
        accuracy_btn = gr.Button("Compute implicit-reward accuracy")
        accuracy_table = gr.Dataframe(headers=ACCURACY_COLUMNS, interactive=False)
    return CompareTab(
        version_a=version_a,
        version_b=version_b,
        seed=seed,
        prompt=prompt,
        heldout=heldout,
        message=message,
        answer_a=answer_a,
        answer_b=answer_b,
        compare_btn=compare_btn,
        **blind,
        **batch,
        accuracy_btn=accuracy_btn,
        accuracy_table=accuracy_table,
    )


def _answer_row(first_id: str, second_id: str) -> tuple[gr.Markdown, gr.Markdown]:
    """Two answer boxes side by side, each starting at the top of the row."""
    with gr.Row(equal_height=False):
        first = gr.Markdown(elem_id=first_id, container=True)
        second = gr.Markdown(elem_id=second_id, container=True)
    return first, second


def _blind_tab(service: CompareService) -> dict[str, Any]:
    """The Blind tab's components, by CompareTab field name."""
    with gr.Tab("Blind"):
        annotator = gr.Textbox(label="Your name (ignored when signed in)", max_lines=1)
        blind_btn = gr.Button("New blind pair", variant="primary", elem_id="blind-button")
        blind_left, blind_right = _answer_row("blind-left", "blind-right")
        with gr.Row():
            vote_btns = {label: gr.Button(label, interactive=False) for label in BLIND_WINNERS}
        reveal = gr.Markdown()
        win_table = gr.Dataframe(
            win_frame(service),
            label="Blind win rate (ties count half; 95% Wilson interval)",
            interactive=False,
        )
    return {
        "annotator": annotator,
        "blind_btn": blind_btn,
        "blind_left": blind_left,
        "blind_right": blind_right,
        "vote_btns": vote_btns,
        "blind_state": gr.State(None),
        "reveal": reveal,
        "win_table": win_table,
    }


def _batch_tab() -> dict[str, Any]:
    """The Batch before/after tab's components, by CompareTab field name."""
    with gr.Tab("Batch before/after"):
        with gr.Row():
            batch_n = gr.Slider(1, 50, value=5, step=1, label="Held-out prompts")
            batch_btn = gr.Button("Run batch", variant="primary")
        batch_table = gr.Dataframe(interactive=False, wrap=True, max_height=480)
        batch_file = gr.File(label="Download CSV", interactive=False)
    return {
        "batch_n": batch_n,
        "batch_btn": batch_btn,
        "batch_table": batch_table,
        "batch_file": batch_file,
    }


def build_compare_tab(service: CompareService, tab_block: gr.Tab | None = None) -> CompareTab:
    """Declare the Compare tab (inside an open `gr.Tab`) and wire its events."""
    tab = layout(service)
    h = CompareHandlers(service, tab, random.Random())
    private = {"api_visibility": "private"}
    if tab_block is not None:
        refreshed = [tab.version_a, tab.version_b, tab.heldout, tab.win_table, tab.prompt]
        picked = [tab.prompt, tab.version_a, tab.version_b]
        tab_block.select(h.refresh, picked, [*refreshed, tab.message], **private)
    tab.heldout.change(lambda p: p or gr.skip(), inputs=tab.heldout, outputs=tab.prompt, **private)
    ab = [tab.version_a, tab.version_b, tab.prompt, tab.seed]
    side = [tab.message, tab.answer_a, tab.answer_b]
    tab.compare_btn.click(h.side_by_side, inputs=ab, outputs=side, **private)
    votes = list(tab.vote_btns.values())
    blind = [tab.message, tab.blind_left, tab.blind_right, tab.blind_state, tab.reveal, *votes]
    tab.blind_btn.click(h.blind_round, inputs=ab, outputs=blind, **private)
    voted = [tab.message, tab.reveal, tab.blind_state, tab.win_table, *votes]
    for label, btn in tab.vote_btns.items():
        btn.click(h.vote_for(label), [tab.blind_state, tab.annotator], voted, **private)
    tab.batch_btn.click(
        h.batch,
        inputs=[tab.version_a, tab.version_b, tab.batch_n, tab.seed],
        outputs=[tab.message, tab.batch_table, tab.batch_file],
        **private,
    )
    tab.accuracy_btn.click(
        h.accuracy,
        inputs=[tab.version_a, tab.version_b],
        outputs=[tab.message, tab.accuracy_table],
        **private,
    )
    return tab
