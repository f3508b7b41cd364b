"""A guard on every Train run, and SFT on rewrites, as the app runs them: a run on a few pairs
reads KL on the queue prompts never labeled, the rewrites train an SFT stage whose curve the
Train tab draws. The worker runs in process on a real SQLite store and the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.train import worker
from app.train.pairs import stored_pairs
from app.train.run_inputs import kl_readout_prompts, sft_examples, unlabeled_prompts
from app.train.service import TrainingService, TrainRequest
from app.train.tab import PLOTS, metric_frames
from storage import repo, runs
from storage.db import open_db
from storage.selection import VoteSelection

SMALL = {"epochs": 1, "lora_r": 4, "max_length": 64, "heldout_fraction": 0.0}


@pytest.fixture
def sm(tmp_path: Path):
    return open_db(f"sqlite:///{tmp_path / 'studio.db'}")


@pytest.fixture
def service(sm, tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> TrainingService:
    model = {"model": str(tiny_model_dir), "dtype": "fp32", "device": "cpu"}
    svc = TrainingService(
        sm, db_url="sqlite://", data_dir=tmp_path, base_model="tiny", model_settings=model
    )
    monkeypatch.setattr(svc, "_launch", lambda run_id, devices=1: None)  # run in process
    return svc


def vote(sm, prompt: str, choice: str = "a", rewrite: str | None = None, **kw) -> None:
    with sm.begin() as s:
        prompt_id = repo.add_prompt(s, prompt, split=kw.get("split", "train")).id
        a, b = (
            repo.record_response(s, prompt_id=prompt_id, model_version_id=None, text=text)
            for text in (f"A kind answer to {prompt}", "No.")
        )
        repo.record_preference(s, response_a_id=a.id, response_b_id=b.id, choice=choice,
                               annotator=kw.get("annotator", "ann"), rewrite=rewrite)  # fmt: skip


def add_prompts(sm, *texts: str, split: str = "train") -> None:
    with sm.begin() as s:
        for text in texts:
            repo.add_prompt(s, text, split=split)


def run_in_process(service: TrainingService, sm, tmp_path: Path, **settings) -> dict:
    """Start a run from the service, execute its worker here; its metrics and stop reason."""
    started = service.start(TrainRequest(**(SMALL | settings)))
    assert started.ok, started.message
    assert worker.run_job(sm, started.run_id, tmp_path) == 0  # the worker's own entry
    with sm.begin() as s:
        config = runs.get_run(s, started.run_id).config
    status = service.status(started.run_id)
    assert status.status == "succeeded", status.error
    saved = json.loads((tmp_path / "adapters" / status.version / "metrics.json").read_text())
    return {"status": status, "config": config, "stop_reason": saved["stop_reason"]}


def test_a_run_on_a_few_pairs_reads_kl_on_the_queue_prompts_never_labeled(service, sm, tmp_path):
    for topic in ("cats", "rain", "tea", "maps", "jazz"):
        vote(sm, f"Tell me about {topic}.")
    add_prompts(sm, "Sing about the sea.", "Name a river.")  # in the queue, never labeled
    add_prompts(sm, "What is a kite?", split="heldout")
    with sm.begin() as s:
        pairs = stored_pairs(s, 0.0, 8)
        assert pairs.heldout == [] and unlabeled_prompts(s) == [
            "Sing about the sea.",
            "Name a river.",
        ]
        assert kl_readout_prompts(s, pairs, 8) == [
            "What is a kite?",
            "Sing about the sea.",
            "Name a river.",
        ]
        assert kl_readout_prompts(s, pairs, 0) == ["What is a kite?"]  # enough held out
    ran = run_in_process(service, sm, tmp_path)
    kl = [m["eval/kl"] for m in ran["status"].metrics if m.get("eval/kl") is not None]
    assert len(kl) == 1 and kl[0] >= 0  # the one evaluation point: the end of the epoch
    assert "KL-only guard (0 held-out pairs" in ran["stop_reason"]
    assert "KL on 3 prompts not trained on" in ran["stop_reason"]
    assert ran["stop_reason"] in ran["status"].message


def test_with_no_prompt_to_read_kl_on_the_stop_reason_says_what_to_do(service, sm, tmp_path):
    for topic in ("cats", "rain", "tea"):
        vote(sm, f"Tell me about {topic}.")
    ran = run_in_process(service, sm, tmp_path)
    assert not any("eval/kl" in m for m in ran["status"].metrics)
    assert (
        "no prompts to read KL on: import a few prompts that are not labeled"
        in (ran["stop_reason"])
    )


def test_a_run_past_its_kl_ceiling_is_saved_but_not_made_active(sm, tmp_path, tiny_model_dir):
    model = {"model": str(tiny_model_dir), "dtype": "fp32", "device": "cpu"}
    svc = TrainingService(
        sm,
        db_url="sqlite://",
        data_dir=tmp_path,
        base_model="tiny",
        model_settings=model | {"kl_ceiling": 1e-9},  # every reading is above it
    )
    svc._launch = lambda run_id, devices=1: None  # run in process
    for topic in ("cats", "rain", "tea", "maps", "jazz"):
        vote(sm, f"Tell me about {topic}.")
    add_prompts(sm, "Sing about the sea.", "Name a river.")  # the KL readout's prompts
    ran = run_in_process(svc, sm, tmp_path, learning_rate=5e-2)
    kl = [m["eval/kl"] for m in ran["status"].metrics if m.get("eval/kl") is not None]
    assert kl and min(kl) > 1e-9
    saved = json.loads((tmp_path / "adapters" / "v1" / "metrics.json").read_text())
    assert saved["within_kl_ceiling"] is False
    assert "Every evaluation was above the KL ceiling" in ran["stop_reason"]
    assert "not made active" in ran["stop_reason"]
    with sm.begin() as s:
        assert [v.name for v in runs.list_versions(s, "tiny") if v.is_active] == ["base"]
    svc.close()


def test_the_sft_examples_are_the_rewrites_the_run_trains_on(sm):
    vote(sm, "Tell me about cats.", "a", rewrite="Cats purr.")
    vote(sm, "Tell me about rain.", "tie", rewrite="Rain is water falling.")
    vote(sm, "Tell me about tea.", "b")
    vote(sm, "Tell me about jazz.", "a", rewrite="Jazz swings.", annotator="bob")
    vote(sm, "Tell me about maps.", "a", rewrite="Maps show places.", split="heldout")
    with sm.begin() as s:
        pairs = stored_pairs(s, 0.0, 8, VoteSelection(leave_out=("bob",)))
        got = sft_examples(s, pairs, rewrites=True)
        assert got == [
            {"prompt": "Tell me about cats.", "completion": "Cats purr."},
            {"prompt": "Tell me about rain.", "completion": "Rain is water falling."},
        ]  # not bob's (left out), not the held-out prompt's
        with_chosen = sft_examples(s, pairs, rewrites=True, chosen=True)
        assert with_chosen[:2] == got and len(with_chosen) == 3
        assert with_chosen[2] == {"prompt": "Tell me about tea.", "completion": "No."}
        assert sft_examples(s, pairs) == []


def test_sft_on_rewrites_without_a_rewrite_is_refused_before_any_run(service, sm):
    vote(sm, "Tell me about tea.")
    result = service.start(TrainRequest(sft_on_rewrites=True))
    assert not result.ok
    assert "no training pair has a rewrite yet: write a better answer in the Label tab" in (
        result.message
    )
    with sm.begin() as s:
        assert runs.list_runs(s) == []


def test_a_run_with_sft_on_rewrites_draws_the_sft_curve_before_dpo(service, sm, tmp_path):
    for topic in ("cats", "rain", "tea", "maps", "jazz"):
        vote(sm, f"Tell me about {topic}.", rewrite=f"{topic.title()} are a fine topic.")
    ran = run_in_process(service, sm, tmp_path, sft_on_rewrites=True)
    assert ran["config"]["sft"] == {"rewrites": True, "chosen": False}
    assert ran["config"]["train"]["sft_epochs"] == 1  # as many as DPO's epochs
    metrics = ran["status"].metrics
    sft_steps = [m["step"] for m in metrics if m.get("sft/loss") is not None]
    dpo_steps = [m["step"] for m in metrics if m.get("loss") is not None]
    assert sft_steps == [1, 2] and dpo_steps == [3, 4]  # 5 rewrites, 4 per step; then 5 pairs
    assert ran["status"].total_steps == 4
    curves = metric_frames(metrics)["Loss"]
    assert "sft/loss" in PLOTS["Loss"]
    drawn = curves.dropna()
    assert sorted(drawn[drawn.metric == "sft/loss"].step) == [1, 2]
    assert sorted(drawn[drawn.metric == "loss"].step) == [3, 4]
