"""Per-pair weights: a row's `weight` scales its loss (step loss = sum(weight_i * loss_i) / n),
checked on the step gradient of the tiny model; bad weights are refused naming the row."""

from __future__ import annotations

import re

import pytest
import torch

from common.pair_format import PairError, parse_pairs
from dpo_core import data, trainer
from dpo_core.config import TrainConfig
from dpo_core.modeling import load_model

TOPICS = ("cats", "rain", "tea", "maps")
PAIRS = [
    {"prompt": f"Tell me about {t}.", "chosen": f"Gladly! {t} are lovely.", "rejected": "No."}
    for t in TOPICS
]
CONFIG = TrainConfig(
    epochs=1, batch_size=8, learning_rate=5e-3, max_length=96, lora_r=4, lora_alpha=8,
    warmup_ratio=0.0, max_grad_norm=1e9,
)  # fmt: skip


def step_gradients(
    model_dir, pairs: list[dict], config: TrainConfig = CONFIG
) -> list[torch.Tensor]:
    """The LoRA gradients of one optimiser step over all `pairs` (LoRA B set non-zero, so the
    policy differs from the reference), from a fresh copy of the tiny model."""
    lm = load_model(str(model_dir), dtype="fp32", device="cpu")
    dataset = trainer.prepare_dataset(lm.tokenizer, pairs, config, "training")
    torch.manual_seed(0)
    policy = trainer.prepare_policy(lm, config, total_steps=1)
    torch.manual_seed(1)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    trainer.fill_reference_logps(policy.model, dataset, lm, config, lambda: False)
    grads: list[torch.Tensor] = []
    policy.optimizer.step = lambda: grads.extend(m.grad.clone() for m in policy.masters.masters)
    trainer.train_step(policy, [list(range(len(dataset.pairs)))], dataset, lm, config)
    assert any(g.abs().sum() > 0 for g in grads)
    return grads


def assert_scaled_equal(
    a: list[torch.Tensor], scale_a: float, b: list[torch.Tensor], scale_b: float
):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x * scale_a, y * scale_b, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_weight_of_zero_removes_the_pair_from_the_summed_loss(tiny_model_dir):
    """sum(w_i loss_i) / n: with the 4th pair at weight 0, the step gradient times 4 is the
    gradient of the 3 others times 3 (the pair still counts in n, nothing else)."""
    zero = [*PAIRS[:3], PAIRS[3] | {"weight": 0}]
    assert_scaled_equal(
        step_gradients(tiny_model_dir, zero), 4, step_gradients(tiny_model_dir, PAIRS[:3]), 3
    )


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_weight_of_two_counts_the_pair_twice(tiny_model_dir):
    doubled = [*PAIRS[:3], PAIRS[3] | {"weight": 2.0}]
    twice = [*PAIRS, PAIRS[3]]
    assert_scaled_equal(
        step_gradients(tiny_model_dir, doubled), 4, step_gradients(tiny_model_dir, twice), 5
    )


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_weights_of_one_change_nothing_and_kto_examples_are_weighted_too(tiny_model_dir):
    ones = [p | {"weight": 1} for p in PAIRS]
    for got, expected in zip(
        step_gradients(tiny_model_dir, ones), step_gradients(tiny_model_dir, PAIRS), strict=True
    ):
        assert torch.equal(got, expected)
    kto = TrainConfig(**(CONFIG.to_dict() | {"loss_type": "kto"}))
    # a pair under KTO is two examples (chosen: desirable, rejected: not), both with its weight
    half = [p | {"weight": 0.5} for p in PAIRS]
    assert_scaled_equal(
        step_gradients(tiny_model_dir, half, kto), 2, step_gradients(tiny_model_dir, PAIRS, kto), 1
    )


def test_weights_survive_normalisation_and_tokenization(tiny_tokenizer):
    rows = [PAIRS[0] | {"weight": 0.25}, PAIRS[1]]
    normalised = data.normalise_pairs(rows)
    assert [p["weight"] for p in normalised] == [0.25, 1.0]
    tokenized = data.tokenize_pairs(tiny_tokenizer, normalised, 12, 6)  # truncated
    assert [p.weight for p in tokenized.pairs] == [0.25, 1.0] and tokenized.truncated
    assert parse_pairs(rows, "pairs")[0].weight == 0.25


@pytest.mark.parametrize(
    ("weight", "shown"),
    [(-1, "-1"), (float("nan"), "nan"), ("2", "'2'"), (True, "True"), (None, "None")],
)
def test_a_bad_weight_is_refused_naming_the_row(weight, shown):
    rows = [PAIRS[0], PAIRS[1] | {"weight": weight}]
    message = f"pairs: row 2: 'weight' must be a finite number >= 0, got {shown}"
    with pytest.raises(PairError, match=re.escape(message)):
        data.normalise_pairs(rows)
    unpaired = {"prompt": "p", "completion": "a", "label": True, "weight": weight}
    with pytest.raises(PairError, match=re.escape("votes: row 1: 'weight' must be")):
        data.normalise_kto([unpaired], source="votes")
