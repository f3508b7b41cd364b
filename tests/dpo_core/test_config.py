"""TrainConfig: defaults, validation with actionable messages, dict round trip."""

from __future__ import annotations

import json

import pytest

from dpo_core.config import TrainConfig


def test_default_prompt_budget_is_half_the_length():
    # The training defaults themselves are tied to docs/defaults.md by
    # tests/dpo_core/test_kl_guard.py::test_the_defaults_in_code_are_the_ones_the_doc_recommends.
    c = TrainConfig()
    assert c.max_prompt_length == c.max_length // 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0}, "beta must be a positive number"),
        ({"label_smoothing": 0.7}, "label_smoothing must be in"),
        ({"rpo_alpha": -1.0}, "rpo_alpha must be a non-negative number"),
        ({"rpo_alpha": float("nan")}, "rpo_alpha must be a non-negative number"),
        ({"loss_type": "magic"}, "unknown loss_type 'magic'"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"batch_size": -4}, "batch_size must be a positive integer"),
        ({"grad_accum": 1.5}, "grad_accum must be a positive integer"),
        ({"learning_rate": 0.0}, "learning_rate must be in"),
        ({"learning_rate": float("inf")}, "learning_rate must be in"),
        ({"lr_scheduler": "step"}, "lr_scheduler must be one of cosine"),
        ({"warmup_ratio": 1.0}, "warmup_ratio must be in"),
        ({"weight_decay": -1.0}, "weight_decay must be"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be"),
        ({"max_length": 1}, "max_length must be at least 2"),
        ({"max_length": 64, "max_prompt_length": 64}, "max_prompt_length must be between 1"),
        ({"max_forward_tokens": 0}, "max_forward_tokens must be a positive integer"),
        ({"lora_r": 0}, "LoRA rank r must be a positive integer"),
        ({"lora_dropout": 1.0}, "LoRA dropout"),
        ({"lora_target_modules": ()}, "target_modules must name"),
        ({"lora_target_modules": ("q_proj", "lm_head")}, "LoRA on lm_head is not supported"),
        ({"dtype": "int8"}, "dtype must be auto or one of"),
        ({"model": " "}, "model must name a model"),
        ({"eval_every": -1}, "eval_every must be >= 0"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_round_trips_through_json():
    c = TrainConfig(loss_type="ipo", beta=0.5, lora_target_modules=("q_proj", "v_proj"))
    again = TrainConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    assert again.lora_target_modules == ("q_proj", "v_proj")


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"field.*: lr; valid: .*learning_rate"):
        TrainConfig.from_dict({"lr": 1e-4})


def test_patience_help_says_what_the_guard_counts():
    """The guard counts evaluations below the best held-out accuracy; a better loss does not
    reset it (dpo_core.guard), so the help must not promise that it does."""
    from dataclasses import fields

    from dpo_core.guard import EvalPoint, Guard

    (patience,) = [f for f in fields(TrainConfig) if f.name == "patience"]
    text = patience.metadata["help"]
    assert "accuracy" in text and "accuracy or loss" not in text
    guard = Guard(kl_ceiling=8.0, patience=2)
    guard.observe(EvalPoint(step=1, accuracy=0.9, loss=0.6, kl=None))
    assert guard.observe(EvalPoint(step=2, accuracy=0.7, loss=0.5, kl=None)).stop is None
    assert guard.observe(EvalPoint(step=3, accuracy=0.7, loss=0.4, kl=None)).stop  # loss fell
