"""Self-labels between rounds in the app (issue 27): the Train tab's "Add the model's own
labels" trains with them and their weights (and without them when off), the self-labeling job
stores none without enough people's labels of the version's own answers and says why, stores
`self:v1` votes above the calibrated margin when people agree with its scorer, never blocks a
labeler, and "Check the model's labels" shows a self-labeled pair whose vote overrides it.
In process, on the tiny random model and a real SQLite database."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.label.service import NO_SELF_LABELS, LabelService, LabelSettings
from app.serving.service import ModelService
from app.serving.versions import VersionedModel
from app.train.self_labels import SelfLabelJob
from app.train.service import TrainingService, TrainRequest
from app.train.tab import summary_markdown
from dpo_core import self_label as scoring
from storage import repo, runs
from storage.db import open_db
from storage.models import LabelEvent, Preference, Prompt, Response
from storage.selection import VoteSelection
from storage.self_labels import (
    SelfLabel,
    add_self_labels,
    self_label_agreement,
    set_self_label_multiplier,
)
from tests.app.worker_pairs import worker_read
from tests.tiny import save_random_adapter

SHORT = LabelSettings(max_new_tokens=8)


def answers(s: Session, version_id: int | None, prompt: str, texts: tuple[str, str]) -> list[int]:
    """Two stored answers by `version_id` to `prompt`: their ids."""
    pid = repo.add_prompt(s, prompt, source="t").id
    return [
        repo.record_response(s, prompt_id=pid, model_version_id=version_id, text=t).id
        for t in texts
    ]


def person_votes(s: Session, version_id: int, pairs: list[tuple[str, str, str]]) -> None:
    """ann prefers the first answer of each (prompt, first, second), both by `version_id`."""
    for prompt, first, second in pairs:
        a, b = answers(s, version_id, prompt, (first, second))
        repo.record_preference(s, response_a_id=a, response_b_id=b, choice="a", annotator="ann")


@pytest.fixture
def sm(tmp_path: Path) -> sessionmaker[Session]:
    sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
    with sm.begin() as s:
        runs.ensure_base_version(s, "tiny")
    return sm


# --- the Train setting -------------------------------------------------------------------------


@pytest.fixture
def training(sm: sessionmaker[Session], tmp_path: Path, monkeypatch) -> TrainingService:
    """Two people's pairs, and v1's own labels of three pairs (weight 0.5), one of which a
    person also judged (the other way: the person overrides)."""
    service = TrainingService(
        sm,
        db_url=f"sqlite:///{tmp_path / 'studio.db'}",
        data_dir=tmp_path,
        base_model="tiny",
        model_settings={"model": "tiny", "dtype": "fp32", "device": "cpu"},
    )
    monkeypatch.setattr(service, "_launch", lambda run_id, devices=1: None)
    with sm.begin() as s:
        register = runs.register_adapter_version(s, base_model="tiny", adapter_path="/a/v1")
        person_votes(s, register.id, [("P0?", "good p0", "bad p0"), ("P1?", "good p1", "bad p1")])
        labels = [
            SelfLabel(f"Q{i}?", f"good {i}", f"bad {i}", 2.0, "margin", 0.5) for i in range(3)
        ]
        add_self_labels(s, "v1", labels)
        ids = dict(
            s.execute(
                select(Response.text, Response.id).join(Prompt).where(Prompt.text == "Q0?")
            ).all()
        )  # the person judges the same two answers as v1 did, the other way: overrides it
        bad, good = ids["bad 0"], ids["good 0"]
        repo.record_preference(
            s, response_a_id=bad, response_b_id=good, choice="a", annotator="ann"
        )
    return service


def trained_pairs(service: TrainingService, sm, tmp_path: Path, monkeypatch, choice: str):
    """The pairs the worker hands to training for a run with `self_labels=choice`."""
    read = worker_read(service, sm, TrainRequest(self_labels=choice), tmp_path, monkeypatch)
    with sm.begin() as s:
        runs.cancel_run(s, read.run_id)
    return sorted((p["prompt"], p["chosen"], p.get("weight")) for p in read.pairs)


def test_the_train_setting_trains_with_the_self_labels_weights(training, sm, tmp_path, monkeypatch):
    on = trained_pairs(training, sm, tmp_path, monkeypatch, "4x")
    assert on == [
        ("P0?", "good p0", None),
        ("P1?", "good p1", None),
        ("Q0?", "bad 0", None),  # the person's vote, not v1's
        ("Q1?", "good 1", 0.5),
        ("Q2?", "good 2", 0.5),
    ]


def test_off_trains_without_the_self_labels(training, sm, tmp_path, monkeypatch):
    off = trained_pairs(training, sm, tmp_path, monkeypatch, "off")
    assert [p[0] for p in off] == ["P0?", "P1?", "Q0?"]


def test_the_count_line_says_how_many_self_labels_the_run_adds_and_how_many_were_overridden(
    training,
):
    text = summary_markdown(training.summary(VoteSelection(include_self=True)))
    assert "**5** usable preference pairs" in text
    assert "**2** of them are the model's own labels (1 more was overridden by people's" in text
    assert "model's own labels" not in summary_markdown(training.summary())


def test_an_unknown_self_label_choice_is_refused_with_the_choices(training):
    result = training.start(TrainRequest(self_labels="3x"))
    assert not result.ok
    assert "add the model's own labels must be one of off, 2x, 4x, 8x" in result.message


# --- the self-labeling job ---------------------------------------------------------------------


@pytest.fixture
def served(sm, tiny_lm, tiny_model_dir, tmp_path):
    """v1 (a random adapter) registered and served; the setting at 2x."""
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "v1", seed=1)
    with sm.begin() as s:
        v1 = runs.register_adapter_version(s, base_model="tiny", adapter_path=str(adapter))
        set_self_label_multiplier(s, 2)
        v1_id = v1.id
    versions = VersionedModel(tiny_lm)
    versions.activate("v1", str(adapter))
    return SimpleNamespace(versions=versions, v1=v1_id)


def self_votes(sm) -> list[Preference]:
    with sm.begin() as s:
        query = select(Preference).where(Preference.annotator == "self:v1")
        return list(s.scalars(query))


def test_too_few_peoples_labels_of_the_versions_own_answers_store_nothing_and_say_why(sm, served):
    with sm.begin() as s:
        person_votes(s, served.v1, [(f"C{i}?", f"one {i}", f"two {i}") for i in range(3)])
        repo.add_prompts(s, ["Unlabeled one", "Unlabeled two"], source="t")
    job = SelfLabelJob(sm, served.versions, "tiny", scorer="margin", settings=SHORT)
    job.version_activated("base")  # the base has no labels of its own: nothing starts
    assert job.progress().state == "idle"
    job.version_activated("v1")  # a version became active with the setting on: it starts
    done = job.wait()
    assert done.state == "declined" and self_votes(sm) == []
    assert done.text() == (
        "Self-labels for v1: no self-labels: only 3 people's labels of this version's own "
        "answers; at least 8 are needed to trust its labels."
    )


def agreeing_calibration(sm, served, agree: bool = True) -> None:
    """Ten people's votes on pairs of v1's own answers, each for the answer v1's margin
    prefers: the scorer agrees with people on all of them (`agree=False`: on none)."""
    texts = [(f"Calibrate {i}?", f"Short {i}.", f"A longer answer number {i}!") for i in range(9)]
    texts.append(("Calibrate nine?", "ok", "ok."))  # a small margin: a low threshold
    pairs = [scoring.AnswerPair(*t) for t in texts]
    signed = scoring.margins(scoring.log_ratios(served.versions.lm, pairs), "margin").tolist()
    votes = [
        (p.prompt, p.first, p.second) if (m > 0) == agree else (p.prompt, p.second, p.first)
        for p, m in zip(pairs, signed, strict=True)
    ]
    with sm.begin() as s:
        person_votes(s, served.v1, votes)


def test_an_answer_that_ended_at_once_is_no_label_and_no_failure(sm, served, monkeypatch):
    # a model may end an answer at its first token: no text, nothing to prefer (seen in CI)
    agreeing_calibration(sm, served)
    with sm.begin() as s:
        repo.add_prompts(s, [f"Unlabeled {i}" for i in range(3)], source="t")
    monkeypatch.setattr(
        SelfLabelJob, "_answer", lambda self, prompt, version: scoring.AnswerPair(prompt, "", "Hi")
    )
    job = SelfLabelJob(sm, served.versions, "tiny", scorer="margin", settings=SHORT)
    job.start()
    done = job.wait()
    assert done.state == "done", done.text()
    assert (done.answered, done.kept) == (3, 0) and self_votes(sm) == []


def test_with_enough_agreeing_labels_it_stores_self_votes_above_the_threshold(sm, served):
    agreeing_calibration(sm, served)
    with sm.begin() as s:
        repo.add_prompts(s, [f"Unlabeled {i}" for i in range(6)], source="t")
    job = SelfLabelJob(sm, served.versions, "tiny", scorer="margin", settings=SHORT)
    job.start()
    done = job.wait()
    assert done.state == "done", done.text()
    assert done.target == done.answered == 6  # 2 x 10 labels, but six prompts are unlabeled
    stored = self_votes(sm)
    assert len(stored) == done.kept >= 1
    assert all(v.scorer == "margin" and v.weight == 1.0 for v in stored)
    assert all(v.margin >= done.threshold for v in stored)
    assert done.text().startswith(f"Self-labels: 6 of 6 pairs answered, {done.kept} kept above")
    with sm.begin() as s:  # the model's votes are not people's
        people = s.scalar(select(func.count()).where(Preference.annotator == "ann"))
        assert people == 10
    assert job.start()
    again = job.wait()
    if done.kept == 6:  # every prompt labeled: nothing left to add, and it says so
        assert "none added: " in again.text()
    else:  # a pair below the threshold (or with an empty answer) leaves its prompt unlabeled
        assert again.target == 6 - done.kept, again.text()


def test_no_margin_where_people_agree_stores_nothing_and_says_why(sm, served):
    agreeing_calibration(sm, served, agree=False)
    with sm.begin() as s:
        repo.add_prompts(s, ["Unlabeled"], source="t")
    job = SelfLabelJob(sm, served.versions, "tiny", scorer="margin", settings=SHORT)
    job.start()
    done = job.wait()
    assert done.state == "declined" and self_votes(sm) == []
    assert "no margin where it agrees with people 90% of the time" in done.text()
    assert "(overall 0% of 10): no self-labels" in done.text()


def test_the_label_tab_stays_responsive_while_the_job_runs(sm, served):
    agreeing_calibration(sm, served)
    with sm.begin() as s:
        repo.add_prompts(s, [f"Unlabeled {i}" for i in range(4)], source="t")
    job = SelfLabelJob(sm, served.versions, "tiny", scorer="margin", settings=SHORT)
    reached, release = threading.Event(), threading.Event()
    answer = job._answer

    def gated(prompt: str, version: str) -> scoring.AnswerPair:
        pair = answer(prompt, version)
        reached.set()
        release.wait()  # the job is mid-run until the labeler has their pair
        return pair

    job._answer = gated  # type: ignore[method-assign]
    job.start()
    reached.wait()
    label = LabelService(sm, ModelService(served.versions), "tiny", settings=SHORT, prefetch=False)
    pair = list(label.generate_pair("bob"))[-1]
    assert pair.done and len(pair.answers) == 2
    assert job.progress().running  # the labeler was served while the job ran
    release.set()
    assert job.wait().state == "done"


# --- "Check the model's labels" ------------------------------------------------------------------


def test_a_persons_vote_on_a_checked_self_label_overrides_it(sm, served):
    with sm.begin() as s:
        add_self_labels(s, "v1", [SelfLabel("Q?", "good", "bad", 2.0, "margin", 0.5)])
    label = LabelService(sm, ModelService(served.versions), "tiny", settings=SHORT, prefetch=False)
    [pair] = list(label.generate("cat", 2, check=True))
    assert pair.done and pair.checking == "v1" and pair.prompt == "Q?"
    texts = [a.text for a in pair.answers]
    bad = texts.index("bad")
    label.vote("cat", pair.answers[0].response_id, pair.answers[1].response_id, "ab"[bad])
    with sm.begin() as s:
        pairs = repo.preference_pairs(s, selection=VoteSelection(include_self=True))
        assert [(p.chosen, p.annotator) for p in pairs.pairs] == [("bad", "cat")]
        assert pairs.overridden == 1
        [agreement] = self_label_agreement(s)
        assert (agreement.judged, agreement.agreed) == (1, 0)
    with pytest.raises(ValueError, match="No labels of the model's to check"):
        list(label.generate("dan", 2, check=True))
    assert "No labels" in NO_SELF_LABELS


def test_a_models_annotator_notes_no_skips_and_gets_no_prefetch(sm, served):
    """A `self:` annotator is a model, not a person (was: only `judge:` names were)."""
    with sm.begin() as s:
        repo.add_prompts(s, ["First", "Second", "Third"], source="t")
        skipped = repo.add_prompt(s, "First").id
    label = LabelService(sm, ModelService(served.versions), "tiny", settings=SHORT)
    list(label.generate_pair("self:v1", skipped=[skipped]))
    with sm.begin() as s:
        assert s.scalar(select(func.count()).select_from(LabelEvent)) == 0
    assert label._prefetched == {}


# --- the Train tab's controls ------------------------------------------------------------------


def test_the_train_tab_stores_the_setting_and_says_why_the_base_cannot_label(training, sm):
    import gradio as gr

    from app.train.tab import TrainHandlers, layout

    job = SelfLabelJob(sm, SimpleNamespace(active="base"), "tiny")  # type: ignore[arg-type]
    with gr.Blocks():
        tab = layout(training, job)
    assert tab.settings["self_labels"].value == "off"  # the default: no experiment says more
    h = TrainHandlers(training, tab, job)
    assert h.choose_self_labels("4x", None)[tab.message] == "Add the model's own labels: **4x**."
    assert job.choice() == "4x"
    with gr.Blocks():
        assert layout(training, job).settings["self_labels"].value == "4x"  # the team's setting
    said = h.label_now(None)[tab.message]
    assert said == "The base model has no labels of its own: train a version first."
    shown = h.self_labels({})  # a page's first poll: the line, and the team's setting
    assert shown[tab.self_label_status] == "Self-labels: none made by this app yet."
    assert shown[tab.settings["self_labels"]].value == "4x"
    assert h.self_labels({"self_labels": "Self-labels: none made by this app yet."}) == {}
    with pytest.raises(gr.Error, match="must be one of off, 2x, 4x, 8x"):
        h.choose_self_labels("3x", None)
    h.choose_self_labels("off", None)
    assert "is off: choose 2x, 4x, 8x first" in job.start("v1")


def test_a_version_whose_adapter_is_gone_fails_the_job_with_a_message(sm, tiny_lm, tmp_path):
    with sm.begin() as s:
        runs.register_adapter_version(s, base_model="tiny", adapter_path=str(tmp_path / "gone"))
        set_self_label_multiplier(s, 4)
    job = SelfLabelJob(sm, VersionedModel(tiny_lm), "tiny", settings=SHORT)
    job.start("v1")
    done = job.wait()
    assert done.state == "failed" and self_votes(sm) == []
    assert done.text().startswith("Self-labels for v1: failed: version v1: its adapter directory")
    assert "is missing or incomplete" in done.text()


def test_the_job_refuses_an_unknown_scorer_naming_the_scorers(sm, served):
    with pytest.raises(ValueError, match="margin, per-token, centered, reward-model"):
        SelfLabelJob(sm, served.versions, "tiny", scorer="judge")


# --- the reward-model scorer (the default) -------------------------------------------------------


def base_pairs(sm, n: int) -> list[scoring.AnswerPair]:
    """People's votes on `n` pairs of the base's answers (the pairs v1 was trained on): the
    short answer chosen. The reward model is fitted on them."""
    pairs = [
        scoring.AnswerPair(f"Fit {i}?", f"Brief {i}.", f"A long, long answer {i}!")
        for i in range(n)
    ]
    with sm.begin() as s:
        base = runs.list_versions(s, "tiny")[0]
        person_votes(s, base.id, [(p.prompt, p.first, p.second) for p in pairs])
    return pairs


def test_the_reward_model_needs_peoples_labels_of_earlier_answers(sm, served):
    base_pairs(sm, 3)
    agreeing_calibration(sm, served)
    with sm.begin() as s:
        repo.add_prompts(s, ["Unlabeled"], source="t")
    job = SelfLabelJob(sm, served.versions, "tiny", settings=SHORT)
    assert job.scorer == "reward-model"  # the default
    job.start()
    done = job.wait()
    assert done.state == "declined" and self_votes(sm) == []
    assert done.text() == (
        "Self-labels for v1: no self-labels: the reward model learns from people's labels of "
        "earlier answers: only 3, at least 8 are needed."
    )


def test_the_reward_model_fitted_on_peoples_pairs_stores_votes_above_its_threshold(sm, served):
    """The job fits the head on the base's pairs (not on v1's own answers, its evidence) and
    calibrates it on people's votes on v1's own answers, here each for the answer the same
    head prefers: it agrees with people on all of them and labels the unlabeled prompts."""
    fit = base_pairs(sm, 10)
    head = scoring.fit_reward_model(served.versions.lm, fit)
    assert head.fit_pairs == 10
    texts = [(f"Own {i}?", f"Terse {i}.", f"Quite a lot longer, answer {i}!") for i in range(10)]
    own = [scoring.AnswerPair(*t) for t in texts]
    signed = scoring.signed_margins(served.versions.lm, own, scoring.REWARD_MODEL, head)
    with sm.begin() as s:
        votes = [
            (p.prompt, *((p.first, p.second) if m > 0 else (p.second, p.first)))
            for p, m in zip(own, signed.tolist(), strict=True)
        ]
        person_votes(s, served.v1, votes)
        repo.add_prompts(s, [f"Unlabeled {i}" for i in range(4)], source="t")
    job = SelfLabelJob(sm, served.versions, "tiny", settings=SHORT)
    job.start()
    done = job.wait()
    assert done.state == "done", done.text()
    assert done.answered == 4 and done.threshold is not None
    stored = self_votes(sm)
    assert len(stored) == done.kept
    assert all(v.scorer == "reward-model" and v.margin >= done.threshold for v in stored)
    assert f"kept above reward-model margin {done.threshold:.3g}" in done.text()
    assert served.versions.lm.model.active_adapter == "v1"  # the adapter is back after scoring
