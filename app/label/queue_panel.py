"""The label queue's order, in the Data tab (admins set it, everyone sees it): least labeled
first (the default) or least sure first (`app.label.uncertainty`). The same setting as
`python -m app --queue-order`, stored for every replica."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.auth.users import ADMIN, request_role, require_role
from app.label.uncertainty import UncertaintyScorer
from storage.uncertainty import LEAST_LABELED, QUEUE_ORDERS, UNCERTAIN_FIRST, queue_order

ORDER_NAMES = {
    LEAST_LABELED: "Least labeled first",
    UNCERTAIN_FIRST: "Least sure first (the served version's uncertainty)",
}
CHOICES = [(ORDER_NAMES[order], order) for order in QUEUE_ORDERS]


@dataclass
class QueuePanel:
    order: gr.Radio
    set_btn: gr.Button
    message: gr.Markdown


def current(scorer: UncertaintyScorer, panel: QueuePanel) -> dict[Any, Any]:
    with scorer.sm.begin() as s:
        order = queue_order(s)
    return {panel.order: order, panel.message: scorer.status()}


def change_order(
    scorer: UncertaintyScorer, panel: QueuePanel, order: str, request: gr.Request
) -> dict[Any, Any]:
    require_role(request, ADMIN, "change the queue order")
    try:
        return {panel.message: f"✅ {scorer.set_order(order)}"}
    except ValueError as err:
        return {panel.message: f"⚠️ {err}"}


def layout() -> QueuePanel:
    with gr.Accordion("Label queue order", open=False, elem_id="data-queue-order"):
        order = gr.Radio(CHOICES, value=LEAST_LABELED, label="Offer first", elem_id="queue-order")
        set_btn = gr.Button("Set order (admins)", scale=0, elem_id="queue-order-set")
        message = gr.Markdown(elem_id="queue-order-message")
    return QueuePanel(order, set_btn, message)


def build_queue_panel(
    scorer: UncertaintyScorer, demo: gr.Blocks, tab_block: gr.Tab | None = None
) -> QueuePanel:
    """Declare the panel inside the open Data tab and wire its events (private endpoints)."""
    panel = layout()
    private = {"api_visibility": "private"}
    outputs = [panel.order, panel.message]
    demo.load(lambda: current(scorer, panel), outputs=outputs, **private)
    if tab_block is not None:
        tab_block.select(lambda: current(scorer, panel), outputs=outputs, **private)

    def on_set_order(order: str, request: gr.Request) -> dict[Any, Any]:
        return change_order(scorer, panel, order, request)

    def show_set_button(request: gr.Request) -> dict[Any, Any]:
        return {panel.set_btn: gr.Button(visible=request_role(request) == ADMIN)}

    panel.set_btn.click(on_set_order, inputs=[panel.order], outputs=[panel.message], **private)
    demo.load(show_set_button, outputs=[panel.set_btn], **private)
    return panel
