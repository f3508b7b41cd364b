"""A guard on every run: with too few held-out pairs the KL readout runs on prompts nobody
trains on, and a KL-only guard keeps the latest checkpoint within the ceiling; on the tiny
model (the sharp one, whose answers move far enough for the KL to matter)."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel

from dpo_core import trainer
from dpo_core.guard import EvalPoint, KLGuard
from dpo_core.kl import prompt_ids
from tests.dpo_core.test_kl_guard import (  # noqa: F401 (fixtures)
    PAIRS,
    sharp_lm,
    sharp_model_dir,
    small_config,
)

UNLABELED = ["Sing about the sea.", "Name a river.", "What is a kite?"]


def test_the_kl_only_guard_keeps_the_last_point_within_the_ceiling():
    guard = KLGuard(kl_ceiling=5.0, patience=2)
    assert guard.observe(EvalPoint(1, accuracy=None, loss=None, kl=1.0)).keep
    assert guard.observe(EvalPoint(2, accuracy=None, loss=None, kl=4.0)).keep  # further, kept
    over = guard.observe(EvalPoint(3, accuracy=None, loss=None, kl=6.0))
    assert not over.keep and over.stop is None  # once above: maybe noise, go on
    back = guard.observe(EvalPoint(4, accuracy=None, loss=None, kl=4.5))
    assert back.keep and guard.best.step == 4  # back within: the count starts again
    assert guard.observe(EvalPoint(5, accuracy=None, loss=None, kl=7.0)).stop is None
    stop = guard.observe(EvalPoint(6, accuracy=None, loss=None, kl=9.0)).stop
    assert "drifted too far from the base model at step 6" in stop
    assert "above the ceiling 2 evaluations in a row" in stop
    assert guard.best.step == 4


def test_a_run_on_few_pairs_reads_kl_on_the_prompts_given_and_runs_the_kl_only_guard(
    sharp_lm,  # noqa: F811
    tmp_path,
):
    steps: list[dict] = []
    config = small_config(epochs=2, learning_rate=1e-3, kl_prompts=3)  # none held out of 11
    result = trainer.train(
        sharp_lm, PAIRS, config, tmp_path / "v1", kl_prompts=UNLABELED, on_step=steps.append
    )
    evals = [s for s in steps if "eval/kl" in s]
    assert [s["step"] for s in evals] == [3, 6]  # every evaluation point: each epoch's end
    assert all("eval/loss" not in s for s in steps)  # no held-out pairs: KL only
    assert result.metrics["num_pairs"] == len(PAIRS)  # nothing was held out of training
    assert evals[-1]["eval/kl"] > 0 and result.metrics["eval/kl"] == evals[-1]["eval/kl"]
    assert "KL-only guard (0 held-out pairs, fewer than the 8" in result.stop_reason
    assert "KL on 3 prompts not trained on, ceiling 8 nats" in result.stop_reason
    assert "Kept the final weights (KL " in result.stop_reason
    saved = json.loads((result.adapter_dir / "metrics.json").read_text())
    assert saved["stop_reason"] == result.stop_reason


def test_a_tiny_kl_ceiling_stops_the_run_and_keeps_the_last_checkpoint_within_it(
    sharp_lm,  # noqa: F811
    tmp_path,
):
    # measured without a guard: eval/kl 0.7, 2.6, 4.2, 6.8, 9.3, ... at steps 1, 2, 3, 4, 5, ...
    config = small_config(epochs=4, eval_every=1, learning_rate=2e-3, kl_ceiling=3.0,
                          patience=2, kl_prompts=3)  # fmt: skip
    steps: list[dict] = []
    result = trainer.train(
        sharp_lm, PAIRS, config, tmp_path / "v1", kl_prompts=UNLABELED, on_step=steps.append
    )
    total = steps[0]["total_steps"]
    within = [s["step"] for s in steps if s["eval/kl"] <= 3.0]
    assert result.stopped_early and len(steps) < total
    assert steps[-1]["eval/kl"] > 3.0 and steps[-2]["eval/kl"] > 3.0  # over twice in a row
    assert within and result.metrics["kept_step"] == within[-1] < len(steps)
    assert result.stop_reason.startswith(f"Stopped early at step {len(steps)} of {total}")
    assert f"Kept the checkpoint from step {within[-1]}, the last within the KL" in (
        result.stop_reason
    )
    assert "KL-only guard" in result.stop_reason
    # the saved adapter is that checkpoint: its KL readout is the one measured there
    model = PeftModel.from_pretrained(sharp_lm.model, str(result.adapter_dir))
    readout = [prompt_ids(sharp_lm.tokenizer, p) for p in UNLABELED]
    dataset = trainer.Dataset(pairs=[], costs=[], readout_prompts=readout)
    again = trainer.kl_readout(model, dataset, sharp_lm, result.config)
    assert again["eval/kl"] == pytest.approx(result.metrics["eval/kl"], rel=1e-3, abs=1e-4)


def test_no_prompts_to_read_kl_on_is_said_in_the_stop_reason(tiny_lm, tmp_path):
    result = trainer.train(tiny_lm, PAIRS[:4], small_config(epochs=1), tmp_path / "v1")
    assert "No early stopping: 0 held-out pairs" in result.stop_reason
    assert "no prompts to read KL on: import a few prompts that are not labeled" in (
        result.stop_reason
    )
    assert not any("eval/kl" in h for h in result.history)


def test_readout_prompts_that_training_pairs_use_are_left_out(tiny_lm, tmp_path):
    trained = PAIRS[0]["prompt"]
    assert trainer.untrained_prompts([trained, "New one.", "New one."], PAIRS) == ["New one."]
    config = small_config(epochs=1)
    _, eval_set = trainer.prepare_datasets(tiny_lm, PAIRS[:4], [], [trained], config)
    assert eval_set is None  # every prompt given is trained on: nothing to read KL on
    _, eval_set = trainer.prepare_datasets(tiny_lm, PAIRS[:4], [], UNLABELED, config)
    assert eval_set is not None and eval_set.pairs == [] and len(eval_set.readout_prompts) == 3


@pytest.mark.parametrize(
    ("overrides", "heldout", "prompts", "expected"),
    [
        ({}, 8, [], "Guard: held-out reward accuracy on 8 pairs and KL on the held-out pairs'"),
        ({}, 3, [], "KL-only guard (3 held-out pairs, fewer than the 8 the accuracy guard"),
        ({}, 0, UNLABELED, "KL on 3 prompts not trained on"),
        ({}, 0, [], "no prompts to read KL on: import a few prompts that are not labeled"),
        ({"kl_prompts": 0}, 3, UNLABELED, "the KL readout is off (kl_prompts = 0)"),
        ({"early_stopping": False}, 8, [], "early_stopping is off"),
    ],
)
def test_which_guard_runs(tiny_lm, overrides, heldout, prompts, expected):
    config = small_config(**overrides)
    pairs = [dict(p, prompt=f"Held-out question {i}?") for i, p in enumerate(PAIRS[:heldout])]
    _, eval_set = trainer.prepare_datasets(tiny_lm, PAIRS[8:], pairs, prompts, config)
    guard, why_off = trainer.make_guard(eval_set, config)
    assert expected in (guard.reads if guard is not None else why_off)
