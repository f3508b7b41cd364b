"""Gradio Blocks layout. Handlers live in their own modules; this file only declares the UI."""

from __future__ import annotations

from typing import Any

import gradio as gr

TITLE = "DPO Studio"


def build_ui(state: Any) -> gr.Blocks:
    """Build the app. `state` carries the loaded model, the sessionmaker and the config."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nLabel answer pairs, train DPO, compare versions.")
        with gr.Tab("Label"):
            gr.Markdown(f"Model: **{state.model_name}**. The Label tab is being built.")
    return demo
