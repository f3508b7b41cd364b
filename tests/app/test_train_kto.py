"""The Train tab with the loss type `kto`: the count line says how many KTO votes there are, and
a `kto` run trains on every verdict and vote as KTO rows (app/train/kto.py) instead of pairs.
On a real database (SQLite, and PostgreSQL when DPO_STUDIO_TEST_PG_URL is set); the run itself
on the tiny model, once dpo_core has the `kto` loss."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.train.kto import training_rows
from app.train.service import TrainingService, TrainRequest
from app.train.tab import kto_line, summary_markdown
from dpo_core.losses import LOSS_TYPES
from storage import runs
from storage.repo import add_prompt, record_response
from storage.verdicts import record_verdict
from tests.storage.conftest import db, db_url  # noqa: F401 (fixtures: both back ends)
from tests.storage.test_repo import answers
from tests.storage.test_selection import vote

needs_kto = pytest.mark.skipif(
    "kto" not in LOSS_TYPES, reason="dpo_core has no kto loss yet (issue 18: its other half)"
)
KTO_ROWS = [
    {"prompt": "Name a planet.", "completion": "Mars.", "label": True},
    {"prompt": "Name a planet.", "completion": "A banana.", "label": False},
    {"prompt": "Say hi.", "completion": "Hi!", "label": True},
    {"prompt": "Say hi.", "completion": "Go away.", "label": False},
]


HELDOUT_ROWS = [
    {"prompt": "Name a colour.", "completion": "Blue.", "label": True},
    {"prompt": "Name a colour.", "completion": "Seven.", "label": False},
]


def labeled(s: Session) -> None:
    """A thumbs up and a thumbs down, an A/B vote, a tie: four KTO rows, one DPO pair; and
    a thumbs up and down on a prompt of the `heldout` split: two held-out KTO rows."""
    good, bad = answers(s, "Name a planet.", "Mars.", "A banana.")
    record_verdict(s, response_id=good, verdict="up", annotator="ann")
    record_verdict(s, response_id=bad, verdict="down", annotator="ann")
    vote(s, answers(s, "Say hi.", "Hi!", "Go away."), "a", "bob")
    vote(s, answers(s, "Count.", "1 2 3", "3 2 1"), "tie", "bob")
    heldout = add_prompt(s, "Name a colour.", split="heldout")
    for text, verdict in (("Blue.", "up"), ("Seven.", "down")):
        answer = record_response(s, prompt_id=heldout.id, model_version_id=None, text=text)
        record_verdict(s, response_id=answer.id, verdict=verdict, annotator="ann")


@pytest.fixture
def service(
    db: sessionmaker[Session],  # noqa: F811
    db_url: str,  # noqa: F811
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch,
) -> TrainingService:
    model = str(tiny_model_dir)
    svc = TrainingService(
        db,
        db_url=db_url,
        data_dir=tmp_path,
        base_model=model,
        model_settings={"model": model, "dtype": "fp32", "device": "cpu"},
    )
    monkeypatch.setattr(svc, "_launch", lambda run_id, devices=1: None)  # run in the test
    return svc


def test_the_count_line_says_how_many_kto_votes_there_are(
    service: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
):
    with db.begin() as s:
        labeled(s)
    summary = service.summary()
    assert (summary["kto_rows"], summary["kto_desirable"], summary["usable_pairs"]) == (6, 3, 1)
    text = summary_markdown(summary)
    assert "**6** KTO rows (3 👍, 3 👎: single-answer verdicts, A/B and both-bad votes)" in text
    assert "weighs" not in text  # balanced: nothing to weigh up
    assert "Each 👍 weighs 6.5x in the loss, so both kinds count the same." in kto_line(270, 36)
    assert "Each 👎 weighs 3x in the loss" in kto_line(40, 30)


def test_a_kto_run_reads_kto_rows_and_any_other_loss_reads_pairs(
    db: sessionmaker[Session],  # noqa: F811
):
    with db.begin() as s:
        labeled(s)
        kto = training_rows(s, "kto", 0.0, 1)
        pairs = training_rows(s, "sigmoid", 0.0, 1)
    assert kto.train == KTO_ROWS and kto.heldout == HELDOUT_ROWS and kto.ties == 1
    assert kto.readout_prompts == ["Name a colour."]  # the KL readout's, as for pairs
    assert [p["chosen"] for p in pairs.train + pairs.heldout] == ["Hi!"]


@needs_kto
def test_a_kto_run_trains_on_the_verdict_rows(
    service: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
    tmp_path: Path,
    monkeypatch,
):
    import dpo_core.trainer
    from app.train import worker

    seen: list[tuple[list[dict], list[dict]]] = []
    real_train = dpo_core.trainer.train

    def spy(lm, rows, config, out_dir, **options):
        seen.append((list(rows), options["heldout"]))
        return real_train(lm, rows, config, out_dir, **options)

    monkeypatch.setattr(dpo_core.trainer, "train", spy)
    with db.begin() as s:
        labeled(s)
    result = service.start(TrainRequest(loss_type="kto", epochs=1, batch_size=2))
    started = f"Run #{result.run_id} started on 4 KTO rows (2 held out)."
    assert result.ok and result.message == started
    with db.begin() as s:
        config = dict(runs.start_run(s, result.run_id).config)
    outcome = worker.train_and_register(db, result.run_id, config, tmp_path)
    assert outcome.startswith("succeeded: v1"), outcome
    assert seen == [(KTO_ROWS, HELDOUT_ROWS)]
    with db.begin() as s:
        run = runs.get_run(s, result.run_id)
        assert (run.status, run.num_pairs) == ("succeeded", 6)
        metrics = runs.run_metrics(s, run.id)
    assert metrics["loss"] and metrics["eval/loss"]  # evaluated on the held-out rows


@needs_kto
def test_a_kto_run_without_kto_votes_is_refused(
    service: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
):
    with db.begin() as s:
        vote(s, answers(s, "Count.", "1 2 3", "3 2 1"), "tie", "bob")
    result = service.start(TrainRequest(loss_type="kto"))
    assert not result.ok
    assert result.message.startswith("No KTO votes yet (1 ties give none). In the Label tab")
    with db.begin() as s:
        assert runs.list_runs(s) == []


@needs_kto
def test_a_kto_run_on_its_parents_answers_only_is_refused_when_none_are(
    service: TrainingService,
    db: sessionmaker[Session],  # noqa: F811
):
    """Train on parent applies to KTO rows: a verdict on an imported answer is on no
    version's answers, so a run continuing from the base on the base's answers has none."""
    with db.begin() as s:
        prompt = add_prompt(s, "Name a planet.")
        answer = record_response(s, prompt_id=prompt.id, model_version_id=None, text="Mars.")
        record_verdict(s, response_id=answer.id, verdict="up", annotator="ann")
    result = service.start(TrainRequest(loss_type="kto", train_on="parent"))
    assert not result.ok
    assert result.message.startswith("No KTO votes on base's answers yet")
    assert service.start(TrainRequest(loss_type="kto", train_on="all")).ok
