"""`python -m dpo_core train`: a JSONL file in, a PEFT adapter directory out; bad input is a
one-line error, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from peft import PeftModel

from dpo_core.__main__ import main
from dpo_core.modeling import load_model

TOPICS = ("cats", "rain", "tea", "maps", "jazz", "salt", "bees", "snow")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpo_core", "train", *args],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False,
    )  # fmt: skip


def write_pairs(path, n: int = 32):
    lines = [
        json.dumps({"prompt": f"Tell me about {TOPICS[i % 8]} #{i}.",
                    "chosen": f"Gladly! {TOPICS[i % 8]} are lovely.", "rejected": "No."})
        for i in range(n)
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trains_32_pairs_into_a_loadable_adapter(tiny_model_dir, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "adapters" / "v1"
    res = run_cli(
        "--pairs", str(pairs), "--out", str(out), "--model", str(tiny_model_dir),
        "--dtype", "fp32", "--epochs", "1", "--lora-r", "4", "--max-length", "96",
        "--heldout", str(pairs), "--loss-type", "ipo", "--beta", "0.5",
        "--kl-prompts-from", str(pairs), "--kl-prompts", "2",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "eval/kl" in res.stdout
    assert "rewards/accuracies" in res.stdout and "eval/rewards/accuracies" in res.stdout
    assert f"adapter saved to {out}" in res.stdout
    config = json.loads((out / "train_config.json").read_text())
    assert (config["loss_type"], config["beta"], config["lora_r"]) == ("ipo", 0.5, 4)
    lm = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    assert isinstance(PeftModel.from_pretrained(lm.model, str(out)), PeftModel)


def test_a_saved_config_is_a_starting_point_that_flags_override(tiny_model_dir, tmp_path):
    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps({"loss_type": "ipo", "beta": 0.5, "lora_r": 4, "epochs": 1}))
    code = main([
        "train", "--pairs", str(write_pairs(tmp_path / "pairs.jsonl", 4)),
        "--out", str(tmp_path / "v2"), "--model", str(tiny_model_dir), "--dtype", "fp32",
        "--config", str(saved), "--beta", "0.25",
    ])  # fmt: skip
    assert code == 0
    config = json.loads((tmp_path / "v2" / "train_config.json").read_text())
    assert (config["loss_type"], config["beta"], config["lora_r"]) == ("ipo", 0.25, 4)


def test_a_saved_config_starts_the_same_run_unless_a_flag_says_otherwise(tiny_model_dir, tmp_path):
    """The model, dtype, device and init adapter of a saved `train_config.json` are used as
    saved: no flag means no change (not the CLI's defaults: the embedded model, dtype auto)."""
    pairs = str(write_pairs(tmp_path / "pairs.jsonl", 4))
    saved = tmp_path / "saved.json"
    model = {"model": str(tiny_model_dir), "dtype": "fp32", "device": "cpu"}
    saved.write_text(json.dumps({**model, "epochs": 1, "lora_r": 4}))
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    assert main(["train", "--pairs", pairs, "--out", str(v1), "--config", str(saved)]) == 0
    first = json.loads((v1 / "train_config.json").read_text())
    assert {k: first[k] for k in model} == model
    again = tmp_path / "again.json"
    again.write_text(json.dumps({**first, "init_adapter": str(v1)}))
    flags = ["--config", str(again), "--beta", "0.25"]
    assert main(["train", "--pairs", pairs, "--out", str(v2), *flags]) == 0
    second = json.loads((v2 / "train_config.json").read_text())
    assert {k: second[k] for k in model} == model
    assert (second["init_adapter"], second["beta"], second["lora_r"]) == (str(v1), 0.25, 4)


def test_bad_input_gives_one_line_errors(tiny_model_dir, tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    base = ["--out", str(tmp_path / "v1"), "--model", str(tiny_model_dir)]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "", "rejected": "x"}\n')
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text('{"text": "hi"}\n')
    a_list = tmp_path / "list.json"
    a_list.write_text('["beta", 0.1]')
    cases = [
        (["--pairs", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--pairs", str(empty)], "no pairs"),
        (["--pairs", str(bad)], f"{bad}: row 1: 'chosen' is empty"),
        (["--pairs", str(pairs), "--beta", "0"], "beta must be a positive number"),
        (["--pairs", str(pairs), "--epochs", "0"], "epochs must be a positive integer"),
        (["--pairs", str(pairs), "--loss-type", "magic"], "unknown loss_type 'magic'"),
        (["--pairs", str(pairs), "--kl-prompts-from", str(empty)], "empty.jsonl: no prompts"),
        (["--pairs", str(pairs), "--kl-prompts-from", str(no_prompt)], "entry 1: expected a non"),
        (["--pairs", str(pairs), "--config", str(a_list)], "a config is a JSON object of"),
        (["--pairs", str(pairs), "--config", str(empty)], "empty.jsonl: cannot read a config"),
    ]
    for args, message in cases:
        assert main(["train", *args, *base]) == 2, args
        assert message in capsys.readouterr().err
    (tmp_path / "v1").mkdir()
    assert main(["train", "--pairs", str(pairs), *base]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list((tmp_path / "v1").iterdir()) == []


def test_errors_reach_the_shell_without_a_traceback(tmp_path):
    res = run_cli("--pairs", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "v1"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.jsonl'}: no such file"]


def test_a_run_without_4bit_prints_no_bitsandbytes_kernel_warning(tiny_model_dir, tmp_path):
    """peft imports bitsandbytes, which warned at import (on AVX512-BF16 CPUs) that its CPU
    4-bit kernel did not load from `kernels-community`: noise on every run, nothing is 4-bit."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    res = run_cli(
        "--pairs", str(pairs), "--out", str(tmp_path / "v1"), "--model", str(tiny_model_dir),
        "--dtype", "fp32", "--epochs", "1", "--lora-r", "4", "--max-length", "64",
        "--kl-prompts", "0",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "gemm_4bit_forward" not in res.stderr
    assert "kernels-community" not in res.stderr
