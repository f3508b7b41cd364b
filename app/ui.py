"""Gradio Blocks layout. Handlers live in their own modules; this file only declares the UI."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.compare_tab import build_compare_tab
from app.compare_tab import register_api as register_compare_api
from app.label import open_label_service
from app.label_tab import build_label_tab
from app.label_tab import register_api as register_label_api
from app.train_tab import build_train_tab
from app.train_tab import register_api as register_train_api

TITLE = "DPO Studio"


def build_ui(state: Any) -> gr.Blocks:
    """Build the app. `state` carries the loaded model, the sessionmaker and the config."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nLabel answer pairs, train DPO, compare versions.")
        label = open_label_service(
            state.services.sm, state.services.models, state.config.model, state.config.data_dir
        )
        with gr.Tab("Label"):
            build_label_tab(label, demo)
        with gr.Tab("Train") as train_tab:
            build_train_tab(state.services.training, train_tab)
        with gr.Tab("Compare") as compare_tab:
            build_compare_tab(state.services.compare, compare_tab)
        register_label_api(label)
        register_train_api(state.services.training)
        register_compare_api(state.services.compare)
    return demo
