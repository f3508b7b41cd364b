"""The Compare tab: two versions side by side, blind votes with a win rate, batch before/after,
and held-out implicit-reward accuracy.

Handlers first (thin: parse, call the compare service, return named updates), layout after.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import gradio as gr
import pandas as pd

from app.auth.users import annotator_name
from app.compare.service import CompareService, write_csv
from app.safe_text import safe_markdown
from storage.db import StorageError

WIN_COLUMNS = ["version", "vs", "wins", "ties", "losses", "votes", "win rate", "95% CI"]
ACCURACY_COLUMNS = ["version", "held-out pairs", "reward accuracy", "mean margin"]
BLIND_WINNERS = {"Left is better": "left", "Tie": "tie", "Right is better": "right"}


@dataclass
class CompareTab:
    version_a: gr.Dropdown
    version_b: gr.Dropdown
    seed: gr.Number
    prompt: gr.Textbox
    heldout: gr.Dropdown
    answer_a: gr.Markdown
    answer_b: gr.Markdown
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
    compare_btn: gr.Button


def make_handlers(service: CompareService, tab: CompareTab) -> dict[str, Any]:
    rng = random.Random()

    def refresh_choices() -> dict[Any, Any]:
        names = service.version_names()
        base, active = service.default_pair()
        prompts = service.heldout_prompts()
        return {
            tab.version_a: gr.Dropdown(choices=names, value=base),
            tab.version_b: gr.Dropdown(choices=names, value=active),
            tab.heldout: gr.Dropdown(choices=prompts, value=None),
            tab.win_table: pd.DataFrame(service.win_rate_rows(), columns=WIN_COLUMNS),
        }

    def side_by_side(a: str, b: str, prompt: str, seed: float) -> dict[Any, Any]:
        answers = _user_errors(service.side_by_side, a, b, prompt, int(seed or 0))
        return {
            tab.answer_a: f"**{answers[0].version}**\n\n{safe_markdown(answers[0].text)}",
            tab.answer_b: f"**{answers[1].version}**\n\n{safe_markdown(answers[1].text)}",
        }

    def blind_round(a: str, b: str, prompt: str, seed: float) -> dict[Any, Any]:
        rnd = _user_errors(service.blind_round, a, b, prompt, int(seed or 0), rng)
        out = {
            tab.blind_left: safe_markdown(rnd.left.text),
            tab.blind_right: safe_markdown(rnd.right.text),
            tab.blind_state: rnd.public(),
            tab.reveal: "Which answer is better? The versions are shown after your vote.",
        }
        out.update({btn: gr.Button(interactive=True) for btn in tab.vote_btns.values()})
        return out

    def vote(label: str) -> Any:
        def handler(state: dict[str, Any] | None, annotator: str, request: gr.Request) -> Any:
            if not state:
                raise gr.Error("Generate a blind pair first.")
            reveal = _user_errors(
                service.blind_vote,
                state["left_response_id"],
                state["right_response_id"],
                BLIND_WINNERS[label],
                annotator_name(request, annotator),
            )
            out = {
                tab.reveal: f"Vote recorded. {reveal}",
                tab.blind_state: None,
                tab.win_table: pd.DataFrame(service.win_rate_rows(), columns=WIN_COLUMNS),
            }
            out.update({btn: gr.Button(interactive=False) for btn in tab.vote_btns.values()})
            return out

        return handler

    def batch(a: str, b: str, n: float, seed: float) -> dict[Any, Any]:
        rows = _user_errors(service.batch, a, b, int(n), int(seed or 0))
        return {tab.batch_table: pd.DataFrame(rows), tab.batch_file: str(write_csv(rows))}

    def accuracy(a: str, b: str) -> dict[Any, Any]:
        rows = _user_errors(service.reward_accuracy, [a, b])
        return {tab.accuracy_table: pd.DataFrame(rows, columns=ACCURACY_COLUMNS)}

    return {
        "refresh": refresh_choices,
        "side_by_side": side_by_side,
        "blind_round": blind_round,
        "vote": vote,
        "batch": batch,
        "accuracy": accuracy,
    }


def register_api(service: CompareService) -> None:
    """Named endpoints: /compare, /blind_pair, /blind_vote, /win_rates, /compare_batch,
    /reward_accuracy. Bad input raises a `gr.Error` with a clear message."""
    rng = random.Random()

    def compare(version_a: str, version_b: str, prompt: str, seed: int = 0) -> dict[str, Any]:
        """Both versions answer `prompt` with the same sampling seed."""
        answers = _user_errors(service.side_by_side, version_a, version_b, prompt, seed)
        return {"answers": [asdict(a) for a in answers]}

    def blind_pair(version_a: str, version_b: str, prompt: str, seed: int = 0) -> dict[str, Any]:
        """Two answers in random order, without saying which version wrote which."""
        return _user_errors(service.blind_round, version_a, version_b, prompt, seed, rng).public()

    def blind_vote(
        left_response_id: int,
        right_response_id: int,
        winner: str,
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Record a blind vote (`left`, `right` or `tie`); returns the reveal and the table."""
        reveal = _user_errors(
            service.blind_vote,
            left_response_id,
            right_response_id,
            winner,
            annotator_name(request, annotator),
        )
        return {"reveal": reveal, "win_rates": service.win_rate_rows()}

    def win_rates() -> list[dict[str, Any]]:
        """Blind win / tie / loss per pair of versions, win rate and 95% Wilson interval."""
        return service.win_rate_rows()

    def compare_batch(version_a: str, version_b: str, n: int = 5, seed: int = 0) -> list[dict]:
        """Run `n` held-out prompts through both versions; one row per prompt."""
        return _user_errors(service.batch, version_a, version_b, n, seed)

    def reward_accuracy(versions: list[str]) -> list[dict[str, Any]]:
        """Implicit-reward accuracy of each version on the held-out preference pairs."""
        return _user_errors(service.reward_accuracy, versions)

    for fn in (compare, blind_pair, blind_vote, win_rates, compare_batch, reward_accuracy):
        gr.api(fn, api_name=fn.__name__)


def _user_errors(fn: Any, *args: Any) -> Any:
    """Call `fn`; a ValueError (bad input) or StorageError (the database refused a write)
    becomes a `gr.Error` the user reads, no traceback."""
    try:
        return fn(*args)
    except (ValueError, StorageError) as err:
        raise gr.Error(str(err)) from err


def build_compare_tab(service: CompareService, tab_block: gr.Tab | None = None) -> CompareTab:
    """Declare the Compare tab (inside an open `gr.Tab`) and wire its events."""
    names = service.version_names()
    base, active = service.default_pair()
    with gr.Row():
        version_a = gr.Dropdown(names, value=base, label="Version A", elem_id="compare-a")
        version_b = gr.Dropdown(names, value=active, label="Version B", elem_id="compare-b")
        seed = gr.Number(0, label="Sampling seed (same for both)", precision=0)
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=2, scale=3, elem_id="compare-prompt")
        heldout = gr.Dropdown(
            service.heldout_prompts(), value=None, label="…or a held-out prompt", scale=2
        )
    with gr.Tab("Side by side"):
        compare_btn = gr.Button("Generate both", variant="primary", elem_id="compare-button")
        with gr.Row():
            answer_a = gr.Markdown(elem_id="compare-answer-a", container=True)
            answer_b = gr.Markdown(elem_id="compare-answer-b", container=True)
    with gr.Tab("Blind"):
        annotator = gr.Textbox(label="Your name (ignored when signed in)", max_lines=1)
        blind_btn = gr.Button("New blind pair", variant="primary", elem_id="blind-button")
        with gr.Row():
            blind_left = gr.Markdown(elem_id="blind-left", container=True)
            blind_right = gr.Markdown(elem_id="blind-right", container=True)
        with gr.Row():
            vote_btns = {label: gr.Button(label, interactive=False) for label in BLIND_WINNERS}
        reveal = gr.Markdown()
        blind_state = gr.State(None)
        win_table = gr.Dataframe(
            pd.DataFrame(service.win_rate_rows(), columns=WIN_COLUMNS),
            label="Blind win rate (ties count half; 95% Wilson interval)",
            interactive=False,
        )
    with gr.Tab("Batch before/after"):
        with gr.Row():
            batch_n = gr.Slider(1, 50, value=5, step=1, label="Held-out prompts")
            batch_btn = gr.Button("Run batch", variant="primary")
        batch_table = gr.Dataframe(interactive=False, wrap=True, max_height=480)
        batch_file = gr.File(label="Download CSV", interactive=False)
    with gr.Tab("Held-out accuracy"):
        accuracy_btn = gr.Button("Compute implicit-reward accuracy")
        accuracy_table = gr.Dataframe(headers=ACCURACY_COLUMNS, interactive=False)
    tab = CompareTab(
        version_a=version_a,
        version_b=version_b,
        seed=seed,
        prompt=prompt,
        heldout=heldout,
        answer_a=answer_a,
        answer_b=answer_b,
        annotator=annotator,
        blind_btn=blind_btn,
        blind_left=blind_left,
        blind_right=blind_right,
        vote_btns=vote_btns,
        blind_state=blind_state,
        reveal=reveal,
        win_table=win_table,
        batch_n=batch_n,
        batch_btn=batch_btn,
        batch_table=batch_table,
        batch_file=batch_file,
        accuracy_btn=accuracy_btn,
        accuracy_table=accuracy_table,
        compare_btn=compare_btn,
    )
    _wire(tab, make_handlers(service, tab), tab_block)
    return tab


def _wire(tab: CompareTab, h: dict[str, Any], tab_block: gr.Tab | None) -> None:
    private = {"api_visibility": "private"}
    choices = [tab.version_a, tab.version_b, tab.heldout, tab.win_table]
    if tab_block is not None:
        tab_block.select(h["refresh"], outputs=choices, **private)
    tab.heldout.change(lambda p: p or gr.skip(), inputs=tab.heldout, outputs=tab.prompt, **private)
    ab = [tab.version_a, tab.version_b, tab.prompt, tab.seed]
    tab.compare_btn.click(
        h["side_by_side"], inputs=ab, outputs=[tab.answer_a, tab.answer_b], **private
    )
    blind_out = [tab.blind_left, tab.blind_right, tab.blind_state, tab.reveal]
    tab.blind_btn.click(
        h["blind_round"], inputs=ab, outputs=blind_out + list(tab.vote_btns.values()), **private
    )
    vote_out = [tab.reveal, tab.blind_state, tab.win_table, *tab.vote_btns.values()]
    for label, btn in tab.vote_btns.items():
        btn.click(
            h["vote"](label), inputs=[tab.blind_state, tab.annotator], outputs=vote_out, **private
        )
    tab.batch_btn.click(
        h["batch"],
        inputs=[tab.version_a, tab.version_b, tab.batch_n, tab.seed],
        outputs=[tab.batch_table, tab.batch_file],
        **private,
    )
    tab.accuracy_btn.click(
        h["accuracy"],
        inputs=[tab.version_a, tab.version_b],
        outputs=tab.accuracy_table,
        **private,
    )
