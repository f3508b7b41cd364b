"""How sure a version is between two answers (dpo_core.uncertainty), on the tiny model: 0 for
identical answers, the same either way round, and larger after training toward one answer."""

from __future__ import annotations

import pytest
from peft import PeftModel

from dpo_core.config import TrainConfig
from dpo_core.modeling import attach_lora, load_model
from dpo_core.reward_eval import implicit_reward_accuracy
from dpo_core.trainer import train
from dpo_core.uncertainty import (
    IMPLICIT_REWARD,
    MEAN_LOGP,
    AnswerPair,
    least_sure_first,
    pair_margins,
    same_answer,
    sample_pairs,
)
from tests.tiny import save_random_adapter

TOPICS = ("cats", "rain", "tea", "maps", "jazz", "salt")
PAIRS = [AnswerPair(f"Say something about {t}.", f"{t} is nice.", "no") for t in TOPICS]


@pytest.fixture
def random_version(tiny_lm, tiny_model_dir, tmp_path):
    """The tiny model with a LoRA version `v1` far from zero (it prefers some answers)."""
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "v1")
    tiny_lm.model = PeftModel.from_pretrained(tiny_lm.model, str(adapter), adapter_name="v1")
    return tiny_lm


def swapped(pairs: list[AnswerPair]) -> list[AnswerPair]:
    return [AnswerPair(p.prompt, p.b, p.a) for p in pairs]


@pytest.mark.parametrize("adapter", [None, "v1"])
def test_identical_answers_have_margin_zero(random_version, adapter):
    pairs = [AnswerPair("Hi", "same answer", "same answer"), *PAIRS[:2]]
    margins = pair_margins(random_version, pairs, adapter)
    assert margins.values[0] == 0.0
    assert all(m > 0 for m in margins.values[1:])  # different answers: some preference


@pytest.mark.parametrize(("adapter", "measure"), [(None, MEAN_LOGP), ("v1", IMPLICIT_REWARD)])
def test_margins_are_symmetric(random_version, adapter, measure):
    forward = pair_margins(random_version, PAIRS, adapter)
    backward = pair_margins(random_version, swapped(PAIRS), adapter)
    assert forward.measure == backward.measure == measure
    assert forward.values == pytest.approx(backward.values, rel=1e-5, abs=1e-6)
    assert len(set(forward.values)) > 1  # the measure tells the prompts apart


def test_the_reward_margin_matches_reward_eval_and_scales_with_beta(random_version):
    margins = pair_margins(random_version, PAIRS, "v1").values
    for pair, margin in zip(PAIRS[:3], margins, strict=False):
        one = [{"prompt": pair.prompt, "chosen": pair.a, "rejected": pair.b}]
        signed = implicit_reward_accuracy(random_version, one, ["v1"])["v1"].mean_margin
        assert margin == pytest.approx(abs(signed), rel=1e-5, abs=1e-6)
    halved = pair_margins(random_version, PAIRS, "v1", beta=0.5).values
    assert halved == pytest.approx([m / 2 for m in margins], rel=1e-6)


def test_the_served_adapter_and_mode_are_restored(random_version, tiny_model_dir, tmp_path):
    model = random_version.model
    model.load_adapter(str(save_random_adapter(tiny_model_dir, tmp_path / "v2", seed=1)), "v2")
    model.set_adapter("v2")
    model.train()
    pair_margins(random_version, PAIRS, "v1")
    assert model.active_adapter == "v2" and model.training


def test_larger_after_training_toward_one_answer(tiny_lm, tiny_model_dir, tmp_path):
    fresh = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    fresh.model = attach_lora(fresh.model)  # LoRA B starts at zero: policy == reference
    before = pair_margins(fresh, PAIRS, "default").values
    assert before == pytest.approx([0.0] * len(PAIRS), abs=1e-5)
    settings = {"epochs": 3, "batch_size": 2, "learning_rate": 5e-3, "max_length": 64}
    config = TrainConfig(
        model="tiny", dtype="fp32", device="cpu", lora_r=4, lora_alpha=8, **settings
    )
    chosen_first = [{"prompt": p.prompt, "chosen": p.a, "rejected": p.b} for p in PAIRS]
    result = train(tiny_lm, chosen_first, config, tmp_path / "v1", heldout=chosen_first[:2])
    tiny_lm.model = PeftModel.from_pretrained(
        tiny_lm.model, str(result.adapter_dir), adapter_name="v1"
    )
    after = pair_margins(tiny_lm, PAIRS, "v1").values
    assert min(after) > 10 * max(before) and sum(after) > 1e-3


def test_an_adapter_that_is_not_loaded_or_a_bad_beta_is_a_clear_error(random_version):
    with pytest.raises(ValueError, match="version 'v9' is not loaded"):
        pair_margins(random_version, PAIRS, "v9")
    with pytest.raises(ValueError, match="beta must be > 0"):
        pair_margins(random_version, PAIRS, "v1", beta=0)


def test_least_sure_first_ranks_sampled_pairs_by_margin(random_version, tiny_model_dir, tmp_path):
    model = random_version.model
    model.load_adapter(str(save_random_adapter(tiny_model_dir, tmp_path / "v2", seed=1)), "v2")
    model.set_adapter("v2")
    prompts = [p.prompt for p in PAIRS]
    order = least_sure_first(random_version, prompts, "v1", max_new_tokens=12, seed=3)
    assert sorted(order) == list(range(len(prompts)))
    assert model.active_adapter == "v2"  # sampled and scored as v1, the served one kept
    pairs = sample_pairs(random_version, prompts, "v1", (0.7, 1.0), 12, 3)  # the same samples
    margins = pair_margins(random_version, pairs, "v1").values
    assert [margins[i] for i in order] == sorted(margins)
    assert order != list(range(len(prompts)))
    with pytest.raises(ValueError, match="version 'v9' is not loaded"):
        least_sure_first(random_version, prompts, "v9")


def test_the_same_answer_twice_is_one_text():
    assert same_answer(AnswerPair("p", " Paris.", "Paris.\n"))
    assert not same_answer(AnswerPair("p", "Paris.", "Rome."))
