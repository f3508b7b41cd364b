"""The Compare tab's handlers, called as Gradio calls them (no server, real SQLite): a prompt
is there to start from, and an empty one is said in the page, not raised as an error (which
Gradio shows as a red "Error" box in every output)."""

from __future__ import annotations

import random
from pathlib import Path

import gradio as gr
import pytest

from app.compare.service import CompareService
from app.compare.tab import NO_PROMPT, CompareHandlers, layout, suggested_prompt
from storage import repo, runs
from storage.db import open_db


@pytest.fixture
def service(tmp_path: Path) -> CompareService:
    sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
    with sm.begin() as s:
        runs.ensure_base_version(s, "tiny")
    return CompareService(sm, models=None, base_model="tiny")  # no answer is generated here


def _handlers(service: CompareService) -> CompareHandlers:
    with gr.Blocks():
        tab = layout(service)
    return CompareHandlers(service, tab, random.Random(0))


def test_an_empty_prompt_is_said_in_the_page_and_the_answers_are_left_alone(service):
    h = _handlers(service)
    for prompt in ("", "   "):
        out = h.side_by_side("base", "base", prompt, 0)
        assert out == {h.tab.message: "⚠️ the prompt is empty: type one or pick a held-out prompt"}
        blind = h.blind_round("base", "v1", prompt, 0)
        assert set(blind) == {h.tab.message}
    assert h.vote("left", None, "ann") == {h.tab.message: "⚠️ Generate a blind pair first."}


def test_the_prompt_starts_from_a_heldout_prompt_else_the_queue(service):
    assert suggested_prompt(service) == ""
    with service.sm.begin() as s:
        repo.add_prompts(s, ["Name a fruit.", "Name a tree."], source="default")
    assert suggested_prompt(service) == "Name a fruit."
    with service.sm.begin() as s:
        repo.add_prompts(s, ["What is 2 + 2?"], source="import", split="heldout")
    assert suggested_prompt(service) == "What is 2 + 2?"


def test_opening_the_tab_fills_an_empty_prompt_and_keeps_a_typed_one(service):
    h = _handlers(service)
    assert h.refresh("")[h.tab.message] == NO_PROMPT  # nothing to suggest: say what is missing
    with service.sm.begin() as s:
        repo.add_prompts(s, ["Name a fruit."], source="default")
    filled = h.refresh("")
    assert (filled[h.tab.prompt], filled[h.tab.message]) == ("Name a fruit.", "")
    assert h.tab.prompt not in h.refresh("my own question")


def test_opening_the_tab_sends_a_version_only_when_the_default_changed(service):
    """A refresh sent before the user picked (the tab's select event racing the first click)
    must not put the default back over the pick when it lands: when the box already shows the
    default, no value is sent. A new active version (a run finished) is shown."""
    h = _handlers(service)
    fresh = h.refresh("q")
    assert (fresh[h.tab.version_a].value, fresh[h.tab.version_b].value) == ("base", "base")
    same = h.refresh("q", "base", "base")
    for box in (h.tab.version_a, h.tab.version_b):
        assert "value" not in same[box].constructor_args
    with service.sm.begin() as s:
        runs.register_adapter_version(s, base_model="tiny", adapter_path="/a/v1", activate=True)
    moved = h.refresh("q", "base", "base")
    assert "value" not in moved[h.tab.version_a].constructor_args
    assert moved[h.tab.version_b].value == "v1"
    assert [c[0] for c in moved[h.tab.version_b].choices] == ["base", "v1"]
