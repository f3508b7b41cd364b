"""The ranking mode in process (tiny model, real SQLite): k answers from the engine with spread
temperatures and their own seeds; the screen's handlers place letters best first, undo, and
record the order with its implied pairs once k-1 letters are placed."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from sqlalchemy import select

from app.label.ranking import RankingService, complete_order
from app.label.ranking_tab import RankingHandlers
from app.label.service import LabelService, LabelSettings, rank_settings
from app.label.tab import layout, new_request
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
    h = RankingHandlers(RankingService(label), tab, tab.ranking)
    screen = tab.ranking
    updates = list(h.rank_stream(new_request("queue", k=3), "ann", [], 0.7, 1.0, 0.95, 16, None))
    last = updates[-1]
    assert "All 3 answers are ready" in last[tab.status]
    assert [last[b].interactive for b in screen.picks] == [True, True, True, False]
    assert last[screen.picks[3]].visible is False
    assert updates[0][screen.panes[3]].visible is False  # no fourth answer
    shown = last[screen.shown]

    first = h.pick(1, shown, [], "ann", None)
    assert first[screen.picked] == [1] and "**B** > …" in first[screen.order]
    assert first[screen.headings[1]] == "### B · 1."
    undone = h.rank_undo(shown, [1])
    assert undone[screen.picked] == []
    assert list(h.pick(2, shown, [2], "ann", None)) == [screen.picked]  # placed twice: no-op
    h.pick(2, shown, [], "ann", None)
    done = h.pick(0, shown, [2], "ann", None)  # C, then A: B is the worst

    assert "Recorded: C > A > B (3 pairs)" in done[tab.status]
    assert done[screen.request]["k"] == 3 and done[screen.shown] is None
    ids = [a["response_id"] for a in shown["answers"]]
    with label.sm.begin() as s:
        [ranking] = s.scalars(select(Ranking)).all()
        assert ranking.response_ids == [ids[2], ids[0], ids[1]]
        assert ranking.annotator == "ann" and ranking.seconds_spent >= 0
        votes = s.scalars(select(Preference)).all()
        assert len(votes) == 3 and {v.ranking_id for v in votes} == {ranking.id}
    again = h.pick(0, shown, [2], "ann", None)  # a second click on the last letter
    assert "Already recorded" in again[tab.status]


def test_switching_modes_shows_one_screen_and_starts_its_answers(label: LabelService):
    with gr.Blocks():
        tab = layout(label)
    h = RankingHandlers(RankingService(label), tab, tab.ranking)
    ranking = h.rank_switch("4 (rank)")
    assert ranking[tab.pair_screen].visible is False and ranking[tab.ranking.screen].visible
    assert ranking[tab.ranking.request]["k"] == 4 and tab.request not in ranking
    pairs = h.rank_switch("2")
    assert pairs[tab.pair_screen].visible and pairs[tab.ranking.screen].visible is False
    # The switch's other handler (app.label.single_tab) starts the pair or the one answer.
    assert tab.request not in pairs and tab.ranking.request not in pairs


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
