"""The training loop on the tiny model: it learns, only LoRA moves, accumulation is exact,
cancellation saves nothing, adapters reload, and bad input is a clear error."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel

from dpo_core import trainer
from dpo_core.batches import iterate_steps
from dpo_core.config import TrainConfig
from dpo_core.modeling import load_model

TOPICS = ("cats", "rain", "tea", "maps", "jazz", "salt", "bees", "snow")
PAIRS = [
    {"prompt": f"Tell me about {t}.", "chosen": f"Gladly! {t} are lovely.", "rejected": "No."}
    for t in TOPICS
]
TRL_METRICS = {
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "pairs_per_second",
    "step", "total_steps", "epoch",
}  # fmt: skip


def small_config(**overrides) -> TrainConfig:
    values = dict(
        epochs=4, batch_size=4, learning_rate=5e-3, max_length=96, lora_r=4, lora_alpha=8,
        warmup_ratio=0.0,
    )  # fmt: skip
    return TrainConfig(**(values | overrides))


def test_training_learns_and_moves_only_lora(tiny_lm, tmp_path):
    base_before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    steps: list[dict] = []
    result = trainer.train(
        tiny_lm, PAIRS, small_config(eval_every=2), tmp_path / "v1",
        heldout=PAIRS[:4], on_step=steps.append,
    )  # fmt: skip
    assert not result.cancelled and result.adapter_dir == tmp_path / "v1"
    assert [s["step"] for s in steps] == list(range(1, 9)) and steps[0]["total_steps"] == 8
    assert set(steps[0]) >= TRL_METRICS and "eval/loss" not in steps[0]
    assert {"eval/loss", "eval/rewards/accuracies"} <= set(steps[1])
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert steps[0]["rewards/accuracies"] == 0.0
    assert result.metrics["loss"] < 0.6 and result.metrics["rewards/accuracies"] >= 0.75
    assert result.metrics["eval/rewards/accuracies"] == 1.0
    assert steps[-1]["epoch"] == 4.0 and steps[0]["learning_rate"] == pytest.approx(5e-3)

    # the base model is handed back unchanged, without LoRA layers
    assert not isinstance(tiny_lm.model, PeftModel)
    for name, tensor in tiny_lm.model.state_dict().items():
        assert torch.equal(tensor, base_before[name]), name

    # the adapter reloads with PEFT, its LoRA weights moved, config + metrics beside it
    reloaded = PeftModel.from_pretrained(tiny_lm.model, str(result.adapter_dir))
    lora_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.dtype == torch.float32 for p in lora_b)
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero
    saved = json.loads((result.adapter_dir / "train_config.json").read_text())
    assert TrainConfig.from_dict(saved) == result.config
    assert saved["model"] == tiny_lm.source and saved["dtype"] == "fp32"
    metrics = json.loads((result.adapter_dir / "metrics.json").read_text())
    assert metrics["num_pairs"] == len(PAIRS) and metrics["steps"] == 8


def _seeded_policy(model_dir, config: TrainConfig):
    """The tiny model, its first 4 pairs and a policy whose LoRA B is set non-zero."""
    lm = load_model(str(model_dir), dtype="fp32", device="cpu")
    dataset = trainer.prepare_dataset(lm.tokenizer, PAIRS[:4], config, "training")
    torch.manual_seed(0)
    policy = trainer.prepare_policy(lm, config, total_steps=1)
    torch.manual_seed(1)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return lm, dataset, policy


def _step_gradients(model_dir, config: TrainConfig) -> list[torch.Tensor]:
    """Gradients of the first optimiser step on the first 4 pairs (LoRA B set non-zero)."""
    lm, dataset, policy = _seeded_policy(model_dir, config)
    trainer.fill_reference_logps(policy.model, dataset, lm, config, lambda: False)
    grads: list[torch.Tensor] = []
    policy.optimizer.step = lambda: grads.extend(m.grad.clone() for m in policy.masters.masters)
    steps = list(iterate_steps(dataset.costs, config, epochs=config.epochs, seed=config.seed))
    assert len(steps) == 1
    trainer.train_step(policy, steps[0][2], dataset, lm, config)
    return grads


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize(
    "variant",
    [
        {"batch_size": 2, "grad_accum": 2},
        {"batch_size": 1, "grad_accum": 4},
        {"max_forward_tokens": 8},  # one pair per forward pass
        {"share_prompt": False},  # the padded [chosen; rejected] layout
        {"gradient_checkpointing": True},
    ],
)
def test_the_step_gradient_does_not_depend_on_how_the_batch_is_split(tiny_model_dir, variant):
    common = {"max_grad_norm": 1e9, "epochs": 1}
    expected = _step_gradients(tiny_model_dir, small_config(batch_size=4, **common))
    got = _step_gradients(tiny_model_dir, small_config(**common | variant))
    assert any(g.abs().sum() > 0 for g in expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_cancel_between_steps_saves_nothing(tiny_lm, tmp_path):
    seen: list[dict] = []
    result = trainer.train(
        tiny_lm, PAIRS, small_config(batch_size=2), tmp_path / "v1",
        on_step=seen.append, should_stop=lambda: len(seen) >= 2,
    )  # fmt: skip
    assert result.cancelled and result.adapter_dir is None
    assert len(seen) == 2
    assert not (tmp_path / "v1").exists() and list(tmp_path.iterdir()) == []
    assert not isinstance(tiny_lm.model, PeftModel)


def test_continuing_an_adapter_keeps_the_base_as_reference(tiny_lm, tmp_path):
    first = trainer.train(tiny_lm, PAIRS, small_config(), tmp_path / "v1")
    steps: list[dict] = []
    second = trainer.train(
        tiny_lm, PAIRS, small_config(epochs=1, init_adapter=str(first.adapter_dir)),
        tmp_path / "v2", on_step=steps.append,
    )  # fmt: skip
    # the first step already sees v1's preference: the reference is the base, not v1
    assert steps[0]["rewards/margins"] > 0.1 and steps[0]["loss"] < math.log(2) - 0.05
    assert second.config.init_adapter == str(first.adapter_dir)
    assert PeftModel.from_pretrained(tiny_lm.model, str(second.adapter_dir))


def test_bf16_base_trains_lora_in_bf16_and_saves_fp32(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), dtype="bf16", device="cpu")
    result = trainer.train(lm, PAIRS, small_config(epochs=2), tmp_path / "v1")
    assert result.metrics["loss"] < math.log(2)
    assert result.config.dtype == "bf16"
    reloaded = PeftModel.from_pretrained(lm.model, str(result.adapter_dir))
    lora = [p for n, p in reloaded.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "orpo", "robust"])
def test_other_loss_types_train(tiny_lm, tmp_path, loss_type):
    extra = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    result = trainer.train(
        tiny_lm, PAIRS, small_config(epochs=1, loss_type=loss_type, **extra), tmp_path / "v1"
    )
    assert math.isfinite(result.metrics["loss"])


def test_rpo_adds_the_chosen_nll_and_raises_the_chosen_likelihood(tiny_lm, tmp_path):
    plain: list[dict] = []
    rpo: list[dict] = []
    trainer.train(tiny_lm, PAIRS, small_config(), tmp_path / "dpo", on_step=plain.append)
    rpo_config = small_config(rpo_alpha=1.0)
    trainer.train(tiny_lm, PAIRS, rpo_config, tmp_path / "rpo", on_step=rpo.append)
    assert plain[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # a random model's per-token NLL is about log(vocabulary size), far above 1 nat
    assert rpo[0]["loss"] > math.log(2) + 1
    assert rpo[0]["logps/chosen"] == pytest.approx(plain[0]["logps/chosen"], rel=1e-5)
    # the same start and seed: the NLL term makes every later step's chosen answers likelier
    for r, p in zip(rpo[1:], plain[1:], strict=True):
        assert r["logps/chosen"] > p["logps/chosen"]
    assert rpo[-1]["logps/chosen"] > plain[-1]["logps/chosen"] + 0.25


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_the_rpo_term_adds_alpha_times_the_gradient_of_the_chosen_nll(tiny_model_dir):
    from dpo_core.logprobs import completion_logps

    common = {"max_grad_norm": 1e9, "epochs": 1, "batch_size": 4}
    dpo = _step_gradients(tiny_model_dir, small_config(**common))
    rpo = _step_gradients(tiny_model_dir, small_config(rpo_alpha=0.5, **common))
    # the NLL term alone, by hand: mean over the 4 pairs of the chosen answer's per-token NLL
    config = small_config(**common)
    lm, dataset, policy = _seeded_policy(tiny_model_dir, config)
    batch = trainer.make_batch(dataset, list(range(4)), lm, config)
    logps, lengths = completion_logps(policy.model, batch)
    chosen, chosen_lengths = logps.chunk(2)[0], lengths.chunk(2)[0]
    (-(chosen / chosen_lengths).sum() / 4).backward()
    nll = [p.grad for p in policy.masters.params]
    assert any(g.abs().sum() > 0 for g in nll)
    for r, d, n in zip(rpo, dpo, nll, strict=True):
        torch.testing.assert_close(r - d, 0.5 * n, rtol=1e-4, atol=1e-6)


def test_bad_input_is_a_clear_error(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="no preference pairs"):
        trainer.train(tiny_lm, [], small_config(), tmp_path / "v1")
    same = [{"prompt": "Hi", "chosen": "same", "rejected": "same"}]
    with pytest.raises(ValueError, match="no usable training pairs: all 1 were dropped"):
        trainer.train(tiny_lm, same, small_config(), tmp_path / "v1")
    blank = [{"prompt": " ", "chosen": "a", "rejected": "b"}]
    with pytest.raises(ValueError, match="held-out pairs: row 1: 'prompt' is empty"):
        trainer.train(tiny_lm, PAIRS, small_config(), tmp_path / "v1", heldout=blank)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        trainer.train(tiny_lm, PAIRS, small_config(), tmp_path / "taken")
    assert not isinstance(tiny_lm.model, PeftModel)


def test_unusable_heldout_pairs_only_skip_the_evaluation(tiny_lm, tmp_path, caplog):
    same = [{"prompt": "Hi", "chosen": "same", "rejected": "same"}]
    result = trainer.train(tiny_lm, PAIRS, small_config(epochs=1), tmp_path / "v1", heldout=same)
    assert result.adapter_dir is not None and "eval/loss" not in result.metrics
    assert "no usable held-out pairs" in caplog.text


@pytest.mark.embedded
@pytest.mark.slow
def test_a_few_steps_on_the_4bit_embedded_model(tmp_path):
    lm = load_model("embedded", device="cpu", load_in_4bit=True)
    assert lm.load_in_4bit
    result = trainer.train(
        lm, PAIRS[:4], small_config(epochs=1, batch_size=2, max_length=48, learning_rate=1e-3),
        tmp_path / "v1",
    )  # fmt: skip
    assert result.metrics["steps"] == 2 and math.isfinite(result.metrics["loss"])
    assert result.config.load_in_4bit
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
