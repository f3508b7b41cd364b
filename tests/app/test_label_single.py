"""The Label tab's one-answer mode in process (tiny model, real SQLite): one answer stored with
its version and sampling, a verdict stored once, the queue moving on; the tab's handlers switch
the screen, judge and skip; `/generate_answer` and `/verdict` over HTTP (gradio_client)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from sqlalchemy import select

from app.label.api import register_api
from app.label.handlers import LabelHandlers
from app.label.modes import PAIR, SINGLE
from app.label.screen import layout
from app.label.service import LabelService, LabelSettings
from app.label.single import SingleAnswers
from app.serving.service import ModelService
from app.serving.versions import VersionedModel
from storage import repo, runs
from storage.db import open_db
from storage.models import AnswerVerdict, Response
from tests.app.server import free_port

SHORT = LabelSettings(max_new_tokens=16)


@pytest.fixture
def label(tiny_lm, tmp_path: Path) -> LabelService:
    sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
    with sm.begin() as s:
        runs.ensure_base_version(s, "tiny")
        repo.add_prompts(s, ["First prompt", "Second prompt"], source="t")
    models = ModelService(VersionedModel(tiny_lm))
    return LabelService(sm, models, "tiny", settings=SHORT, prefetch=False)


def _verdicts(label: LabelService) -> list[tuple[str, str, int]]:
    with label.sm.begin() as s:
        rows = s.scalars(select(AnswerVerdict).order_by(AnswerVerdict.id))
        return [(v.annotator, v.verdict, v.response_id) for v in rows]


def test_one_answer_is_stored_then_judged_once_and_the_queue_moves_on(label: LabelService):
    single = SingleAnswers(label)
    last = list(single.generate("ann"))[-1]
    answer = last.answer
    assert last.done and last.version == "base" and last.prompt == "First prompt"
    assert answer.temperature in SHORT.temperatures and answer.max_new_tokens == 16
    with label.sm.begin() as s:
        row = s.get(Response, answer.response_id)
        assert (row.text, row.seed, row.temperature) == (
            answer.text,
            answer.seed,
            answer.temperature,
        )
        assert row.prompt_id == last.prompt_id and row.num_tokens == answer.num_tokens
        assert row.num_tokens > 0 or row.text == ""  # the tiny random model may stop at once
    result = single.verdict("ann", answer.response_id, "up", seconds_spent=1.5)
    again = single.verdict("ann", answer.response_id, "down")  # a double click, a retry
    assert result.new and not again.new and again.verdict_id == result.verdict_id
    assert result.to_dict()["progress"] == {"mine": 1, "up": 1, "down": 0, "everyone": 1}
    assert _verdicts(label) == [("ann", "up", answer.response_id)]
    assert list(single.generate("ann"))[-1].prompt == "Second prompt"


def test_a_bad_verdict_gets_a_message_and_stores_nothing(label: LabelService):
    single = SingleAnswers(label)
    response_id = list(single.generate("ann"))[-1].answer.response_id
    with pytest.raises(ValueError, match="unknown verdict 'maybe'; use up"):
        single.verdict("ann", response_id, "maybe")
    with pytest.raises(ValueError, match="Type your name before voting"):
        single.verdict("  ", response_id, "up")
    with pytest.raises(ValueError, match="no response with id 999999"):
        single.verdict("ann", 999999, "up")
    assert _verdicts(label) == []


def test_the_tab_switches_to_one_answer_judges_it_and_skips(label: LabelService):
    with gr.Blocks():
        tab = layout(label)
    h = LabelHandlers(label, tab)
    single = tab.views[SINGLE]
    switched = h.switch_answers("1", "ann", None)
    assert switched[single.column].visible is True
    hidden = [tab.views[PAIR].column, tab.rewrite]  # the two answers, the votes, the rewrite
    assert [switched[c].visible for c in hidden] == [False] * len(hidden)
    assert "Single answers judged by you: 0" in switched[tab.progress]

    updates = list(h.generate(switched[tab.request], "ann", [], 0.7, 1.0, 0.95, 16, None, "1"))
    assert "Writing one answer" in updates[0][tab.status]
    last = updates[-1]
    assert "The answer is ready" in last[tab.status]
    assert all(last[b].interactive for b in tab.verdicts.values())
    shown = last[tab.shown]

    recorded = h.record_for("down")(shown, [], "ann", "", None)
    assert recorded[tab.status] == "✅ Recorded: 👎 Bad. Next answer…"
    assert "Single answers judged by you: 1** (👍 0 · 👎 1)" in recorded[tab.progress]
    assert recorded[tab.request]["mode"] == "queue" and recorded[tab.shown] is None
    assert _verdicts(label) == [("ann", "down", shown["answers"][0]["response_id"])]
    assert h.skip(shown, [])[tab.skipped] == [shown["prompt_id"]]
    assert h.regenerate(shown)[tab.request]["prompt_id"] == shown["prompt_id"]
    back = h.switch_answers("2", "ann", None)
    assert back[single.column].visible is False and back[tab.views[PAIR].column].visible is True
    ranking = h.switch_answers("3 (rank)", "ann", None)
    assert ranking[single.column].visible is False and ranking[tab.rewrite].visible is False


def test_the_verdict_endpoint_stores_the_verdict(label: LabelService):
    with gr.Blocks() as demo:
        register_api(label)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        answer = client.predict(None, "bot", api_name="/generate_answer")["answer"]
        result = client.predict(answer["response_id"], "down", "bot", 2.5, api_name="/verdict")
        retry = client.predict(answer["response_id"], "down", "bot", api_name="/verdict")
        with pytest.raises(AppError, match="unknown verdict 'meh'"):
            client.predict(answer["response_id"], "meh", "bot", api_name="/verdict")
    finally:
        demo.close()
    assert result["new"] is True and retry["new"] is False
    assert result["progress"] == {"mine": 1, "up": 0, "down": 1, "everyone": 1}
    assert _verdicts(label) == [("bot", "down", answer["response_id"])]
    with label.sm.begin() as s:
        assert s.scalars(select(AnswerVerdict.seconds_spent)).one() == 2.5
