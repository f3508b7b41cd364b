"""The Label tab: k answers (1 to 4) streamed side by side, one key per verdict, the next
answers at once. One screen (`app.label.screen`) and one set of handlers
(`app.label.handlers`) for every mode (`app.label.modes`); this module wires them. The named
API endpoints are registered by `app.label.api.register_api`.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.label.handlers import LabelHandlers
from app.label.modes import RANK
from app.label.screen import KEYS_JS, LabelTab, layout
from app.label.service import LabelService

# A ranking's letter clicks of one page are handled one after the other: each reads the order
# so far.
ORDER_EVENTS = {"concurrency_id": "rank-order", "concurrency_limit": 1}
PRIVATE = {"api_visibility": "private", "show_progress": "hidden"}


def build_label_tab(service: LabelService, demo: gr.Blocks) -> LabelTab:
    """Declare the tab inside the current `gr.Tab` and wire its events (and the page load)."""
    tab = layout(service)
    h = LabelHandlers(service, tab)
    outputs = tab.outputs()
    demo.load(h.init, [tab.name_store], outputs, **PRIVATE)
    demo.load(None, js=KEYS_JS)
    for event in (tab.annotator.blur, tab.annotator.submit):
        event(h.save_name, [tab.annotator, tab.answers], outputs, **PRIVATE)
    generation = _wire_generation(tab, h)
    for button, handler, inputs in (
        (tab.skip, h.skip, [tab.shown, tab.skipped]),
        (tab.regenerate, h.regenerate, [tab.shown]),
        (tab.ask, h.ask, [tab.typed]),
    ):
        button.click(handler, inputs, outputs, cancels=[generation], **PRIVATE)
    tab.answers.change(
        h.switch_answers, [tab.answers, tab.annotator], outputs, cancels=[generation], **PRIVATE
    )
    _wire_verdicts(tab, h)
    return tab


def _wire_generation(tab: LabelTab, h: LabelHandlers) -> Any:
    """Every set of answers starts by writing a new request into `tab.request`; returns the
    event, so Skip / Regenerate / "Answer my prompt" / a switch of mode can cancel it."""
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
        concurrency_limit=None,  # the model service queues requests and shows the position
        trigger_mode="multiple",  # a request that follows a cancelled one must still start
        **PRIVATE,
    )


def _wire_verdicts(tab: LabelTab, h: LabelHandlers) -> None:
    """Every mode's buttons go to the one record handler; a ranking's letters (and Undo) one
    at a time, a vote or a verdict at once (a short database transaction, not a model call)."""
    outputs = tab.outputs()
    inputs = [tab.shown, tab.picked, tab.annotator, tab.rewrite]
    for kind, view in tab.views.items():
        for key, button in view.buttons.items():
            if kind == RANK:
                button.click(h.record_for(key), inputs, outputs, **ORDER_EVENTS, **PRIVATE)
            else:
                button.click(
                    h.record_for(key),
                    inputs,
                    outputs,
                    concurrency_limit=None,
                    trigger_mode="once",
                    **PRIVATE,
                )
    tab.undo.click(h.undo, [tab.shown, tab.picked], outputs, **ORDER_EVENTS, **PRIVATE)
