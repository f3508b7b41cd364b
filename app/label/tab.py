"""The Label tab: two answers streamed side by side, one key per vote, the next pair at once.

Handlers first (thin: parse, call `LabelService`, return named updates), layout after. Every
generation goes through one event, started by writing a new request into `tab.request`, so
Skip / Regenerate / "Answer my prompt" can cancel the pair being generated.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.auth.users import annotator_name
from app.label.service import (
    CHOICES,
    MAX_NAME_CHARS,
    LabelService,
    LabelSettings,
    PairProgress,
    Progress,
)
from app.label.single import ONE_ANSWER, SingleAnswers
from app.safe_text import safe_markdown
from dpo_core.judge import Suggestion
from storage.db import StorageError

if TYPE_CHECKING:  # app.label.single_tab imports this module; this one imports it late
    from app.label.single_tab import SingleHandlers, SingleView

logger = logging.getLogger(__name__)

NAME_STORAGE_KEY = "dpo_studio_annotator"
BUTTONS = {  # choice -> (label, key, elem_id)
    "a": ("A is better", "1", "label-vote-a"),
    "b": ("B is better", "2", "label-vote-b"),
    "tie": ("Tie", "3", "label-vote-tie"),
    "both_bad": ("Both bad", "4", "label-vote-both-bad"),
}
KEYS_JS = """
() => {
  if (window.__dpoLabelKeys) return;
  window.__dpoLabelKeys = true;
  const keys = {"1": "label-vote-a", "2": "label-vote-b", "3": "label-vote-tie",
                "4": "label-vote-both-bad", "s": "label-skip", "r": "label-regenerate",
                "u": "label-verdict-up", "d": "label-verdict-down"};
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const target = event.composedPath()[0] || event.target;
    const tag = (target && target.tagName || "").toLowerCase();
    const choice = tag === "input" && ["radio", "checkbox"].includes(target.type);
    if ((tag === "input" && !choice) || tag === "textarea" || tag === "select" ||
        (target && target.isContentEditable)) return;  // typing (not a clicked radio)
    const id = keys[event.key.toLowerCase()];
    const element = id && document.getElementById(id);
    if (!element || element.offsetParent === null) return;  // Label tab not shown
    const button = element.tagName === "BUTTON" ? element : element.querySelector("button");
    if (button && !button.disabled) {
      event.preventDefault();
      button.click();
    }
  });
}
"""


@dataclass
class LabelTab:
    guidelines: gr.Accordion
    annotator: gr.Textbox
    name_store: gr.BrowserState
    progress: gr.Markdown
    prompt: gr.Markdown
    status: gr.Markdown
    answer_a: gr.Markdown
    answer_b: gr.Markdown
    count_a: gr.Markdown
    count_b: gr.Markdown
    votes: dict[str, gr.Button]
    skip: gr.Button
    regenerate: gr.Button
    rewrite: gr.Textbox
    typed: gr.Textbox
    ask: gr.Button
    temperature_a: gr.Slider
    temperature_b: gr.Slider
    top_p: gr.Slider
    max_new_tokens: gr.Slider
    pair: gr.State
    skipped: gr.State
    request: gr.State
    answers: gr.Radio  # how many answers to judge: 1 (thumbs up/down), 2 (the pair), 3-4 (rank)
    pair_screen: gr.Column  # what only the 2-answer screen shows (hidden while ranking)
    pair_row: gr.Row  # the two answers, hidden when one answer is judged
    single: SingleView  # the one-answer view (app.label.single_tab)
    ranking: Any  # app.label.ranking_tab.RankingScreen, shown instead while ranking

    def outputs(self) -> list[Any]:
        """Every component a handler may update (Gradio needs them declared per event)."""
        return [
            self.guidelines,
            self.annotator,
            self.name_store,
            self.progress,
            self.prompt,
            self.status,
            self.answer_a,
            self.answer_b,
            self.count_a,
            self.count_b,
            *self.votes.values(),
            self.rewrite,
            self.pair,
            self.skipped,
            self.request,
            *self.single.outputs(),
        ]


def new_request(mode: str, **extra: Any) -> dict[str, Any]:
    """A generation request; the nonce makes every request a change of `tab.request`."""
    return {"mode": mode, "nonce": uuid.uuid4().hex, **extra}


def format_progress(progress: Progress) -> str:
    choices = " · ".join(f"{CHOICES[c]} {n}" for c, n in progress.by_choice.items())
    return (
        f"**Labeled by you: {progress.mine}** · by everyone: {progress.everyone} · "
        f"usable for training: {progress.usable_pairs}  \n{choices} · prompts: {progress.prompts}"
    )


def status_text(pair: PairProgress) -> str:
    notice = f"\n\n⚠️ {pair.notice}" if pair.notice else ""
    if pair.waiting is not None:
        ahead = pair.waiting - 1
        if ahead <= 0:
            return f"⏳ Next in line: the model is finishing other work…{notice}"
        return f"⏳ Waiting for the model: {ahead} request(s) ahead of you…{notice}"
    if not pair.done:
        return f"Writing two answers with version **{pair.version}**…{notice}"
    shared = f" A pair others judged ({pair.shared})." if pair.shared else ""
    return (
        f"Both answers are ready (version **{pair.version}**).{shared} Vote with the buttons or "
        f"the keys 1–4; S skips, R regenerates.{notice}{suggestion_text(pair.suggestion)}"
    )


def suggestion_text(suggestion: Suggestion | None) -> str:
    """The judge's suggestion as a line under the status; the person's vote decides."""
    if suggestion is None:
        return ""
    if suggestion.choice is None:
        return f"\n\n🤖 No suggestion from {suggestion.judge}: {suggestion.reason}"
    pick = {"a": "A is better", "b": "B is better", "tie": "a tie"}[suggestion.choice]
    return (
        f"\n\n🤖 **{suggestion.judge} suggests: {pick}** ({suggestion.reason}). Your vote decides."
    )


def user_errors(
    start: Callable[[], Iterator[PairProgress]],
) -> Iterator[PairProgress | ValueError | StorageError]:
    """Iterate the generator `start()` returns; a ValueError (bad input, empty queue) or a
    StorageError (the database refused a write) is yielded as the last item, not raised."""
    try:
        yield from start()
    except (ValueError, StorageError) as err:
        yield err


@dataclass
class LabelHandlers:
    """The tab's event handlers; each returns `{component: update}`."""

    service: LabelService
    tab: LabelTab
    single: SingleHandlers = field(init=False)  # the one-answer mode's

    def __post_init__(self) -> None:
        from app.label.single_tab import SingleHandlers  # it imports this module

        self.single = SingleHandlers(SingleAnswers(self.service), self.tab)

    def buttons(self, enabled: bool) -> dict[Any, Any]:
        return {b: gr.Button(interactive=enabled) for b in self.tab.votes.values()}

    def init(self, stored: str | None, request: gr.Request) -> dict[Any, Any]:
        """Page load: the signed-in or remembered name (else a guest name), the first pair."""
        signed_in = getattr(request, "username", None)
        name = signed_in or (stored or "").strip() or f"guest-{secrets.token_hex(2)}"
        progress = self.service.progress(name)
        return {
            self.tab.annotator: gr.Textbox(value=name, interactive=not signed_in),
            self.tab.name_store: name,
            self.tab.progress: format_progress(progress),
            self.tab.guidelines: gr.Accordion(open=progress.mine == 0),
            self.tab.request: new_request("queue"),
        }

    def save_name(self, name: str, request: gr.Request) -> dict[Any, Any]:
        name = annotator_name(request, name)
        return {
            self.tab.name_store: name,
            self.tab.progress: format_progress(self.service.progress(name)),
        }

    def generate(
        self,
        req: dict[str, Any] | None,
        annotator: str,
        skipped: list[int] | None,
        temperature_a: float,
        temperature_b: float,
        top_p: float,
        max_new_tokens: float,
        request: gr.Request,
        answers: str = "2",
    ) -> Iterator[dict[Any, Any]]:
        """Stream the pair `req` asks for (one answer when `answers` is "1"); a user error
        (empty queue, bad settings, a write the database refused) ends the stream with its
        message in the status line."""
        if not req:
            return
        settings = LabelSettings((temperature_a, temperature_b), top_p, int(max_new_tokens))
        name = annotator_name(request, annotator)
        if answers == ONE_ANSWER:
            yield from self.single.generate(req, name, skipped or [], settings)
            return
        pairs = user_errors(
            lambda: self.service.generate_pair(
                name,
                typed=req.get("text"),
                skipped=skipped or [],
                settings=settings,
                prompt_id=req.get("prompt_id"),
            )
        )
        for i, pair in enumerate(pairs):
            if isinstance(pair, PairProgress):
                yield self.render(pair, first=i == 0)
            else:  # a message for the user, not a crash
                yield {self.tab.status: f"⚠️ {pair}", self.tab.pair: None, **self.buttons(False)}

    def render(self, pair: PairProgress, first: bool) -> dict[Any, Any]:
        tab = self.tab
        out = {tab.status: status_text(pair), tab.pair: pair.to_dict(), **self.buttons(pair.done)}
        if first:
            out[tab.prompt] = safe_markdown(pair.prompt)
        panes = ((tab.answer_a, tab.count_a), (tab.answer_b, tab.count_b))
        answers = pair.answers or (None, None)
        for answer, (box, count) in zip(answers, panes, strict=True):
            if answer is None:  # waiting for the model
                out[box], out[count] = "…", ""
                continue
            out[box] = safe_markdown(answer.text, empty="*(empty)*" if answer.finished else "…")
            out[count] = f"{answer.num_tokens} tokens" + ("" if answer.finished else " …")
        return out

    def vote_for(self, choice: str) -> Callable[..., dict[Any, Any]]:
        """The click handler of the button for `choice`."""

        # Not named `vote`: Gradio names even private events after their function, and the
        # name would take `/vote` from the API endpoint.
        def vote_click(
            pair: dict[str, Any] | None, annotator: str, rewrite: str, request: gr.Request
        ) -> dict[Any, Any]:
            return self.vote(choice, pair, annotator, rewrite, request)

        return vote_click

    def vote(
        self,
        choice: str,
        pair: dict[str, Any] | None,
        annotator: str,
        rewrite: str,
        request: gr.Request,
    ) -> dict[Any, Any]:
        """Record the vote on the pair shown, then ask for the next pair."""
        if not pair or not pair.get("done"):  # a second click after the vote went through
            return {self.tab.request: gr.skip()}
        a, b = (answer["response_id"] for answer in pair["answers"])
        spent = max(0.0, time.time() - (pair.get("ready_at") or time.time()))
        try:
            result = self.service.vote(
                annotator_name(request, annotator),
                a,
                b,
                choice,
                rewrite=rewrite,
                seconds_spent=spent,
            )
        except (ValueError, StorageError) as err:
            raise gr.Error(str(err)) from err
        done = "Recorded" if result.new else "Already recorded"
        return {
            self.tab.progress: format_progress(result.progress),
            self.tab.status: f"✅ {done}: {CHOICES[choice]}. Next pair…",
            self.tab.pair: None,
            self.tab.rewrite: "",
            self.tab.request: new_request("queue"),
            **self.buttons(False),
        }

    def skip(
        self,
        pair: dict[str, Any] | None,
        skipped: list[int] | None,
        single: dict[str, Any] | None = None,
    ) -> dict[Any, Any]:
        """Pass over the prompt shown (`single`: the one answer shown, in that mode)."""
        pair = pair or single
        skipped = list(skipped or [])
        if pair:
            skipped.append(pair["prompt_id"])
        return {
            self.tab.skipped: skipped,
            self.tab.request: new_request("queue"),
            self.tab.rewrite: "",
        }

    def regenerate(
        self, pair: dict[str, Any] | None, single: dict[str, Any] | None = None
    ) -> dict[Any, Any]:
        pair = pair or single
        if not pair:
            return {self.tab.request: new_request("queue")}
        return {self.tab.request: new_request("regenerate", prompt_id=pair["prompt_id"])}

    def ask(self, typed: str) -> dict[Any, Any]:
        if not typed or not typed.strip():
            raise gr.Error("The prompt is empty: type a question or an instruction.")
        return {self.tab.request: new_request("typed", text=typed), self.tab.rewrite: ""}


def layout(service: LabelService) -> LabelTab:
    """Declare the tab's components (inside the open `gr.Tab`); no events."""
    from app.label.single_tab import answers_radio, single_layout  # it imports this module

    guidelines, annotator, progress = _header(service)
    answers = answers_radio()
    prompt = gr.Markdown("…", label="Prompt", container=True, elem_id="label-prompt")
    status = gr.Markdown(elem_id="label-status")
    with gr.Column() as pair_screen:  # hidden while ranking
        # Not equal_height: that stretches each column's heading too, which pushes a short
        # answer's box down to the middle of the row. Each box starts at the top.
        with gr.Row(equal_height=False) as pair_row:  # hidden while one answer is judged
            answer_a, count_a = _answer_pane("a")
            answer_b, count_b = _answer_pane("b")
        single = single_layout()
        votes, skip, regenerate = _vote_row()
        rewrite = gr.Textbox(
            label="Write a better answer (optional: it becomes the chosen answer)",
            lines=3,
            elem_id="label-rewrite",
        )
        with gr.Accordion("Your own prompt", open=False):
            typed = gr.Textbox(label="Prompt", lines=3, elem_id="label-typed")
            ask = gr.Button("Answer my prompt", elem_id="label-ask")
    # Imported here (as in build_label_tab and register_api): ranking_tab builds on this module.
    from app.label.ranking_tab import ranking_layout

    ranking = ranking_layout()
    sliders = _sampling_sliders(service.settings)
    return LabelTab(
        guidelines=guidelines,
        annotator=annotator,
        name_store=gr.BrowserState("", storage_key=NAME_STORAGE_KEY),
        progress=progress,
        prompt=prompt,
        status=status,
        answer_a=answer_a,
        answer_b=answer_b,
        count_a=count_a,
        count_b=count_b,
        votes=votes,
        skip=skip,
        regenerate=regenerate,
        rewrite=rewrite,
        typed=typed,
        ask=ask,
        **sliders,
        pair=gr.State(None),
        skipped=gr.State([]),
        request=gr.State(None),
        answers=answers,
        pair_screen=pair_screen,
        pair_row=pair_row,
        single=single,
        ranking=ranking,
    )


def _header(service: LabelService) -> tuple[gr.Accordion, gr.Textbox, gr.Markdown]:
    """The guidelines, the annotator's name and their progress."""
    with gr.Accordion("Guidelines", open=False) as guidelines:
        gr.Markdown(service.guidelines())
    with gr.Row(equal_height=True):
        annotator = gr.Textbox(
            label="Your name",
            placeholder="Votes are recorded under this name",
            max_length=MAX_NAME_CHARS,
            scale=1,
            elem_id="label-annotator",
        )
        progress = gr.Markdown(elem_id="label-progress")
    return guidelines, annotator, progress


def _answer_pane(pane: str) -> tuple[gr.Markdown, gr.Markdown]:
    """One answer's column: its letter, the answer, its token count."""
    with gr.Column():
        gr.Markdown(f"### {pane.upper()}")
        answer = gr.Markdown("…", container=True, elem_id=f"label-answer-{pane}")
        count = gr.Markdown(elem_id=f"label-count-{pane}")
    return answer, count


def _vote_row() -> tuple[dict[str, gr.Button], gr.Button, gr.Button]:
    """The four vote buttons (disabled until a pair is complete), Skip and Regenerate."""
    with gr.Row():
        votes = {
            choice: gr.Button(
                f"{label} ({key})",
                variant="primary" if choice in ("a", "b") else "secondary",
                interactive=False,
                elem_id=elem_id,
            )
            for choice, (label, key, elem_id) in BUTTONS.items()
        }
        skip = gr.Button("Skip (S)", elem_id="label-skip")
        regenerate = gr.Button("Regenerate (R)", elem_id="label-regenerate")
    return votes, skip, regenerate


def _sampling_sliders(defaults: LabelSettings) -> dict[str, gr.Slider]:
    """The Sampling accordion, by LabelTab field name."""
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            sliders = {
                "temperature_a": gr.Slider(
                    0, 2, defaults.temperatures[0], step=0.05, label="Temperature 1"
                ),
                "temperature_b": gr.Slider(
                    0, 2, defaults.temperatures[1], step=0.05, label="Temperature 2"
                ),
                "top_p": gr.Slider(0.05, 1, defaults.top_p, step=0.05, label="Top-p"),
                "max_new_tokens": gr.Slider(
                    8, 1024, defaults.max_new_tokens, step=8, label="Max new tokens per answer"
                ),
            }
        gr.Markdown(
            "The two temperatures go to the two answers; which one is shown as A is random."
        )
    return sliders


def build_label_tab(service: LabelService, demo: gr.Blocks) -> LabelTab:
    """Declare the tab inside the current `gr.Tab` and wire its events (and the page load)."""
    tab = layout(service)
    h = LabelHandlers(service, tab)
    outputs = tab.outputs()
    hidden = {"show_progress": "hidden"}
    demo.load(h.init, [tab.name_store], outputs, **hidden)
    demo.load(None, js=KEYS_JS)
    tab.annotator.blur(h.save_name, [tab.annotator], outputs, **hidden)
    tab.annotator.submit(h.save_name, [tab.annotator], outputs, **hidden)
    generation = _wire_generation(tab, h)
    from app.label.ranking_tab import wire_ranking  # see layout

    wire_ranking(service, tab, demo, generation)  # rankings: 3-4 answers ordered best first
    for choice, button in tab.votes.items():
        button.click(
            h.vote_for(choice),
            [tab.pair, tab.annotator, tab.rewrite],
            outputs,
            concurrency_limit=None,  # a short database transaction, not a model call
            trigger_mode="once",
            api_visibility="private",
            **hidden,
        )
    for button, handler, inputs in (
        (tab.skip, h.skip, [tab.pair, tab.skipped, tab.single.shown]),
        (tab.regenerate, h.regenerate, [tab.pair, tab.single.shown]),
        (tab.ask, h.ask, [tab.typed]),
    ):
        button.click(
            handler, inputs, outputs, cancels=[generation], api_visibility="private", **hidden
        )
    h.single.wire(generation)
    return tab


def _wire_generation(tab: LabelTab, h: LabelHandlers) -> Any:
    """Every pair starts by writing a new request into `tab.request`; returns the event, so
    Skip / Regenerate / "Answer my prompt" can cancel it."""
    return tab.request.change(
        h.generate,
        [
            tab.request,
            tab.annotator,
            tab.skipped,
            tab.temperature_a,
            tab.temperature_b,
            tab.top_p,
            tab.max_new_tokens,
            tab.answers,
        ],
        tab.outputs(),
        show_progress="hidden",
        concurrency_limit=None,  # the model service queues requests and shows the position
        trigger_mode="multiple",  # a request that follows a cancelled one must still start
        api_visibility="private",
    )


@dataclass
class LabelApi:
    """Named endpoints for scripts and tests (`gradio_client`): generate_pair, vote,
    label_progress. With sign-in on, the signed-in user is the annotator."""

    service: LabelService

    def generate_pair(
        self,
        prompt: str | None = None,
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[dict[str, Any]]:
        """Two answers to `prompt` (None: the next prompt from the queue), streamed; the last
        value holds the stored response ids, in display order (A, B)."""
        name = annotator_name(request, annotator)
        for pair in user_errors(lambda: self.service.generate_pair(name, typed=prompt)):
            if not isinstance(pair, PairProgress):
                raise gr.Error(str(pair))
            yield pair.to_dict()

    def vote(
        self,
        response_a_id: int,
        response_b_id: int,
        choice: str,
        annotator: str = "",
        rewrite: str = "",
        seconds_spent: float | None = None,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Record a vote (choice: a, b, tie, both_bad); the same vote twice is one vote."""
        try:
            result = self.service.vote(
                annotator_name(request, annotator),
                response_a_id,
                response_b_id,
                choice,
                rewrite=rewrite or None,
                seconds_spent=seconds_spent,
            )
        except (ValueError, StorageError) as err:
            raise gr.Error(str(err)) from err
        return result.to_dict()

    def label_progress(
        self,
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Pairs labeled by the annotator and by everyone, usable pairs, per-choice counts."""
        return self.service.progress(annotator_name(request, annotator)).to_dict()


def register_api(service: LabelService) -> None:
    """Register `LabelApi`'s endpoints under their method names, the one-answer mode's
    (`/generate_answer`, `/verdict`: app.label.single_tab) and the rankings'
    (`/generate_answers`, `/rank`: app.label.ranking_tab)."""
    from app.label.ranking_tab import register_ranking_api  # they import this module
    from app.label.single_tab import register_single_api

    api = LabelApi(service)
    gr.api(api.generate_pair, api_name="generate_pair", concurrency_limit=None)
    # Votes and progress are short database transactions (~9 ms). API clients still reach them
    # through Gradio's queue and event stream (queue=False only changes the browser's path):
    # p99 177 ms at 16 annotators in bench/load.py. Scripts that need a fast vote use the plain
    # `POST /api/vote` route instead (app/label/route.py: p99 28.5 ms in the same benchmark).
    gr.api(api.vote, api_name="vote", queue=False)
    gr.api(api.label_progress, api_name="label_progress", queue=False)
    register_ranking_api(service)  # /generate_answers and /rank
    register_single_api(SingleAnswers(service))  # /generate_answer and /verdict
