"""The SFT stage before DPO, on the tiny model: its loss is the completion's mean token NLL,
it lowers the NLL of the rewrites it trains on, a run reports its steps before DPO's, and
DPO then starts from the SFT'd model (its reference), the CLI included."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from dpo_core import sft, trainer
from dpo_core.__main__ import main
from dpo_core.config import TrainConfig
from tests.dpo_core.test_trainer import PAIRS, small_config

REWRITES = [
    {"prompt": "Tell me about cats.", "completion": "Cats are small, curious and warm."},
    {"prompt": "Tell me about tea.", "completion": "Tea is a leaf steeped in hot water."},
    {"prompt": "Tell me about maps.", "completion": "A map is a drawing of a place."},
]


def _sft_set(tokenizer, config: TrainConfig, examples=REWRITES) -> sft.SFTSet:
    return sft.tokenize_examples(tokenizer, sft.check_examples(examples), config)


def test_the_sft_loss_is_the_mean_token_nll_of_each_completion(tiny_lm):
    config = small_config()
    sft_set = _sft_set(tiny_lm.tokenizer, config)
    batch = sft.make_batch(sft_set, [0, 1, 2], tiny_lm)
    with torch.no_grad():
        got = sft.completion_nll(tiny_lm.model, batch)
    for i, example in enumerate(sft_set.examples):
        ids = torch.tensor([example.prompt_ids + example.completion_ids])
        n = len(example.prompt_ids)
        with torch.no_grad():
            logits = tiny_lm.model(ids).logits[0, n - 1 : -1]
        labels = torch.tensor(example.completion_ids)[:, None]
        expected = -torch.log_softmax(logits, -1).gather(1, labels).mean()
        assert got[i].item() == pytest.approx(expected.item(), abs=1e-4)
    # the completion is the assistant turn as a pair's chosen answer is rendered
    text = tiny_lm.tokenizer.decode(sft_set.examples[0].completion_ids)
    assert text.startswith("Cats are small") and text.endswith("<|im_end|>\n")


def test_the_sft_stage_lowers_the_nll_of_the_rewrites(tiny_lm):
    config = small_config(sft_epochs=6, sft_learning_rate=5e-3)
    sft_set = _sft_set(tiny_lm.tokenizer, config)
    torch.manual_seed(0)
    policy = trainer.prepare_policy(tiny_lm, config, total_steps=1)
    try:
        before = sft.mean_nll(policy.model, sft_set, tiny_lm, config)
        steps = sft.planned_steps(len(REWRITES), config)
        opt = sft.make_sft_optimizer(policy.masters, config, steps)
        losses = [
            sft.sft_step(policy.model, policy.masters, opt, micro, sft_set, tiny_lm, config)
            for _, _, micro in sft.stage_steps(sft_set, config)
        ]
        after = sft.mean_nll(policy.model, sft_set, tiny_lm, config)
    finally:
        trainer.release_policy(tiny_lm, policy.model, config)
    assert len(losses) == steps == 6  # 3 examples, 4 per step: one step per epoch
    assert losses[0]["sft/loss"] == pytest.approx(before, abs=1e-4)  # measured before a step
    assert losses[0]["sft/learning_rate"] == pytest.approx(5e-3)
    assert after < before - 0.2, (before, after)  # measured: 5.55 -> 5.25 nats per token
    assert losses[-1]["sft/loss"] < losses[0]["sft/loss"]


def test_a_run_reports_sft_steps_then_dpo_steps_from_the_sft_model(tiny_lm, tmp_path):
    base_steps: list[dict] = []
    trainer.train(tiny_lm, PAIRS, small_config(epochs=1), tmp_path / "v0",
                  on_step=base_steps.append)  # fmt: skip
    chosen = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]
    config = small_config(epochs=1, sft_epochs=3)  # 8 examples, 4 per step: 6 SFT steps
    steps: list[dict] = []
    result = trainer.train(tiny_lm, PAIRS, config, tmp_path / "v1", sft_examples=chosen,
                           on_step=steps.append)  # fmt: skip
    stage = [s for s in steps if "sft/loss" in s]
    dpo = [s for s in steps if "loss" in s]
    assert steps == stage + dpo and len(stage) == 6 and len(dpo) == 2  # SFT first, then DPO
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert {s["total_steps"] for s in steps} == {8}
    assert stage[-1]["sft/epoch"] == 3.0 and stage[-1]["sft/loss"] < stage[0]["sft/loss"]
    assert set(stage[0]) >= {"sft/loss", "sft/learning_rate", "sft/grad_norm", "step"}
    # DPO's reference is the SFT'd policy: its first step starts at log 2, no margin ...
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert dpo[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    # ... though the policy moved: the chosen answers are likelier than under the base
    assert dpo[0]["logps/chosen"] > base_steps[0]["logps/chosen"] + 1.0
    assert result.history == steps
    assert result.metrics["sft_steps"] == 6 and result.metrics["steps"] == 2
    saved = json.loads((result.adapter_dir / "metrics.json").read_text())
    assert saved["sft/loss"] == result.metrics["sft/loss"]
    assert result.config.sft_learning_rate == result.config.learning_rate  # the default


def test_sft_settings_that_disagree_are_clear_errors(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="sft_epochs is 2 but there are no SFT examples"):
        trainer.train(tiny_lm, PAIRS, small_config(sft_epochs=2), tmp_path / "a")
    with pytest.raises(ValueError, match="3 SFT examples but sft_epochs is 0"):
        trainer.train(tiny_lm, PAIRS, small_config(), tmp_path / "b", sft_examples=REWRITES)
    bad = [{"prompt": "Hi.", "completion": "  "}]
    with pytest.raises(ValueError, match='row 1: expected a non-empty "completion" string'):
        trainer.train(tiny_lm, PAIRS, small_config(sft_epochs=1), tmp_path / "c",
                      sft_examples=bad)  # fmt: skip
    with pytest.raises(ValueError, match="sft_epochs must be a whole number >= 0"):
        TrainConfig(sft_epochs=-1)
    with pytest.raises(ValueError, match="sft_learning_rate must be in"):
        TrainConfig(sft_learning_rate=2.0)
    assert TrainConfig(learning_rate=1e-3).sft_learning_rate == 1e-3
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_cli_trains_an_sft_stage_first(tiny_model_dir, tmp_path, capsys):
    pairs = _write(tmp_path / "pairs.jsonl", PAIRS)
    examples = _write(tmp_path / "sft.jsonl", REWRITES)
    model = ["--model", str(tiny_model_dir), "--dtype", "fp32", "--lora-r", "4"]
    args = ["train", "--pairs", pairs, "--epochs", "1", "--max-length", "96", *model]
    assert main([*args, "--out", str(tmp_path / "v1"), "--sft", examples, "--sft-epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "sft/loss" in out and "sft_steps" in out
    config = json.loads((tmp_path / "v1" / "train_config.json").read_text())
    assert config["sft_epochs"] == 2
    # the two flags go together; a bad row is named; nothing is loaded or written
    assert main([*args, "--out", str(tmp_path / "v2"), "--sft", examples]) == 2
    assert "error: --sft needs --sft-epochs N" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "v2"), "--sft-epochs", "1"]) == 2
    assert "error: sft_epochs is 1 (--sft-epochs or --config) but no --sft" in (
        capsys.readouterr().err
    )
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "Hi."}])
    assert main([*args, "--out", str(tmp_path / "v2"), "--sft", bad, "--sft-epochs", "1"]) == 2
    assert f'error: {bad}: row 1: expected a non-empty "completion" string' in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "v2").exists()


@pytest.mark.slow
def test_two_processes_train_the_one_process_sft_then_dpo_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.dpo_core.test_distributed import ATOL, ENV, torchrun, train_args
    from tests.dpo_core.test_train_cli import write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    examples = _write(tmp_path / "sft.jsonl", [
        {"prompt": r["prompt"], "completion": r["chosen"]} for r in rows
    ])  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--epochs", "1", "--sft", examples, "--sft-epochs", "2")
    cmd = [sys.executable, *train_args(tiny_model_dir, pairs, one, *extra)]
    single = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = torchrun(2) + train_args(tiny_model_dir, pairs, two, *extra)
    double = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=False)
    assert double.returncode == 0, double.stderr[-3000:]
    a, b = (load_file(d / "adapter_model.safetensors") for d in (one, two))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=0)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    assert metrics[0]["sft_steps"] == metrics[1]["sft_steps"] == 4
    assert metrics[1]["sft/loss"] == pytest.approx(metrics[0]["sft/loss"], abs=1e-5)
