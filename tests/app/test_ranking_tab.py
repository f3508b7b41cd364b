"""The ranking mode in process (tiny model, real SQLite): k answers from the engine with spread
temperatures and their own seeds; the screen's handlers place letters best first, undo, and
record the order with its implied pairs once k-1 letters are placed."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from sqlalchemy import select

from app.label.handlers import LabelHandlers, new_request
from app.label.modes import PAIR, RANK
from app.label.ranking import RankingService, complete_order
from app.label.screen import layout
from app.label.service import LabelService, LabelSettings, rank_settings
from app.serving.service import ModelService
from app.serving.versions import VersionedModel
from storage import repo, runs
from storage.db import open_db
from storage.models import Preference, Ranking, Response


@pytest.fixture
def label(tiny_lm, tmp_path: Path) -> LabelService:
    sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
    with sm.begin() as s:
        runs.ensure_base_version(s, "tiny")
        repo.add_prompts(s, ["First prompt", "Second prompt"], source="t")
    settings = LabelSettings(max_new_tokens=16)
    return LabelService(sm, ModelService(VersionedModel(tiny_lm)), "tiny", settings=settings)


def test_temperatures_are_spread_between_the_two_sliders():
    assert rank_settings(LabelSettings((0.7, 1.0)), 3).temperatures == (0.7, 0.85, 1.0)
    assert rank_settings(LabelSettings((0.4, 1.0)), 4).temperatures == (0.4, 0.6, 0.8, 1.0)
    with pytest.raises(ValueError, match="rank 3 or 4 answers, not 2"):
        rank_settings(LabelSettings(), 2)


def test_the_last_answer_is_placed_once_the_others_are():
    assert complete_order([1], 3) is None
    assert complete_order([1, 0], 3) == [1, 0, 2]
    assert complete_order([3, 0, 1], 4) == [3, 0, 1, 2]


def test_the_tiny_model_writes_three_stored_answers_that_differ(label: LabelService):
    *_, answers = RankingService(label).generate("ann", 3)
    assert answers.done and len(answers.answers) == 3
    assert sorted(a.temperature for a in answers.answers) == [0.7, 0.85, 1.0]
    assert len({a.seed for a in answers.answers}) == 3
    with label.sm.begin() as s:
        rows = [s.get_one(Response, a.response_id) for a in answers.answers]
        assert [r.text for r in rows] == [a.text for a in answers.answers]
        assert {r.prompt_id for r in rows} == {answers.prompt_id}
    assert label._prefetched == {}  # no pair is prefetched behind a ranking


def test_letters_best_first_record_the_ranking_and_its_pairs(label: LabelService):
    with gr.Blocks():
        tab = layout(label)
    h = LabelHandlers(label, tab)
    screen = tab.views[RANK]
    headings = screen.panes.headings
    updates = list(
        h.generate(new_request("queue"), "ann", [], 0.7, 1.0, 0.95, 16, None, "3 (rank)")
    )
    last = updates[-1]
    assert "All 3 answers are ready" in last[tab.status]
    assert [last[b].interactive for b in tab.picks] == [True, True, True, False]
    assert last[tab.picks[3]].visible is False
    assert updates[0][screen.panes.panes[3]].visible is False  # no fourth answer
    shown = last[tab.shown]

    first = h.record("B", shown, [], "ann", "", None)
    assert first[tab.picked] == [1] and "**B** > …" in first[tab.order]
    assert first[headings[1]] == "### B · 1."
    undone = h.undo(shown, [1])
    assert undone[tab.picked] == []
    assert list(h.record("C", shown, [2], "ann", "", None)) == [tab.picked]  # placed twice: no-op
    h.record("C", shown, [], "ann", "", None)
    done = h.record("A", shown, [2], "ann", "", None)  # C, then A: B is the worst

    assert "Recorded: C > A > B (3 pairs)" in done[tab.status]
    assert done[tab.request]["mode"] == "queue" and done[tab.shown] is None
    assert done[tab.order] == "Last order: **C > A > B**"
    ids = [a["response_id"] for a in shown["answers"]]
    with label.sm.begin() as s:
        [ranking] = s.scalars(select(Ranking)).all()
        assert ranking.response_ids == [ids[2], ids[0], ids[1]]
        assert ranking.annotator == "ann" and ranking.seconds_spent >= 0
        votes = s.scalars(select(Preference)).all()
        assert len(votes) == 3 and {v.ranking_id for v in votes} == {ranking.id}
    again = h.record("A", shown, [2], "ann", "", None)  # a second click on the last letter
    assert "Already recorded" in again[tab.status]


def test_switching_modes_shows_one_screen_and_starts_its_answers(label: LabelService):
    with gr.Blocks():
        tab = layout(label)
    h = LabelHandlers(label, tab)
    ranking = h.switch_answers("4 (rank)", "ann", None)
    assert ranking[tab.views[PAIR].column].visible is False
    assert ranking[tab.views[RANK].column].visible
    assert ranking[tab.request]["mode"] == "queue"  # the generation event reads the mode: 4
    pairs = h.switch_answers("2", "ann", None)
    assert pairs[tab.views[PAIR].column].visible and pairs[tab.views[RANK].column].visible is False
    assert pairs[tab.request]["mode"] == "queue"


def test_skips_and_regenerations_in_ranking_mode_reach_the_agreement_view(label: LabelService):
    # Ranking mode once took its own generate path, which noted neither.
    from storage.agreement import label_event_counts

    ranking = RankingService(label)
    first = list(ranking.generate("ann", 3))[-1]
    again = list(ranking.generate("ann", 3, prompt_id=first.prompt_id))[-1]  # regenerate
    assert again.prompt_id == first.prompt_id
    list(ranking.generate("ann", 3, skipped=[first.prompt_id]))  # skip
    with label.sm.begin() as s:
        assert label_event_counts(s) == {"ann": {"regenerate": 1, "skip": 1}}
