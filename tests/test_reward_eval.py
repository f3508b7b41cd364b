"""Implicit-reward accuracy of adapter versions agrees with the trainer's own evaluation."""

from __future__ import annotations

import pytest
from peft import PeftModel

from dpo_core.config import TrainConfig
from dpo_core.modeling import attach_lora
from dpo_core.reward_eval import implicit_reward_accuracy
from dpo_core.trainer import train

PAIRS = [
    {"prompt": f"Say something about {topic}.", "chosen": f"{topic} is nice.", "rejected": "no"}
    for topic in ("cats", "rain", "tea", "maps", "jazz", "salt")
]


def test_a_fresh_adapter_has_zero_margin(tiny_lm):
    tiny_lm.model = attach_lora(tiny_lm.model)  # LoRA B starts at zero: policy == reference
    result = implicit_reward_accuracy(tiny_lm, PAIRS, ["default"])
    assert result["default"].pairs == len(PAIRS)
    assert result["default"].accuracy == 0.0
    assert result["default"].mean_margin == pytest.approx(0.0, abs=1e-6)


def test_matches_the_trainers_heldout_evaluation(tiny_lm, tmp_path):
    config = TrainConfig(
        model="tiny", dtype="fp32", device="cpu", epochs=3, batch_size=2,
        learning_rate=5e-3, max_length=64, lora_r=4, lora_alpha=8,
    )  # fmt: skip
    result = train(tiny_lm, PAIRS, config, tmp_path / "v1", heldout=PAIRS[:4])
    model = PeftModel.from_pretrained(tiny_lm.model, str(result.adapter_dir), adapter_name="v1")
    model.load_adapter(str(result.adapter_dir), adapter_name="v1-copy")
    model.set_adapter("v1-copy")
    tiny_lm.model = model
    got = implicit_reward_accuracy(tiny_lm, PAIRS[:4], ["v1"], max_length=64)["v1"]
    assert got.pairs == 4
    assert got.accuracy == pytest.approx(result.metrics["eval/rewards/accuracies"])
    beta = config.beta
    assert beta * got.mean_margin == pytest.approx(result.metrics["eval/rewards/margins"], abs=1e-5)
    assert got.mean_margin > 0  # it learned something on pairs it trained on
    assert model.active_adapter == "v1-copy"  # the served adapter is restored


def test_no_usable_pairs_is_a_clear_error(tiny_lm):
    tiny_lm.model = attach_lora(tiny_lm.model)
    same = [{"prompt": "Hi", "chosen": "same", "rejected": "same"}]
    with pytest.raises(ValueError, match="no usable held-out pairs"):
        implicit_reward_accuracy(tiny_lm, same, ["default"])
