"""The Label tab's one-answer mode ("Answers to judge: 1"): one answer, 👍 (key U) or 👎 (key D).

Layout, handlers and API endpoints of the mode; its rules live in `app.label.single`. The tab
(`app.label.tab`) keeps its pair screen as it was by default; in this mode it hides the two
answers, the four vote buttons and the rewrite box, and shows this view. Every answer still
starts from a new `tab.request` (the tab's one generation event, which Skip, Regenerate,
"Answer my prompt" and a switch of mode cancel), handed here when the mode is 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.auth.users import annotator_name
from app.label.ranking import RANK_MODES
from app.label.service import LabelSettings
from app.label.single import ONE_ANSWER, VERDICT_LABELS, SingleAnswers, SingleProgress
from app.label.tab import LabelTab, format_progress, new_request, user_errors
from app.safe_text import safe_markdown
from storage.db import StorageError
from storage.verdicts import VerdictCounts

TWO_ANSWERS = "2"  # the pair screen
# The rankings' choices (app.label.ranking_tab) share the switch; their handler shows their screen.
ANSWER_MODES = [
    ("1 (thumbs up/down)", ONE_ANSWER),
    ("2 (pick the better)", TWO_ANSWERS),
    *((mode, mode) for mode in RANK_MODES),
]
VERDICT_BUTTONS = {"up": ("U", "label-verdict-up"), "down": ("D", "label-verdict-down")}


@dataclass
class SingleView:
    """The mode's components: shown instead of the pair when one answer is judged."""

    view: gr.Column
    answer: gr.Markdown
    count: gr.Markdown
    verdicts: dict[str, gr.Button]
    shown: gr.State  # SingleProgress.to_dict() of the answer on screen; None when none

    def outputs(self) -> list[Any]:
        """What a generation or a verdict may update."""
        return [self.answer, self.count, *self.verdicts.values(), self.shown]


def answers_radio() -> gr.Radio:
    """The mode switch; 2 (the pair screen) by default."""
    return gr.Radio(
        ANSWER_MODES, value=TWO_ANSWERS, label="Answers to judge", elem_id="label-answers"
    )


def single_layout() -> SingleView:
    """Declare the view (hidden until the mode is 1): the answer, its count, 👍 and 👎."""
    with gr.Column(visible=False) as view:
        gr.Markdown("### The answer")
        answer = gr.Markdown("…", container=True, elem_id="label-answer-single")
        count = gr.Markdown(elem_id="label-count-single")
        with gr.Row():
            verdicts = {
                verdict: gr.Button(
                    f"{VERDICT_LABELS[verdict]} ({key})",
                    variant="primary",
                    interactive=False,
                    elem_id=elem_id,
                )
                for verdict, (key, elem_id) in VERDICT_BUTTONS.items()
            }
    return SingleView(view, answer, count, verdicts, gr.State(None))


def status_text(progress: SingleProgress) -> str:
    notice = f"\n\n⚠️ {progress.notice}" if progress.notice else ""
    if progress.waiting is not None:
        ahead = progress.waiting - 1
        if ahead <= 0:
            return f"⏳ Next in line: the model is finishing other work…{notice}"
        return f"⏳ Waiting for the model: {ahead} request(s) ahead of you…{notice}"
    if not progress.done:
        return f"Writing one answer with version **{progress.version}**…{notice}"
    return (
        f"The answer is ready (version **{progress.version}**). Is it a good answer? "
        f"👍 key U, 👎 key D; S skips, R regenerates.{notice}"
    )


def verdicts_text(counts: VerdictCounts) -> str:
    return (
        f"**Single answers judged by you: {counts.mine}** (👍 {counts.up} · 👎 {counts.down}) "
        f"· by everyone: {counts.everyone}"
    )


@dataclass
class SingleHandlers:
    """The mode's event handlers; each returns `{component: update}`."""

    service: SingleAnswers
    tab: LabelTab

    @property
    def view(self) -> SingleView:
        return self.tab.single

    def buttons(self, enabled: bool) -> dict[Any, Any]:
        return {b: gr.Button(interactive=enabled) for b in self.view.verdicts.values()}

    def pair_only(self) -> list[Any]:
        """The pair screen's parts this mode hides: the two answers, the votes, the rewrite."""
        return [self.tab.pair_row, self.tab.rewrite, *self.tab.votes.values()]

    def progress_text(self, name: str) -> str:
        pairs = format_progress(self.service.label.progress(name))
        return f"{pairs}  \n{verdicts_text(self.service.progress(name))}"

    def generate(
        self, req: dict[str, Any], name: str, skipped: list[int], settings: LabelSettings
    ) -> Iterator[dict[Any, Any]]:
        """Stream the answer `req` asks for (the tab's generation event, in mode 1)."""
        answers = user_errors(
            lambda: self.service.generate(
                name,
                typed=req.get("text"),
                skipped=skipped,
                settings=settings,
                prompt_id=req.get("prompt_id"),
            )
        )
        for i, progress in enumerate(answers):
            if isinstance(progress, SingleProgress):
                yield self.render(progress, first=i == 0)
            else:  # a message for the user, not a crash
                yield {
                    self.tab.status: f"⚠️ {progress}",
                    self.view.shown: None,
                    **self.buttons(False),
                }

    def render(self, progress: SingleProgress, first: bool) -> dict[Any, Any]:
        view = self.view
        out = {
            self.tab.status: status_text(progress),
            view.shown: progress.to_dict(),
            **self.buttons(progress.done),
        }
        if first:
            out[self.tab.prompt] = safe_markdown(progress.prompt)
        answer = progress.answer
        if answer is None:  # waiting for the model
            out[view.answer], out[view.count] = "…", ""
            return out
        out[view.answer] = safe_markdown(answer.text, empty="*(empty)*" if answer.finished else "…")
        out[view.count] = f"{answer.num_tokens} tokens" + ("" if answer.finished else " …")
        return out

    def verdict_for(self, verdict: str) -> Callable[..., dict[Any, Any]]:
        """The click handler of the 👍 or 👎 button."""

        # Not named `verdict`: Gradio names private events after their function, and the name
        # would take `/verdict` from the API endpoint.
        def verdict_click(
            shown: dict[str, Any] | None, annotator: str, request: gr.Request
        ) -> dict[Any, Any]:
            return self.record(verdict, shown, annotator, request)

        return verdict_click

    def record(
        self, verdict: str, shown: dict[str, Any] | None, annotator: str, request: gr.Request
    ) -> dict[Any, Any]:
        """Record the verdict on the answer shown, then ask for the next answer."""
        if not shown or not shown.get("done"):  # a second click after the verdict went through
            return {self.tab.request: gr.skip()}
        spent = max(0.0, time.time() - (shown.get("ready_at") or time.time()))
        name = annotator_name(request, annotator)
        try:
            result = self.service.verdict(
                name, shown["answer"]["response_id"], verdict, seconds_spent=spent
            )
        except (ValueError, StorageError) as err:
            raise gr.Error(str(err)) from err
        done = "Recorded" if result.new else "Already recorded"
        return {
            self.tab.progress: self.progress_text(name),
            self.tab.status: f"✅ {done}: {VERDICT_LABELS[verdict]}. Next answer…",
            self.view.shown: None,
            self.tab.request: new_request("queue"),
            **self.buttons(False),
        }

    def switch_answers(self, mode: str, annotator: str, request: gr.Request) -> dict[Any, Any]:
        """Show the pair screen (2) or the one-answer view (1), and start an answer for it."""
        if mode in RANK_MODES:  # the ranking screen's own handler takes over
            return {self.view.view: gr.update(visible=False), self.view.shown: None}
        one = mode == ONE_ANSWER
        tab, name = self.tab, annotator_name(request, annotator)
        progress = format_progress(self.service.label.progress(name))
        return {
            **{component: gr.update(visible=not one) for component in self.pair_only()},
            self.view.view: gr.update(visible=one),
            tab.progress: self.progress_text(name) if one else progress,
            tab.pair: None,
            self.view.shown: None,
            tab.request: new_request("queue"),
        }

    def wire(self, generation: Any) -> None:
        """The mode switch (it cancels the answer or pair being written) and 👍 / 👎."""
        tab, view = self.tab, self.view
        switched = [*self.pair_only(), view.view, tab.progress, tab.pair, view.shown, tab.request]
        tab.answers.change(
            self.switch_answers,
            [tab.answers, tab.annotator],
            switched,
            cancels=[generation],
            api_visibility="private",
            show_progress="hidden",
        )
        for verdict, button in view.verdicts.items():
            button.click(
                self.verdict_for(verdict),
                [view.shown, tab.annotator],
                [tab.progress, tab.status, tab.request, *view.outputs()],
                concurrency_limit=None,  # a short database transaction, not a model call
                trigger_mode="once",
                api_visibility="private",
                show_progress="hidden",
            )


@dataclass
class SingleApi:
    """Named endpoints for scripts and tests (`gradio_client`): generate_answer, verdict. With
    sign-in on, the signed-in user is the annotator."""

    service: SingleAnswers

    def generate_answer(
        self,
        prompt: str | None = None,
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[dict[str, Any]]:
        """One answer to `prompt` (None: the next prompt from the queue), streamed; the last
        value holds the stored response id (`answer.response_id`)."""
        name = annotator_name(request, annotator)
        for progress in user_errors(lambda: self.service.generate(name, typed=prompt)):
            if not isinstance(progress, SingleProgress):
                raise gr.Error(str(progress))
            yield progress.to_dict()

    def verdict(
        self,
        response_id: int,
        verdict: str,
        annotator: str = "",
        seconds_spent: float | None = None,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Record a verdict (up: a good answer, down: a bad one) on a stored answer; the same
        verdict twice is one verdict."""
        try:
            result = self.service.verdict(
                annotator_name(request, annotator),
                response_id,
                verdict,
                seconds_spent=seconds_spent,
            )
        except (ValueError, StorageError) as err:
            raise gr.Error(str(err)) from err
        return result.to_dict()


def register_single_api(service: SingleAnswers) -> None:
    """`/generate_answer` (streamed, queued like `/generate_pair`) and `/verdict` (a short
    database transaction, like `/vote`)."""
    api = SingleApi(service)
    gr.api(api.generate_answer, api_name="generate_answer", concurrency_limit=None)
    gr.api(api.verdict, api_name="verdict", queue=False)
