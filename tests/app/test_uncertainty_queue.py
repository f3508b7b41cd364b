"""Uncertainty first, through the Label service (in process, tiny model, real SQLite): the
scorer samples pairs through the decode loop and stores margins per version; the queue then
offers the least sure prompt; unscored prompts and a version switch fall back to the default
order; the setting persists and `--queue-order` sets it."""

from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from sqlalchemy import select

from app.__main__ import build_parser, config_from_args
from app.auth.users import ROLE_STATE_KEY
from app.label.queue_panel import build_queue_panel, change_order, current
from app.label.service import LabelService, open_label_service
from app.label.uncertainty import IDENTICAL, SCORING, SURE_MARGIN, ScorerSettings
from app.serving.service import ModelService
from app.serving.versions import VersionedModel
from dpo_core.engine import PREFETCH
from dpo_core.generation import AnswerSpec, SamplingParams
from dpo_core.uncertainty import IMPLICIT_REWARD, MEAN_LOGP
from storage import repo, runs
from storage.db import open_db
from storage.models import UncertaintyScore
from storage.uncertainty import (
    LEAST_LABELED,
    UNCERTAIN_FIRST,
    PromptScore,
    queue_order,
    record_scores,
    set_queue_order,
)
from tests.tiny import save_random_adapter

ANNOTATOR = SimpleNamespace(username="ann", state=SimpleNamespace(**{ROLE_STATE_KEY: "annotator"}))
PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "Name a fruit.", "Write a word."]


@pytest.fixture
def label(tiny_lm, tmp_path: Path) -> LabelService:
    """The Label service with the scorer's thread off (passes run when the test says)."""
    sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
    with sm.begin() as s:
        runs.ensure_base_version(s, "tiny")
        repo.add_prompts(s, PROMPTS, source="t")
    service = LabelService(sm, ModelService(VersionedModel(tiny_lm)), "tiny", prefetch=False)
    service.scorer.background = False
    service.scorer.rng = random.Random(0)  # the same sampled answers every run
    return service


def scores(service: LabelService, version: str) -> dict[int, UncertaintyScore]:
    with service.sm.begin() as s:
        version_id = service._version_id(s, version)
        rows = s.scalars(select(UncertaintyScore).filter_by(model_version_id=version_id)).all()
        s.expunge_all()
    return {row.prompt_id: row for row in rows}


def least_sure(service: LabelService, version: str) -> int:
    by_prompt = scores(service, version)
    return min(by_prompt, key=lambda p: (by_prompt[p].margin, p))


def queue(service: LabelService) -> list[int]:
    """The whole queue as the annotator would see it, skipping one prompt after another."""
    seen: list[int] = []
    for _ in PROMPTS:
        seen.append(service.pick_prompt("ann", None, skipped=set(seen))[0])
    return seen


def by_margin(service: LabelService, version: str) -> list[int]:
    by_prompt = scores(service, version)
    return sorted(by_prompt, key=lambda p: (by_prompt[p].margin, p))


def uncertain_first(service: LabelService) -> None:
    with service.sm.begin() as s:
        set_queue_order(s, UNCERTAIN_FIRST)


def test_the_default_order_neither_scores_nor_waits(label):
    first, _ = label.pick_prompt("ann", None)
    assert label.pick_prompt("ann", None, skipped={first})[0] == first + 1
    assert label.scorer._thread is None and scores(label, "base") == {}


def test_the_base_is_scored_and_its_least_sure_prompt_comes_first(label):
    uncertain_first(label)
    with label.sm.begin() as s:
        first = repo.list_prompts(s)[0].id
    assert label.pick_prompt("ann", None)[0] == first  # nothing scored yet: the default order
    assert label.scorer.score_window() == len(PROMPTS)
    by_prompt = scores(label, "base")
    assert len(by_prompt) == len(PROMPTS)
    assert {row.measure for row in by_prompt.values()} == {MEAN_LOGP}
    assert all(row.margin >= 0 for row in by_prompt.values())
    assert len({row.margin for row in by_prompt.values()}) > 1  # it tells prompts apart
    assert queue(label) == by_margin(label, "base") != sorted(by_margin(label, "base"))
    assert label.scorer.score_window() == 0  # every prompt of the window is scored


def test_a_version_switch_falls_back_then_scores_the_new_version(label, tiny_model_dir, tmp_path):
    uncertain_first(label)
    with label.sm.begin() as s:
        base_id = label._version_id(s, "base")
        ids = [p.id for p in repo.list_prompts(s)]
        record_scores(s, base_id, [PromptScore(ids[3], 0.01, MEAN_LOGP)])
    assert label.pick_prompt("ann", None)[0] == ids[3]
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "v1")
    with label.sm.begin() as s:
        runs.register_adapter_version(s, base_model="tiny", adapter_path=str(adapter))
    label.models.activate_version("v1", str(adapter))
    assert label.pick_prompt("ann", None)[0] == ids[0]  # v1 has no scores yet
    assert label.scorer.score_window() == len(PROMPTS)
    assert {row.measure for row in scores(label, "v1").values()} == {IMPLICIT_REWARD}
    assert queue(label) == by_margin(label, "v1") != sorted(by_margin(label, "v1"))
    assert len(scores(label, "base")) == 1  # the base's scores stay, keyed by the base


def test_the_least_labeled_come_before_the_least_sure(label):
    uncertain_first(label)
    label.scorer.score_window()
    target = least_sure(label, "base")
    pair = list(label.generate_pair("ann", prompt_id=target))[-1]
    label.vote("ann", pair.answers[0].response_id, pair.answers[1].response_id, "a")
    nxt = label.pick_prompt("ann", None)[0]
    assert nxt != target
    others = {p: row for p, row in scores(label, "base").items() if p != target}
    assert nxt == min(others, key=lambda p: (others[p].margin, p))


def wait_for_first_pass(scorer, deadline_s: float = 120.0) -> None:
    """Wait for the background scorer's first pass. The deadline is a hang guard, not a timing
    claim: a pass takes seconds on the tiny model; a thread that died or never woke fails here
    with a message instead of hanging the suite."""
    give_up = time.monotonic() + deadline_s
    while scorer.passes < 1:
        assert scorer._thread is not None and scorer._thread.is_alive(), (
            "the background scorer's thread is not running, so its first pass never comes"
        )
        assert time.monotonic() < give_up, (
            f"the background scorer made no pass in {deadline_s:.0f} s after a prompt was picked"
        )
        time.sleep(0.05)


def test_picking_a_prompt_wakes_the_background_scorer(label):
    uncertain_first(label)
    label.scorer.background = True
    label.pick_prompt("ann", None)
    wait_for_first_pass(label.scorer)
    assert len(scores(label, "base")) == len(PROMPTS)
    label.scorer.close()
    assert not label.scorer._thread.is_alive()
    assert label.pick_prompt("ann", None)[0] == least_sure(label, "base")


def test_the_flag_stores_the_order_for_every_replica(tiny_lm, tmp_path):
    config = config_from_args(build_parser().parse_args(["--queue-order", UNCERTAIN_FIRST]))
    assert config.queue_order == UNCERTAIN_FIRST
    assert config_from_args(build_parser().parse_args([])).queue_order is None
    url = f"sqlite:///{tmp_path / 'studio.db'}"
    versions = VersionedModel(tiny_lm)
    open_label_service(open_db(url), versions, "tiny", tmp_path, queue_order=UNCERTAIN_FIRST)
    open_label_service(open_db(url), versions, "tiny", tmp_path)  # no flag: kept as stored
    with open_db(url).begin() as s:
        assert queue_order(s) == UNCERTAIN_FIRST
    open_label_service(open_db(url), versions, "tiny", tmp_path, queue_order=LEAST_LABELED)
    with open_db(url).begin() as s:
        assert queue_order(s) == LEAST_LABELED


def test_an_unknown_queue_order_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--queue-order", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err


def test_an_admin_sets_the_order_in_the_data_tab_and_others_cannot(label):
    with gr.Blocks() as demo:
        panel = build_queue_panel(label.scorer, demo)
    assert current(label.scorer, panel)[panel.order] == LEAST_LABELED
    with pytest.raises(gr.Error, match="change the queue order"):
        change_order(label.scorer, panel, UNCERTAIN_FIRST, ANNOTATOR)
    assert current(label.scorer, panel)[panel.order] == LEAST_LABELED
    message = change_order(label.scorer, panel, UNCERTAIN_FIRST, None)[panel.message]  # local
    assert message.startswith("✅ Least sure first: 0 prompt(s) scored for version base")
    assert current(label.scorer, panel)[panel.order] == UNCERTAIN_FIRST
    message = change_order(label.scorer, panel, "random", None)[panel.message]
    assert message.startswith("⚠️ unknown queue order 'random'")
    assert current(label.scorer, panel)[panel.order] == UNCERTAIN_FIRST


def test_a_version_that_writes_the_same_answer_twice_is_sure(label):
    label.scorer.settings = ScorerSettings(temperatures=(0.0, 0.0), max_new_tokens=16)  # greedy
    assert label.scorer.score_window() == len(PROMPTS)
    rows = scores(label, "base").values()
    assert {(row.measure, row.margin) for row in rows} == {(IDENTICAL, SURE_MARGIN)}


def test_a_served_version_missing_from_the_database_keeps_the_default_order(
    label, tiny_model_dir, tmp_path
):
    uncertain_first(label)
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "v1")
    label.models.activate_version("v1", str(adapter))  # served, never registered
    with label.sm.begin() as s:
        first = repo.list_prompts(s)[0].id
    assert label.pick_prompt("ann", None)[0] == first


def test_scoring_waits_behind_labelers_and_their_prefetches(label):
    engine = label.models.versions.engine
    specs = [AnswerSpec(SamplingParams(1.0, 1.0, 4), seed=1)]
    with engine.lock:  # the loop cannot admit anything: the line is as submitted
        scoring = engine.submit("Scored", specs, priority=SCORING)
        prefetch = engine.submit("Next pair", specs, priority=PREFETCH)
        labeler = engine.submit("Asked now", specs)
        assert [r.ticket for r in engine._pending] == [labeler, prefetch, scoring]
    assert all(t.result().done for t in (labeler, prefetch, scoring))
