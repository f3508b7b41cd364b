"""The Label tab's one screen in every mode (1, 2, 3 and 4 answers), called as Gradio calls its
handlers (no server): the same status line, with the "prompt was cut" notice in each mode, and
guidelines that explain each mode's keys, ranking included.

The model is a stand-in that streams finished answers with the engine's notice (the point here
is the screen, not generation); the database is real SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pytest

from app.label.handlers import LabelHandlers, new_request
from app.label.modes import MODES
from app.label.screen import layout
from app.label.service import LabelService
from dpo_core.generation import AnswerProgress, GenerationUpdate
from storage import repo, runs
from storage.db import open_db

CUT = "Your prompt (9,000 characters) is longer than the model reads: only its first part is used."


class CutPrompt:
    """Streams short finished answers for any prompt, with the notice of a prompt that was cut."""

    active_version = "base"

    def stream(self, prompt: str, specs: list) -> Iterator[GenerationUpdate]:
        answers = tuple(AnswerProgress(f"Answer {i}.", 3, "stop", 0.1) for i in range(len(specs)))
        yield GenerationUpdate(answers, 0.1, 0.05, 2048, truncated=True, notice=CUT)


@pytest.fixture
def handlers(tmp_path: Path) -> LabelHandlers:
    sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
    with sm.begin() as s:
        runs.ensure_base_version(s, "tiny")
        repo.add_prompts(s, ["First prompt", "Second prompt"], source="t")
    service = LabelService(sm, CutPrompt(), "tiny", prefetch=False)
    with gr.Blocks():
        tab = layout(service)
    return LabelHandlers(service, tab)


@pytest.mark.parametrize("mode", [mode.value for mode in MODES if not mode.check])
def test_every_mode_shows_that_the_prompt_was_cut(handlers: LabelHandlers, mode: str):
    # The ranking screen once had its own status text, without the notice.
    tab = handlers.tab
    updates = list(
        handlers.generate(new_request("queue"), "ann", [], 0.7, 1.0, 0.95, 64, None, mode)
    )
    last = updates[-1]
    assert last[tab.shown]["done"] and "ready" in last[tab.status]
    assert f"⚠️ {CUT}" in last[tab.status]


def test_the_guidelines_shown_explain_every_mode_ranking_included(handlers: LabelHandlers):
    [shown] = [c for c in handlers.tab.guidelines.children if isinstance(c, gr.Markdown)]
    text = shown.value
    for words in ("A is better", "Good", "3 (rank)", "4 (rank)", "best first", "Backspace"):
        assert words in text, words
