"""The Label tab's handlers, called as Gradio calls them (no server): a pair whose answers the
database cannot store (a full disk) ends with the storage message in the page, not a crash.

Real SQLite, capped as in test_vote_on_full_disk.py; the model is a stand-in that streams two
long answers (the point here is the database and the tab, not generation)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from sqlalchemy import func, select

from app.label.handlers import LabelHandlers, new_request
from app.label.screen import layout
from app.label.service import LabelService
from dpo_core.generation import AnswerProgress, GenerationUpdate
from storage import repo
from storage.db import open_db
from storage.models import Response
from tests.app.test_vote_on_full_disk import _cap_file_size


class LongAnswers:
    """Streams two long answers for any prompt: one unfinished update, then the done one."""

    active_version = "base"

    def stream(self, prompt: str, specs: list) -> Iterator[GenerationUpdate]:
        text = "waves " * 2000
        for reason in (None, "length"):
            answers = tuple(AnswerProgress(text, 2000, reason, 1.0) for _ in specs)
            yield GenerationUpdate(answers, elapsed_s=1.0, first_token_s=0.1, prompt_tokens=5)


def test_answers_that_cannot_be_stored_end_with_the_storage_message(tmp_path: Path):
    sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
    with sm.begin() as s:
        repo.add_prompt(s, "Describe the sea.")
    service = LabelService(sm, LongAnswers(), base_model="tiny")
    with sm.begin() as s:  # the base version exists before the cap: only the answers fail
        from storage import runs

        runs.ensure_base_version(s, "tiny")
    _cap_file_size(sm)
    with gr.Blocks():
        tab = layout(service)
    handlers = LabelHandlers(service, tab)

    updates = list(handlers.generate(new_request("queue"), "ann", [], 0.7, 1.0, 0.95, 64, None))

    assert "Writing two answers" in updates[0][tab.status]  # it streamed before the failure
    last = updates[-1]
    assert last[tab.status].startswith("⚠️ The two answers could not be saved: the disk is full")
    assert last[tab.shown] is None
    assert all(last[button].interactive is False for button in tab.votes.values())
    with sm.begin() as s:
        assert s.scalar(select(func.count()).select_from(Response)) == 0
