"""Labeling as a team (in process, tiny model, real SQLite): pairs others judged come back to
k people with the sides drawn afresh, and an AI judge's suggestion is shown and stored with the
vote, whichever way the person votes."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from app.label.service import LabelService
from app.label.texts import suggestion_text
from app.serving.service import ModelService
from app.serving.versions import VersionedModel
from dpo_core.judge import Suggestion
from storage import repo, runs
from storage.agreement import judge_followed
from storage.db import open_db
from storage.models import Preference
from storage.overlap import set_overlap_k


@dataclass
class PrefersLonger:
    """A judge with a simple, known taste (the point here is the labeling flow, not taste)."""

    name: str = "longer"

    def suggest(self, prompt: str, answer_a: str, answer_b: str) -> Suggestion:
        choice = "a" if len(answer_a) >= len(answer_b) else "b"
        return Suggestion(choice, "the longer answer", self.name)


@pytest.fixture
def label(tiny_lm, tmp_path: Path):
    def make(judge=None) -> LabelService:
        sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
        with sm.begin() as s:
            runs.ensure_base_version(s, "tiny")
            repo.add_prompts(s, ["First prompt", "Second prompt", "Third prompt"], source="t")
        models = ModelService(VersionedModel(tiny_lm))
        return LabelService(sm, models, "tiny", prefetch=False, judge=judge, rng=random.Random(3))

    return make


def ids(pair) -> tuple[int, int]:
    return pair.answers[0].response_id, pair.answers[1].response_id


def test_a_judged_pair_goes_to_the_next_annotators_until_k_votes(label):
    service = label()
    with service.sm.begin() as s:
        set_overlap_k(s, 3)
    first = list(service.generate_pair("ann"))[-1]
    service.vote("ann", *ids(first), "a")
    shown = {}
    for who in ("bob", "cy"):
        events = list(service.generate_pair(who))
        assert len(events) == 1 and events[0].done and events[0].shared  # no generation
        assert set(ids(events[0])) == set(ids(first))
        shown[who] = events[0]
        service.vote(who, *ids(events[0]), "b")
    fresh = list(service.generate_pair("dee"))[-1]  # three votes: dee gets a new pair
    assert set(ids(fresh)).isdisjoint(ids(first)) and fresh.shared is None
    with service.sm.begin() as s:
        assert len(s.scalars(select(Preference)).all()) == 3


def test_the_suggestion_is_shown_and_stored_with_the_vote_that_overrides_it(label):
    service = label(judge=PrefersLonger())
    events = list(service.generate_pair("ann"))
    pair = events[-1]
    assert events[-2].done and events[-2].suggestion is None  # the pair first, then the judge
    suggestion = pair.suggestion
    assert suggestion is not None and suggestion.choice in ("a", "b")
    assert "longer suggests" in suggestion_text(suggestion)
    against = "b" if suggestion.choice == "a" else "a"
    service.vote("ann", *ids(pair), against)
    with service.sm.begin() as s:
        vote = s.scalars(select(Preference)).one()
        assert vote.suggested_by == "judge:longer"
        [followed] = judge_followed(s)
    assert (followed.shown, followed.followed) == (1, 0)


def test_a_judge_without_a_verdict_leaves_the_pair_labelable(label):
    class Silent:
        name = "silent"

        def suggest(self, prompt: str, a: str, b: str) -> Suggestion:
            return Suggestion(None, "the judge did not answer within 20 s", self.name)

    service = label(judge=Silent())
    pair = list(service.generate_pair("ann"))[-1]
    assert "No suggestion from silent" in suggestion_text(pair.suggestion)
    service.vote("ann", *ids(pair), "a")
    with service.sm.begin() as s:
        assert s.scalars(select(Preference)).one().suggested_choice is None


def test_the_judge_labels_a_batch_apart_from_people(label):
    service = label(judge=PrefersLonger())
    with pytest.raises(ValueError, match="between 1 and 200"):
        service.judge_label(0)
    assert service.judge_label(2) == "judge:longer labeled 2 pair(s); no verdict on 0."
    with service.sm.begin() as s:
        votes = s.scalars(select(Preference)).all()
        assert [v.annotator for v in votes] == ["judge:longer"] * 2
        assert judge_followed(s) == []  # the judge following itself is not "people followed"
        pairs = repo.preference_pairs(s, split="train")
    assert pairs.pairs == []  # judge votes do not train unless chosen


def test_no_judge_no_batch(label):
    with pytest.raises(ValueError, match="No AI judge"):
        label().judge_label(3)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--judge", "embedded", "--judge-url", "http://x/v1"], "choose one judge"),
        (["--judge-url", "http://x/v1"], "--judge-url needs --judge-model"),
    ],
)
def test_judge_flags_that_do_not_go_together_are_refused(flags, message, capsys, tmp_path):
    from app.__main__ import main

    assert main([*flags, "--data-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_skips_and_regenerations_are_counted_per_annotator(label):
    from storage.agreement import agreement_report, label_event_counts, load_judgements

    service = label()
    first = list(service.generate_pair("ann"))[-1]
    again = list(service.generate_pair("ann", prompt_id=first.prompt_id))[-1]  # regenerate
    assert again.prompt_id == first.prompt_id
    second = list(service.generate_pair("ann", skipped=[first.prompt_id]))[-1]  # skip
    list(service.generate_pair("ann", skipped=[first.prompt_id]))  # the same skip, still listed
    service.vote("ann", *ids(second), "a")
    with service.sm.begin() as s:
        events = label_event_counts(s)
        [ann] = agreement_report(load_judgements(s), events=events).annotators
    assert events == {"ann": {"regenerate": 1, "skip": 1}}
    assert (ann.skips, ann.regenerations) == (1, 1)
