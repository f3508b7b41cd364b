"""Dropdowns whose choices are refreshed (a tab opened, a run finished) without racing the
user's click."""

from __future__ import annotations

from collections.abc import Sequence

import gradio as gr


def refreshed_choice(
    choices: Sequence[str], current: str | None, default: str | None
) -> gr.Dropdown:
    """New `choices` for a dropdown that shows `default` (the active version, say). When the
    dropdown already shows it, no value is sent: a refresh sent before the user picked (a tab's
    select event racing the first click) would otherwise put the default back over the pick
    when its answer lands. A default that changed (a run made a new version active) is shown."""
    if current is not None and current == default and current in choices:
        return gr.Dropdown(choices=list(choices))
    return gr.Dropdown(choices=list(choices), value=default)
