"""The Label tab's event handlers, one set for every mode; each returns `{component: update}`.

Thin: parse, call the service (`LabelService.generate` for k answers, `Recorder.record` for a
verdict), return named updates. Every set of answers starts by writing a new request into
`tab.request` (the tab's one generation event), so Skip, Regenerate, "Answer my prompt" and a
switch of mode can cancel the answers being written.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import gradio as gr

from app.auth.users import annotator_name
from app.label.modes import BY_K, RANK, Mode, mode_of
from app.label.ranking import LETTERS, complete_order, order_text
from app.label.record import Recorder
from app.label.screen import LabelTab
from app.label.service import LabelService, LabelSettings, PairProgress
from app.label.texts import format_progress, status_text
from app.safe_text import safe_markdown
from storage.db import StorageError


def new_request(mode: str, **extra: Any) -> dict[str, Any]:
    """A generation request; the nonce makes every request a change of `tab.request`."""
    return {"mode": mode, "nonce": uuid.uuid4().hex, **extra}


T = TypeVar("T")


def user_errors(start: Callable[[], Iterator[T]]) -> Iterator[T | ValueError | StorageError]:
    """Iterate the generator `start()` returns; a ValueError (bad input, empty queue) or a
    StorageError (the database refused a write) is yielded as the last item, not raised."""
    try:
        yield from start()
    except (ValueError, StorageError) as err:
        yield err


def shown_mode(shown: dict[str, Any] | None) -> Mode | None:
    """The mode of the answers on screen, once complete (None before)."""
    if not shown or not shown.get("done"):
        return None
    return BY_K[len(shown["answers"])]


@dataclass
class LabelHandlers:
    """The tab's event handlers; each returns `{component: update}`."""

    service: LabelService
    tab: LabelTab
    recorder: Recorder = field(init=False)

    def __post_init__(self) -> None:
        self.recorder = Recorder(self.service)

    def buttons(self, mode: Mode, enabled: bool) -> dict[Any, Any]:
        """The mode's buttons, usable once its answers are complete; a ranking shows k."""
        buttons = self.tab.views[mode.buttons].buttons.values()
        if mode.buttons != RANK:
            return {b: gr.Button(interactive=enabled) for b in buttons}
        out = {
            b: gr.Button(interactive=enabled and i < mode.k, visible=i < mode.k)
            for i, b in enumerate(buttons)
        }
        return {**out, self.tab.undo: gr.Button(interactive=enabled)}

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

    def save_name(self, name: str, answers: str, request: gr.Request) -> dict[Any, Any]:
        name = annotator_name(request, name)
        return {
            self.tab.name_store: name,
            self.tab.progress: self.recorder.progress_text(name, mode_of(answers)),
        }

    def switch_answers(self, answers: str, annotator: str, request: gr.Request) -> dict[Any, Any]:
        """Show the mode's answers and buttons (the rewrite box with a pair only), and start
        its answers."""
        mode = mode_of(answers)
        tab, name = self.tab, annotator_name(request, annotator)
        out = {
            view.column: gr.Column(visible=kind == mode.buttons) for kind, view in tab.views.items()
        }
        return {
            **out,
            tab.rewrite: gr.Textbox(visible=mode.k == 2),
            tab.progress: self.recorder.progress_text(name, mode),
            tab.shown: None,
            tab.picked: [],
            tab.request: new_request("queue"),
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
        answers: str | None = None,
    ) -> Iterator[dict[Any, Any]]:
        """Stream the answers `req` asks for, as many as the mode `answers` judges; a user error
        (empty prompt or queue, a full disk) ends the stream with its message in the status."""
        if not req:
            return
        mode = mode_of(answers)
        settings = LabelSettings((temperature_a, temperature_b), top_p, int(max_new_tokens))
        name = annotator_name(request, annotator)
        stream = user_errors(
            lambda: self.service.generate(
                name,
                mode.k,
                typed=req.get("text"),
                skipped=skipped or [],
                settings=settings,
                prompt_id=req.get("prompt_id"),
                check=mode.check,
            )
        )
        for i, progress in enumerate(stream):
            if isinstance(progress, PairProgress):
                yield self.render(progress, mode, first=i == 0)
            else:  # a message for the user, not a crash
                yield {
                    self.tab.status: f"⚠️ {progress}",
                    self.tab.shown: None,
                    **self.buttons(mode, False),
                }

    def render(self, progress: PairProgress, mode: Mode, first: bool) -> dict[Any, Any]:
        """The status line, the answers so far and the mode's buttons; a new set clears the
        last one's answers and order."""
        tab = self.tab
        panes = tab.views[mode.buttons].panes
        out = {
            tab.status: status_text(progress, mode),
            tab.shown: progress.to_dict(),
            **self.buttons(mode, progress.done),
        }
        if first:
            out[tab.prompt] = safe_markdown(progress.prompt)
            out[tab.picked], out[tab.order] = [], ""
            for i, title in enumerate(panes.titles):
                out[panes.panes[i]] = gr.Column(visible=i < mode.k)
                out[panes.headings[i]] = f"### {title}"
                out[panes.answers[i]], out[panes.counts[i]] = "…", ""  # waiting for the model
        for i, answer in enumerate(progress.answers):
            empty = "*(empty)*" if answer.finished else "…"
            out[panes.answers[i]] = safe_markdown(answer.text, empty=empty)
            tokens = f"{answer.num_tokens} tokens" + ("" if answer.finished else " …")
            out[panes.counts[i]] = tokens
        return out

    def record_for(self, key: str) -> Callable[..., dict[Any, Any]]:
        """The click handler of the button for `key` (a choice, a verdict, a letter)."""

        # Not named `vote`, `verdict` or `rank`: Gradio names even private events after their
        # function, and the name would take the API endpoint's.
        def record_click(
            shown: dict[str, Any] | None,
            picked: list[int] | None,
            annotator: str,
            rewrite: str,
            request: gr.Request,
        ) -> dict[Any, Any]:
            return self.record(key, shown, list(picked or []), annotator, rewrite, request)

        return record_click

    def record(
        self,
        key: str,
        shown: dict[str, Any] | None,
        picked: list[int],
        annotator: str,
        rewrite: str,
        request: gr.Request,
    ) -> dict[Any, Any]:
        """Record what the button `key` says about the answers shown, then ask for the next
        answers. A ranking's letter is placed; the order is recorded once complete."""
        mode = shown_mode(shown)
        if mode is None or key not in mode.keys:  # a second click after the record went through
            return {self.tab.picked: gr.skip()}
        assert shown is not None
        order: list[int] = []
        if mode.buttons == RANK:
            index = LETTERS.index(key)
            if index in picked:
                return {self.tab.picked: gr.skip()}
            order = complete_order([*picked, index], mode.k) or []
            if not order:
                return self.placed([*picked, index], mode.k)
        spent = max(0.0, time.time() - (shown.get("ready_at") or time.time()))
        try:
            recorded = self.recorder.record(
                mode,
                annotator_name(request, annotator),
                shown,
                key,
                order=order,
                rewrite=rewrite or None,
                seconds_spent=spent,
            )
        except (ValueError, StorageError) as err:
            raise gr.Error(str(err)) from err
        done = "Recorded" if recorded.new else "Already recorded"
        out = {
            self.tab.progress: recorded.progress,
            self.tab.status: f"✅ {done}: {recorded.said}. Next {mode.next_up}…",
            self.tab.shown: None,
            self.tab.picked: [],
            self.tab.rewrite: "",
            self.tab.request: new_request("queue"),
            **self.buttons(mode, False),
        }
        if recorded.order is not None:
            out[self.tab.order] = recorded.order
        return out

    def placed(self, picked: list[int], k: int) -> dict[Any, Any]:
        """A ranking's order so far, in the order line and on each placed answer's heading."""
        headings = self.tab.views[RANK].panes.headings
        out: dict[Any, Any] = {self.tab.picked: picked}
        out[self.tab.order] = f"Your order so far: **{order_text(picked)}** > …" if picked else ""
        for i in range(k):
            place = f" · {picked.index(i) + 1}." if i in picked else ""
            out[headings[i]] = f"### {LETTERS[i]}{place}"
        return out

    def undo(self, shown: dict[str, Any] | None, picked: list[int] | None) -> dict[Any, Any]:
        """Take back a ranking's last letter."""
        if not shown or not picked:
            return {self.tab.picked: gr.skip()}
        return self.placed(list(picked)[:-1], len(shown["answers"]))

    def skip(self, shown: dict[str, Any] | None, skipped: list[int] | None) -> dict[Any, Any]:
        """Pass over the prompt shown: the next answers come from another prompt."""
        skipped = list(skipped or [])
        if shown:
            skipped.append(shown["prompt_id"])
        return {
            self.tab.skipped: skipped,
            self.tab.shown: None,
            self.tab.picked: [],
            self.tab.request: new_request("queue"),
            self.tab.rewrite: "",
        }

    def regenerate(self, shown: dict[str, Any] | None) -> dict[Any, Any]:
        """New answers to the prompt shown (the next prompt if none is)."""
        if not shown:
            return {self.tab.request: new_request("queue")}
        return {self.tab.request: new_request("regenerate", prompt_id=shown["prompt_id"])}

    def ask(self, typed: str) -> dict[Any, Any]:
        if not typed or not typed.strip():
            raise gr.Error("The prompt is empty: type a question or an instruction.")
        return {self.tab.request: new_request("typed", text=typed), self.tab.rewrite: ""}
