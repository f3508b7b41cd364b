"""The ranking screen of the Label tab: 3 or 4 answers in a row, ordered with their letters.

Shown instead of the pair screen when "Answers to judge" is "3 (rank)" or "4 (rank)". Keys:
the letters best first (`B`, `A`: with 3 answers the order is then complete and recorded),
Backspace undoes the last letter, `S` skips the prompt. Handlers first, layout after; the logic
is in `app.label.ranking`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.auth.users import annotator_name
from app.label.ranking import (
    LETTERS,
    RANK_MODES,
    RankingService,
    complete_order,
    order_text,
)
from app.label.service import LabelService, LabelSettings, PairProgress
from app.label.tab import LabelTab, format_progress, new_request, user_errors
from app.safe_text import safe_markdown
from storage.db import StorageError
from storage.rankings import MAX_ANSWERS

RANK_KEYS_JS = """
() => {
  if (window.__dpoRankKeys) return;
  window.__dpoRankKeys = true;
  const keys = {"a": "rank-pick-a", "b": "rank-pick-b", "c": "rank-pick-c", "d": "rank-pick-d",
                "backspace": "rank-undo", "s": "rank-skip"};
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const target = event.composedPath()[0] || event.target;
    const tag = (target && target.tagName || "").toLowerCase();
    // The mode radio just clicked keeps the focus: a key pressed there is not typing.
    const choice = tag === "input" && ["radio", "checkbox"].includes(target.type);
    if ((tag === "input" && !choice) || tag === "textarea" || tag === "select" ||
        (target && target.isContentEditable)) return;  // typing, not ranking
    const id = keys[event.key.toLowerCase()];
    const element = id && document.getElementById(id);
    if (!element || element.offsetParent === null) return;  // ranking screen not shown
    const button = element.tagName === "BUTTON" ? element : element.querySelector("button");
    if (button && !button.disabled) {
      event.preventDefault();
      button.click();
    }
  });
}
"""
# Letter clicks of one page must be handled one after the other: each reads the order so far.
ORDER_EVENTS = {"concurrency_id": "rank-order", "concurrency_limit": 1}


@dataclass
class RankingScreen:
    screen: gr.Column
    panes: list[gr.Column]  # one per answer, A to D; D hidden for 3 answers
    headings: list[gr.Markdown]
    answers: list[gr.Markdown]
    counts: list[gr.Markdown]
    order: gr.Markdown
    picks: list[gr.Button]
    undo: gr.Button
    skip: gr.Button
    shown: gr.State  # the answers shown (a PairProgress dict), None between sets
    picked: gr.State  # display indexes placed so far, best first
    request: gr.State  # a new value starts a new set of answers

    def outputs(self, tab: LabelTab) -> list[Any]:
        """Every component a ranking handler may update, the Label tab's shared ones too."""
        own = [self.screen, *self.panes, *self.headings, *self.answers, *self.counts]
        own += [self.order, *self.picks, self.undo, self.shown, self.picked, self.request]
        return [*own, tab.pair_screen, tab.prompt, tab.status, tab.progress, tab.pair, tab.request]


def ready_text(k: int, version: str) -> str:
    last = LETTERS[k - 1]
    return (
        f"All {k} answers are ready (version **{version}**). Press their letters best first "
        f"(A–{last}); after {k - 1} letters the order is complete and recorded. Backspace "
        "undoes, S skips."
    )


@dataclass
class RankingHandlers:
    """The ranking screen's event handlers; each returns `{component: update}`."""

    service: RankingService
    tab: LabelTab
    screen: RankingScreen

    def buttons(self, k: int, enabled: bool) -> dict[Any, Any]:
        picks = {
            b: gr.Button(interactive=enabled and i < k, visible=i < k)
            for i, b in enumerate(self.screen.picks)
        }
        return {**picks, self.screen.undo: gr.Button(interactive=enabled)}

    def rank_switch(self, mode: str) -> dict[Any, Any]:
        """Show the ranking screen and start k answers, or show the pair screen again (whose
        own switch handler, in app.label.single_tab, starts what it shows)."""
        k = RANK_MODES.get(mode)
        ranking = k is not None
        out = {
            self.tab.pair_screen: gr.Column(visible=not ranking),
            self.screen.screen: gr.Column(visible=ranking),
            self.screen.shown: None,
            self.screen.picked: [],
            self.tab.pair: None,
        }
        if ranking:
            return {**out, self.screen.request: new_request("queue", k=k)}
        return out  # 1 or 2 answers: app.label.single_tab's handler starts them

    def rank_stream(
        self,
        req: dict[str, Any] | None,
        annotator: str,
        skipped: list[int] | None,
        temperature_a: float,
        temperature_b: float,
        top_p: float,
        max_new_tokens: float,
        request: gr.Request,
    ) -> Iterator[dict[Any, Any]]:
        """Stream the k answers `req` asks for; a user error ends with its message."""
        if not req:
            return
        settings = LabelSettings((temperature_a, temperature_b), top_p, int(max_new_tokens))
        name = annotator_name(request, annotator)
        k = int(req["k"])
        sets = user_errors(
            lambda: self.service.generate(name, k, skipped=skipped or [], settings=settings)
        )
        for i, answers in enumerate(sets):
            if isinstance(answers, PairProgress):
                yield self.render(answers, k, first=i == 0)
            else:  # a message for the user, not a crash
                yield {
                    self.tab.status: f"⚠️ {answers}",
                    self.screen.shown: None,
                    **self.buttons(k, False),
                }

    def render(self, answers: PairProgress, k: int, first: bool) -> dict[Any, Any]:
        screen = self.screen
        status = ready_text(k, answers.version) if answers.done else self._writing(answers, k)
        out = {
            self.tab.status: status,
            screen.shown: answers.to_dict(),
            **self.buttons(k, answers.done),
        }
        if first:
            out[self.tab.prompt] = safe_markdown(answers.prompt)
            out[screen.picked] = []
            out[screen.order] = ""
            for i in range(MAX_ANSWERS):  # a new set: the last one's answers and order go
                out[screen.panes[i]] = gr.Column(visible=i < k)
                out[screen.headings[i]] = f"### {LETTERS[i]}"
                out[screen.answers[i]], out[screen.counts[i]] = "…", ""
        for i, answer in enumerate(answers.answers):
            empty = "*(empty)*" if answer.finished else "…"
            out[screen.answers[i]] = safe_markdown(answer.text, empty=empty)
            out[screen.counts[i]] = f"{answer.num_tokens} tokens" + (
                "" if answer.finished else " …"
            )
        return out

    @staticmethod
    def _writing(answers: PairProgress, k: int) -> str:
        if answers.waiting is not None:
            ahead = max(answers.waiting - 1, 0)
            return f"⏳ Waiting for the model: {ahead} request(s) ahead of you…"
        return f"Writing {k} answers with version **{answers.version}**…"

    def pick_for(self, index: int) -> Callable[..., dict[Any, Any]]:
        """The click handler of letter `index`'s button."""

        def rank_pick(
            shown: dict[str, Any] | None,
            picked: list[int] | None,
            annotator: str,
            request: gr.Request,
        ) -> dict[Any, Any]:
            return self.pick(index, shown, list(picked or []), annotator, request)

        return rank_pick

    def pick(
        self,
        index: int,
        shown: dict[str, Any] | None,
        picked: list[int],
        annotator: str,
        request: gr.Request,
    ) -> dict[Any, Any]:
        """Place answer `index` next; once the order is complete, record it."""
        if not shown or not shown.get("done") or index in picked or index >= len(shown["answers"]):
            return {self.screen.picked: gr.skip()}
        picked.append(index)
        k = len(shown["answers"])
        order = complete_order(picked, k)
        if order is None:
            return self._placed(picked, k)
        ids = [shown["answers"][i]["response_id"] for i in order]
        spent = max(0.0, time.time() - (shown.get("ready_at") or time.time()))
        try:
            result = self.service.rank(
                annotator_name(request, annotator),
                ids,
                seconds_spent=spent,
                prompt_id=shown["prompt_id"],
            )
        except (ValueError, StorageError) as err:
            raise gr.Error(str(err)) from err
        done = "Recorded" if result.new else "Already recorded"
        said = f"✅ {done}: {order_text(order)} ({result.pairs} pairs). Next answers…"
        return {
            self.tab.progress: format_progress(result.progress),
            self.tab.status: said,
            self.screen.shown: None,
            self.screen.picked: [],
            self.screen.order: f"Last order: **{order_text(order)}**",
            self.screen.request: new_request("queue", k=k),
            **self.buttons(k, False),
        }

    def _placed(self, picked: list[int], k: int) -> dict[Any, Any]:
        """The order so far, in the order line and on each placed answer's heading."""
        out: dict[Any, Any] = {self.screen.picked: picked}
        so_far = f"Your order so far: **{order_text(picked)}** > …"
        out[self.screen.order] = so_far if picked else ""
        for i in range(k):
            place = f" · {picked.index(i) + 1}." if i in picked else ""
            out[self.screen.headings[i]] = f"### {LETTERS[i]}{place}"
        return out

    def rank_undo(self, shown: dict[str, Any] | None, picked: list[int] | None) -> dict[Any, Any]:
        if not shown or not picked:
            return {self.screen.picked: gr.skip()}
        return self._placed(list(picked)[:-1], len(shown["answers"]))

    def rank_skip(
        self, shown: dict[str, Any] | None, skipped: list[int] | None, mode: str
    ) -> dict[Any, Any]:
        skipped = list(skipped or [])
        if shown:
            skipped.append(shown["prompt_id"])
        k = RANK_MODES.get(mode, 3)
        return {
            self.tab.skipped: skipped,
            self.screen.shown: None,
            self.screen.picked: [],
            self.screen.request: new_request("queue", k=k),
        }


def ranking_layout() -> RankingScreen:
    """Declare the (hidden) ranking screen where it belongs in the tab; no events."""
    with gr.Column(visible=False, elem_id="rank-screen") as screen:
        panes, headings, answers, counts = [], [], [], []
        with gr.Row(equal_height=False):
            for letter in LETTERS:
                with gr.Column(min_width=200) as pane:
                    headings.append(gr.Markdown(f"### {letter}"))
                    answers.append(
                        gr.Markdown("…", container=True, elem_id=f"rank-answer-{letter.lower()}")
                    )
                    counts.append(gr.Markdown(elem_id=f"rank-count-{letter.lower()}"))
                panes.append(pane)
        order = gr.Markdown(elem_id="rank-order")
        with gr.Row():
            picks = [
                gr.Button(
                    f"{letter} ({letter.lower()})",
                    interactive=False,
                    elem_id=f"rank-pick-{letter.lower()}",
                )
                for letter in LETTERS
            ]
            undo = gr.Button("Undo (Backspace)", interactive=False, elem_id="rank-undo")
            skip = gr.Button("Skip (S)", elem_id="rank-skip")
    return RankingScreen(
        screen=screen,
        panes=panes,
        headings=headings,
        answers=answers,
        counts=counts,
        order=order,
        picks=picks,
        undo=undo,
        skip=skip,
        shown=gr.State(None),
        picked=gr.State([]),
        request=gr.State(None),
    )


def wire_ranking(service: LabelService, tab: LabelTab, demo: gr.Blocks, generation: Any) -> None:
    """Wire the ranking screen (`tab.ranking`, declared by the tab's layout) to
    `tab.answers`. `generation` is the pair screen's generation event: switching modes
    cancels it and this screen's own, so only the screen shown generates."""
    screen: RankingScreen = tab.ranking
    h = RankingHandlers(RankingService(service), tab, screen)
    outputs = [*screen.outputs(tab), tab.skipped]
    private = {"api_visibility": "private", "show_progress": "hidden"}
    demo.load(None, js=RANK_KEYS_JS)
    settings = [tab.temperature_a, tab.temperature_b, tab.top_p, tab.max_new_tokens]
    ranking = screen.request.change(
        h.rank_stream,
        [screen.request, tab.annotator, tab.skipped, *settings],
        outputs,
        concurrency_limit=None,  # the model service queues requests and shows the position
        trigger_mode="multiple",  # a request that follows a cancelled one must still start
        **private,
    )
    switch = [generation, ranking]  # only the screen shown generates
    tab.answers.change(h.rank_switch, [tab.answers], outputs, cancels=switch, **private)
    for i, button in enumerate(screen.picks):
        picks = [screen.shown, screen.picked, tab.annotator]
        button.click(h.pick_for(i), picks, outputs, **ORDER_EVENTS, **private)
    screen.undo.click(
        h.rank_undo, [screen.shown, screen.picked], outputs, **ORDER_EVENTS, **private
    )
    skips = [screen.shown, tab.skipped, tab.answers]
    screen.skip.click(h.rank_skip, skips, outputs, cancels=[ranking], **private)


@dataclass
class RankingApi:
    """Named endpoints for scripts and tests: generate_answers, rank."""

    service: RankingService

    def generate_answers(
        self,
        prompt: str | None = None,
        k: int = 3,
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[dict[str, Any]]:
        """k (3 or 4) answers to `prompt` (None: the next prompt from the queue), streamed; the
        last value holds the stored response ids, in display order (A, B, C, D)."""
        name = annotator_name(request, annotator)
        for answers in user_errors(lambda: self.service.generate(name, k, typed=prompt)):
            if not isinstance(answers, PairProgress):
                raise gr.Error(str(answers))
            yield answers.to_dict()

    def rank(
        self,
        response_ids: list[int],
        annotator: str = "",
        seconds_spent: float | None = None,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Record an order of 3 or 4 answers to one prompt, best first (response ids); stored
        as its implied pairs. The same answers ranked twice by one person are one ranking."""
        try:
            result = self.service.rank(
                annotator_name(request, annotator), response_ids, seconds_spent=seconds_spent
            )
        except (ValueError, StorageError) as err:
            raise gr.Error(str(err)) from err
        return result.to_dict()


def register_ranking_api(service: LabelService) -> None:
    """Register `RankingApi`'s endpoints: `/generate_answers` and `/rank`."""
    api = RankingApi(RankingService(service))
    gr.api(api.generate_answers, api_name="generate_answers", concurrency_limit=None)
    gr.api(api.rank, api_name="rank", queue=False)
