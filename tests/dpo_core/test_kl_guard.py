"""KL(policy || base) readout and the over-optimisation guard, on the tiny model; the defaults
in code are the ones docs/defaults.md recommends."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from dpo_core import kl, trainer
from dpo_core.config import TrainConfig
from dpo_core.guard import (
    ACCURACY_TOLERANCE,
    MIN_PAIRS_FOR_VISIBLE_CHANGE,
    EvalPoint,
    Guard,
    KLGuard,
    few_pairs_warning,
    summary,
)
from dpo_core.modeling import attach_lora, load_model
from dpo_core.reward_eval import implicit_reward_accuracy
from tests.tiny import build_tiny_model, build_tiny_tokenizer

DOC = Path(__file__).resolve().parents[2] / "docs" / "defaults.md"
WORDS = ("cats", "rain", "tea", "maps", "jazz", "salt", "bees", "snow", "moss", "figs", "owls")
PAIRS = [
    {"prompt": f"Tell me about {w}.", "chosen": f"Gladly! {w} are lovely.", "rejected": "No."}
    for w in WORDS
]
PROMPTS = [p["prompt"] for p in PAIRS]


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its output layer scaled up. The plain tiny model's logits are so
    flat that no LoRA update can move its answers far; these span a trained model's range."""
    path = tmp_path_factory.mktemp("sharp-llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def sharp_lm(sharp_model_dir: Path):
    return load_model(str(sharp_model_dir), dtype="fp32", device="cpu")


def small_config(**overrides) -> TrainConfig:
    values = dict(
        epochs=3, batch_size=4, learning_rate=5e-3, max_length=96, lora_r=4, lora_alpha=8,
        warmup_ratio=0.0, kl_max_new_tokens=24,
    )  # fmt: skip
    return TrainConfig(**(values | overrides))


def _perturb_lora(model: PeftModel, scale: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


# --- the KL estimate --------------------------------------------------------------------------


def test_kl_is_zero_when_the_policy_is_the_base(tiny_lm):
    model = attach_lora(tiny_lm.model)  # LoRA B starts at zero: policy == base
    estimate = kl.estimate_kl(tiny_lm, model, PROMPTS, max_new_tokens=24, seed=3)
    assert estimate.n == len(PROMPTS) and estimate.mean_tokens > 0
    assert abs(estimate.kl) <= 3 * estimate.stderr + 1e-4
    assert max(abs(d) for d in estimate.per_answer) < 1e-4


def test_sampling_keeps_the_exact_tokens_and_leaves_the_rng_alone(tiny_lm):
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    completions = kl.sample_completions(tiny_lm, tiny_lm.model, PROMPTS[:4], max_new_tokens=12)
    assert torch.equal(torch.rand(1), expected_next)  # the global RNG was not consumed
    again = kl.sample_completions(tiny_lm, tiny_lm.model, PROMPTS[:4], max_new_tokens=12)
    assert [c.answer_ids for c in again] == [c.answer_ids for c in completions]  # seeded
    for c in completions:
        assert c.prompt in PROMPTS
        assert list(c.prompt_ids) == kl.prompt_ids(tiny_lm.tokenizer, c.prompt)
        assert 1 <= len(c.answer_ids) <= 12
        assert c.finished == (c.answer_ids[-1] == tiny_lm.tokenizer.eos_token_id)
    # scored log-probs equal a plain log_softmax over the full sequence
    c = completions[0]
    ids = torch.tensor([c.prompt_ids + c.answer_ids])
    with torch.no_grad():
        logits = tiny_lm.model(ids).logits[0, len(c.prompt_ids) - 1 : -1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.answer_ids)[:, None]).sum()
    got = kl.answer_logps(tiny_lm, tiny_lm.model, completions)[0]
    assert got.item() == pytest.approx(expected.item(), abs=1e-4)


def _exact_stepwise_kl(lm, model, completions) -> list[float]:
    """Per answer, the sum over its positions of the exact KL between the next-token
    distributions of policy and base, from the model's full logits."""
    batch = kl.answer_batch(completions, lm.tokenizer.pad_token_id)
    model.eval()  # no LoRA dropout
    with torch.no_grad():
        policy = torch.log_softmax(model(input_ids=batch.input_ids).logits.float(), -1)
        with model.disable_adapter():
            base = torch.log_softmax(model(input_ids=batch.input_ids).logits.float(), -1)
    rows, cols = batch.score_rows, batch.score_cols  # the positions that predict answer tokens
    per_position = (policy.exp() * (policy - base)).sum(-1)[rows, cols]  # (M,)
    return torch.zeros(len(completions)).index_add(0, rows, per_position).tolist()


def _sampled_log_ratios(lm, model, completions) -> list[float]:
    """Per answer, log pi(y) - log ref(y) of the tokens drawn: the plain Monte Carlo estimate."""
    policy = kl.answer_logps(lm, model, completions)
    return (policy - kl.base_logps(lm, model, completions)).tolist()


def test_the_estimate_is_the_stepwise_kl_and_agrees_with_the_sampled_log_ratio(tiny_lm):
    model = attach_lora(tiny_lm.model)
    _perturb_lora(model, 0.3)
    prompts = PROMPTS * 6  # 66 answers
    sample = {"max_new_tokens": 16, "seed": 1, "batch_size": len(prompts)}
    completions = kl.sample_completions(tiny_lm, model, prompts, **sample)
    estimate = kl.kl_from_completions(tiny_lm, model, completions)
    exact = _exact_stepwise_kl(tiny_lm, model, completions)
    assert estimate.per_answer == pytest.approx(exact, abs=1e-3)
    assert min(estimate.per_answer) >= 0
    plain = kl.summarise(_sampled_log_ratios(tiny_lm, model, completions), [1] * len(prompts))
    assert estimate.kl > 0.25  # the perturbation moved the policy clearly
    assert abs(estimate.kl - plain.kl) < 4 * (estimate.stderr + plain.stderr)  # same mean
    assert estimate.stderr < plain.stderr  # less noise from the same answers
    # the plain estimate on answers drawn from the base instead is -KL(base || policy) < 0
    with model.disable_adapter():
        from_base = kl.sample_completions(tiny_lm, model, prompts, **sample)
    assert _mean(_sampled_log_ratios(tiny_lm, model, from_base)) < 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_training_reports_a_positive_kl_at_each_evaluation(sharp_lm, tmp_path):
    steps: list[dict] = []
    result = trainer.train(
        sharp_lm, PAIRS, small_config(early_stopping=False, learning_rate=1e-3, kl_prompts=11),
        tmp_path / "v1", heldout=PAIRS, on_step=steps.append,
    )  # fmt: skip
    evals = [s for s in steps if "eval/kl" in s]
    assert [s["step"] for s in evals] == [3, 6, 9]  # the end of each epoch
    assert all("eval/kl_stderr" in s and "eval/rewards/accuracies" in s for s in evals)
    assert evals[-1]["eval/kl"] > 2 * evals[-1]["eval/kl_stderr"] > 0
    assert result.metrics["eval/kl"] == evals[-1]["eval/kl"]
    assert "No early stopping: early_stopping is off" in result.stop_reason


def test_the_readout_takes_each_prompt_in_turn_or_evenly_spaced_ones():
    assert trainer.spread(["a", "b"], 5) == ["a", "b", "a", "b", "a"]
    assert trainer.spread(list("abcdefgh"), 4) == ["a", "c", "e", "g"]
    assert trainer.spread([], 3) == []


def test_the_kl_readout_samples_the_prompts_it_is_given(sharp_lm):
    model = attach_lora(sharp_lm.model)
    _perturb_lora(model, 0.3)
    config = small_config(kl_prompts=4)
    dataset = trainer.prepare_dataset(sharp_lm.tokenizer, PAIRS, config, "held-out")

    def readout_of(prompts: list[str]) -> dict:
        completions = kl.sample_from_ids(
            sharp_lm, model, [kl.prompt_ids(sharp_lm.tokenizer, p) for p in prompts],
            max_new_tokens=config.kl_max_new_tokens, seed=config.seed, batch_size=16,
        )  # fmt: skip
        estimate = kl.kl_from_completions(sharp_lm, model, completions)
        return {"eval/kl": estimate.kl, "eval/kl_stderr": estimate.stderr}

    own = trainer.kl_readout(model, dataset, sharp_lm, config)
    spaced = [PROMPTS[i] for i in (0, 2, 5, 8)]  # 4 of the 11 held-out prompts, evenly spaced
    assert own == pytest.approx(readout_of(spaced))
    dataset.readout_prompts = [kl.prompt_ids(sharp_lm.tokenizer, "Sing about the sea.")]
    given = trainer.kl_readout(model, dataset, sharp_lm, config)
    assert given == pytest.approx(readout_of(["Sing about the sea."] * 4))
    assert given != own


# --- the guard -------------------------------------------------------------------------------


def test_guard_keeps_the_latest_checkpoint_as_good_as_the_best_within_the_kl_ceiling():
    guard = Guard(kl_ceiling=5.0, patience=2)
    assert guard.observe(EvalPoint(1, accuracy=0.6, loss=0.6, kl=1.0)).keep
    assert guard.observe(EvalPoint(2, accuracy=0.8, loss=0.5, kl=2.0)).keep
    # as accurate, a higher held-out loss: the later checkpoint has moved further, keep it
    later = guard.observe(EvalPoint(3, accuracy=0.8 - ACCURACY_TOLERANCE / 2, loss=0.7, kl=3.0))
    assert later.keep and later.stop is None
    worse = guard.observe(EvalPoint(4, accuracy=0.7, loss=0.45, kl=4.0))
    assert not worse.keep and worse.stop is None
    drift = guard.observe(EvalPoint(5, accuracy=1.0, loss=0.1, kl=9.0))
    assert not drift.keep and "drifted too far" in drift.stop and "KL 9.0" in drift.stop
    assert guard.best.step == 3


def test_guard_stops_when_held_out_accuracy_stays_below_its_best():
    guard = Guard(kl_ceiling=5.0, patience=2)
    guard.observe(EvalPoint(1, accuracy=0.9, loss=0.3, kl=None))
    assert guard.observe(EvalPoint(2, accuracy=0.8, loss=0.2, kl=None)).stop is None
    decision = guard.observe(EvalPoint(3, accuracy=0.8, loss=0.1, kl=None))
    assert "stayed below its best (0.90) for 2 evaluations" in decision.stop
    assert guard.best.step == 1


def test_the_kl_guard_with_nothing_within_the_ceiling_fails_closed():
    guard = KLGuard(kl_ceiling=5.0, patience=3)
    decisions = [guard.observe(EvalPoint(s, None, None, kl)) for s, kl in ((1, 7), (2, 6), (3, 9))]
    # each new least-drifted point is snapshot, never a more drifted one
    assert [d.keep for d in decisions] == [True, True, False]
    assert guard.best is None and not guard.within_ceiling and guard.kept.step == 2
    text = summary(guard, decisions[-1].stop, 3, 10, None)
    assert "Every evaluation was above the KL ceiling (5 nats)" in text
    assert "kept the least-drifted checkpoint (step 2, KL 6.0 nats)" in text
    assert "not made active" in text


def test_the_accuracy_guard_stops_at_a_first_point_past_the_ceiling_and_fails_closed():
    guard = Guard(kl_ceiling=5.0, patience=3)
    decision = guard.observe(EvalPoint(4, accuracy=0.9, loss=0.3, kl=7.0))
    assert decision.keep and "drifted too far" in decision.stop
    assert not guard.within_ceiling and guard.kept.step == 4


def test_a_point_within_the_ceiling_wins_over_the_least_drifted_one():
    guard = KLGuard(kl_ceiling=5.0, patience=5)
    assert guard.observe(EvalPoint(1, accuracy=None, loss=None, kl=6.0)).keep
    assert guard.observe(EvalPoint(2, accuracy=None, loss=None, kl=4.0)).keep
    assert not guard.observe(EvalPoint(3, accuracy=None, loss=None, kl=5.5)).keep
    assert guard.within_ceiling and guard.kept.step == 2


def test_a_long_epoch_is_checked_before_the_ceiling_can_be_passed():
    from types import SimpleNamespace

    from dpo_core.evaluation import MAX_STEPS_BETWEEN_CHECKS, is_eval_step

    def checks(rows: int, **overrides) -> list[int]:
        dataset, config = SimpleNamespace(pairs=[None] * rows), small_config(**overrides)
        total = -(-rows // config.batch_size)  # one epoch
        return [s for s in range(1, total + 1) if is_eval_step(s, total, dataset, config)]

    assert checks(32) == [8]  # a short epoch: checked at its end, as before
    assert checks(270) == [16, 32, 48, 64, 68]  # KTO's 68-step epoch: first check at step 16
    assert checks(270, eval_every=50) == [50, 68]  # an explicit setting wins
    assert MAX_STEPS_BETWEEN_CHECKS == 16


def _kept(points: list[dict], ceiling: float) -> dict:
    """The guard's rule, restated: the latest point within the ceiling whose accuracy is
    within the tolerance of the best accuracy seen so far."""
    best_accuracy, kept = -1.0, None
    for p in points:
        if p["eval/kl"] > ceiling:
            continue
        best_accuracy = max(best_accuracy, p["eval/rewards/accuracies"])
        if p["eval/rewards/accuracies"] >= best_accuracy - ACCURACY_TOLERANCE:
            kept = p
    return kept


def test_a_run_stops_early_at_the_kl_ceiling_and_keeps_the_best_checkpoint(sharp_lm, tmp_path):
    # measured: eval/kl 0.4, 3.7, 11.5, 27, ... at steps 1, 2, 3, 4, ... of 12
    config = small_config(epochs=4, eval_every=1, learning_rate=2e-3, kl_ceiling=6.0,
                          min_heldout_pairs=8, patience=100, kl_prompts=8)  # fmt: skip
    steps: list[dict] = []
    result = trainer.train(
        sharp_lm, PAIRS, config, tmp_path / "v1", heldout=PAIRS[:8], on_step=steps.append
    )
    total = steps[0]["total_steps"]
    assert result.stopped_early and 1 < len(steps) < total
    assert steps[-1]["eval/kl"] > 6.0  # the step that passed the ceiling ended the run
    assert result.stop_reason.startswith(f"Stopped early at step {len(steps)} of {total}")
    assert "drifted too far from the base model" in result.stop_reason
    best = _kept(steps, 6.0)
    assert result.metrics["kept_step"] == best["step"] < len(steps)
    assert f"Kept the checkpoint from step {best['step']}" in result.stop_reason
    assert result.metrics["eval/kl"] == best["eval/kl"]
    # the saved adapter is that checkpoint: its held-out margins are the ones measured there
    sharp_lm.model = PeftModel.from_pretrained(sharp_lm.model, str(result.adapter_dir))
    got = implicit_reward_accuracy(sharp_lm, PAIRS[:8], ["default"], max_length=96)["default"]
    beta = config.beta
    assert beta * got.mean_margin == pytest.approx(best["eval/rewards/margins"], abs=1e-4)
    saved = json.loads((result.adapter_dir / "metrics.json").read_text())
    assert saved["stop_reason"] == result.stop_reason


def test_after_an_sft_stage_the_kl_readout_measures_from_the_sft_model(sharp_lm, tmp_path):
    chosen = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]
    # SFT moves the policy; DPO barely does (a learning rate of 1e-9)
    config = small_config(epochs=1, sft_epochs=2, learning_rate=1e-9, sft_learning_rate=2e-2,
                          heldout_fraction=0.0, kl_prompts=4)  # fmt: skip
    steps: list[dict] = []
    fresh = ["Sing about the sea.", "Name a river.", "What is a kite?", "Count to five."]
    result = trainer.train(sharp_lm, PAIRS, config, tmp_path / "v1", kl_prompts=fresh,
                           sft_examples=chosen, on_step=steps.append)  # fmt: skip
    readout = [s["eval/kl"] for s in steps if "eval/kl" in s]
    assert readout and max(readout) < 1e-3  # DPO added no drift to its own reference
    sharp_lm.model = PeftModel.from_pretrained(sharp_lm.model, str(result.adapter_dir))
    from_base = kl.estimate_kl(sharp_lm, sharp_lm.model, fresh, max_new_tokens=24)
    assert from_base.kl > 100 * max(readout[0], 1e-4)  # what a readout from the base would say


def test_enough_pairs_turn_the_guard_on_by_holding_out_prompts(tiny_lm, tmp_path):
    pairs = [
        {"prompt": f"Tell me fact number {i}.", "chosen": f"Fact {i} is true.", "rejected": "No."}
        for i in range(60)
    ]
    config = small_config(epochs=1, batch_size=8, kl_prompts=2, kl_max_new_tokens=8)
    kept, held = trainer.split_heldout(pairs, config)
    assert held and len(held) >= config.min_heldout_pairs and len(kept) + len(held) == 60
    assert trainer.split_heldout(list(reversed(pairs)), config)[1] == list(reversed(held))
    assert trainer.split_heldout(pairs[:20], config) == (pairs[:20], None)  # too few: no split
    result = trainer.train(tiny_lm, pairs, config, tmp_path / "v1")
    assert result.metrics["num_pairs"] == len(kept)
    assert "eval/kl" in result.metrics and "No early stopping" not in result.stop_reason
    assert result.warnings == []


def test_too_few_pairs_warn_and_say_why_the_guard_is_off(tiny_lm, tmp_path):
    result = trainer.train(tiny_lm, PAIRS[:4], small_config(epochs=1), tmp_path / "v1")
    assert result.warnings == [few_pairs_warning(4)]
    assert "Only 4 preference pairs" in result.warnings[0]
    assert few_pairs_warning(MIN_PAIRS_FOR_VISIBLE_CHANGE) is None
    assert "No early stopping: 0 held-out pairs" in result.stop_reason
    assert result.stop_reason.startswith("Trained all 1 step.")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kl_ceiling": 0.0}, "kl_ceiling must be > 0"),
        ({"kl_ceiling": float("nan")}, "kl_ceiling must be > 0"),
        ({"patience": 0}, "patience must be a positive integer"),
        ({"kl_prompts": -1}, "kl_prompts must be a whole number"),
        ({"heldout_fraction": 0.9}, "heldout_fraction must be in"),
        ({"min_heldout_pairs": 0}, "min_heldout_pairs must be a positive integer"),
    ],
)
def test_bad_guard_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


# --- the defaults ----------------------------------------------------------------------------


def recommended_defaults() -> dict[str, str]:
    """The `| field | value | why |` rows under the doc's "Chosen defaults" heading."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Chosen defaults", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`(\w+)`\s*\|\s*`([^`]+)`\s*\|", section, re.MULTILINE)
    return dict(rows)


def test_the_defaults_in_code_are_the_ones_the_doc_recommends():
    recommended = recommended_defaults()
    assert {"learning_rate", "epochs", "beta", "loss_type", "kl_ceiling"} <= set(recommended)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    defaults["min_pairs_for_visible_change"] = MIN_PAIRS_FOR_VISIBLE_CHANGE
    for name, value in recommended.items():
        assert name in defaults, f"docs/defaults.md recommends an unknown field {name}"
        assert str(defaults[name]) == value or _number(defaults[name]) == _number(value), name


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
