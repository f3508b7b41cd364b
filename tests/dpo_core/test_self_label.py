"""Self-labels: scorers' closed forms, calibration on people's labels, and the CLI end to end
on a tiny random model with a real LoRA adapter."""

from __future__ import annotations

import json

import pytest
import torch

from dpo_core.__main__ import main
from dpo_core.self_label import (
    MIN_CALIBRATION_PAIRS,
    REWARD_MODEL,
    AnswerPair,
    LogRatios,
    answer_features,
    calibrate,
    fit_reward_head,
    fit_reward_model,
    keep_labels,
    log_ratios,
    margins,
    signed_margins,
)
from tests.tiny import save_random_adapter

PROMPTS = [f"Name {i} things you like about the number {i}." for i in range(12)]


def test_each_scorer_is_its_closed_form():
    ratios = LogRatios(
        first=torch.tensor([2.0, -1.0]),
        second=torch.tensor([1.0, 3.0]),
        first_tokens=torch.tensor([4, 2]),
        second_tokens=torch.tensor([1, 6]),
    )
    assert margins(ratios, "margin").tolist() == [1.0, -4.0]
    assert margins(ratios, "per-token").tolist() == pytest.approx([2 / 4 - 1, -1 / 2 - 3 / 6])
    mean = (2 - 1 + 1 + 3) / (4 + 2 + 1 + 6)  # the version's per-token log-ratio
    expected = [1.0 - mean * (4 - 1), -4.0 - mean * (2 - 6)]
    assert margins(ratios, "centered").tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown scorer"):
        margins(ratios, "vibes")


def test_too_few_people_labels_trust_nothing():
    threshold = calibrate([5.0] * (MIN_CALIBRATION_PAIRS - 1))
    assert threshold.value is None
    assert f"at least {MIN_CALIBRATION_PAIRS}" in threshold.reason


def test_the_threshold_is_the_smallest_margin_where_people_agree_90_percent():
    # By |margin|: right on the 9 surest, wrong at 2.5, right at 2, wrong at 1.5, right at 1.
    agreeing = [9.0, 8.0, 7.0, 6.0, 5.0, 4.5, 4.0, 3.5, 3.0, -2.5, 2.0, -1.5, 1.0]
    threshold = calibrate(agreeing)
    # top 10: 9/10; top 11: 10/11 (the smallest margin at >= 0.9); top 12: 10/12; top 13: 11/13
    assert (threshold.value, threshold.support) == (2.0, 11)
    assert threshold.agreement == pytest.approx(10 / 11)
    assert calibrate(agreeing, target=0.95).value == 3.0  # only the 9 surest reach 95 %


def test_a_scorer_that_disagrees_with_people_labels_nothing():
    threshold = calibrate([-3.0, 2.0, -1.0, 0.5, -0.2, 0.1, -4.0, 1.5, -2.2, 0.3])
    assert threshold.value is None
    assert "no self-labels" in threshold.reason


def test_kept_pairs_put_the_preferred_answer_first_and_skip_identical_ones():
    pairs = [AnswerPair("p", "a", "b"), AnswerPair("q", "c", "d"), AnswerPair("r", "e", "e")]
    pairs.append(AnswerPair("s", " ", "f"))  # an answer that ended at once: no label
    kept = keep_labels(pairs, torch.tensor([-2.0, 0.5, 9.0, 9.0]), threshold=1.0, weight=0.5)
    assert [(k.prompt, k.chosen, k.rejected, k.margin) for k in kept] == [("p", "b", "a", 2.0)]
    assert kept[0].weight == 0.5


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return save_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("v1") / "v1")


def agreeing_calibration(tiny_model_dir, adapter_dir, path):
    """People's pairs on which the margin scorer agrees with them every time."""
    from dpo_core.modeling import load_model

    lm = load_model(str(tiny_model_dir), dtype="fp32", device="cpu", adapter=adapter_dir)
    pairs = [
        AnswerPair(p, f"Answer one to {p}", f"Another, longer answer to {p}!") for p in PROMPTS
    ]
    return write_agreeing(path, pairs, margins(log_ratios(lm, pairs), "margin").tolist())


def write_agreeing(path, pairs, signed):
    """Pairs as people's labels that agree with the signed margins everywhere."""
    with path.open("w") as f:
        for pair, m in zip(pairs, signed, strict=True):
            chosen, rejected = (pair.first, pair.second) if m > 0 else (pair.second, pair.first)
            f.write(json.dumps({"prompt": pair.prompt, "chosen": chosen, "rejected": rejected}))
            f.write("\n")
    return path


def train_reads(out, rows, tiny_model_dir, tmp_path):
    """`dpo_core train --pairs` reads the self-labels as written."""
    if not rows:  # a tiny random model may answer alike or below the threshold everywhere
        pytest.skip("no pair above the threshold on this tiny model")
    train = ["train", "--pairs", str(out), "--out", str(tmp_path / "v2")]
    train += ["--model", str(tiny_model_dir), "--dtype", "fp32", "--device", "cpu"]
    assert main([*train, "--epochs", "1"]) == 0
    assert (tmp_path / "v2" / "adapter_config.json").exists()


def test_the_cli_writes_pairs_that_train_reads(tiny_model_dir, adapter_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:6]) + "\n")
    calib = agreeing_calibration(tiny_model_dir, adapter_dir, tmp_path / "people.jsonl")
    out = tmp_path / "self.jsonl"
    args = ["self-label", "--base", str(tiny_model_dir), "--adapter", str(adapter_dir)]
    args += ["--prompts", str(prompts), "--out", str(out), "--calibrate", str(calib)]
    args += ["--threshold", "auto", "--max-new-tokens", "12", "--dtype", "fp32"]
    assert main([*args, "--device", "cpu", "--weight", "0.5"]) == 0
    assert "agrees with people on 12 of the 12" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        assert {"prompt", "chosen", "rejected", "margin", "weight"} <= row.keys()
        assert row["annotator"] == "self:v1" and row["weight"] == 0.5 and row["margin"] > 0
    train_reads(out, rows, tiny_model_dir, tmp_path)


def test_no_self_labels_without_people_labels_on_the_versions_answers(
    tiny_model_dir, adapter_dir, tmp_path, capsys
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:3]) + "\n")
    out = tmp_path / "self.jsonl"
    args = ["self-label", "--base", str(tiny_model_dir), "--adapter", str(adapter_dir)]
    args += ["--prompts", str(prompts), "--out", str(out), "--device", "cpu"]
    assert main(args) == 2
    assert "--calibrate" in capsys.readouterr().err
    assert not out.exists()
    # People who disagree with the version everywhere: it is trusted nowhere, writes nothing.
    calib = agreeing_calibration(tiny_model_dir, adapter_dir, tmp_path / "people.jsonl")
    flipped = tmp_path / "flipped.jsonl"
    rows = [json.loads(line) for line in calib.read_text().splitlines()]
    flipped.write_text(
        "".join(
            json.dumps(r | {"chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows
        )
    )
    assert main([*args, "--calibrate", str(flipped), "--dtype", "fp32"]) == 1
    captured = capsys.readouterr()
    assert "no self-labels" in captured.out and "no pairs written" in captured.err
    assert not out.exists()


# --- the reward-model scorer -----------------------------------------------------------------


def test_the_reward_head_fits_separable_toy_pairs():
    generator = torch.Generator().manual_seed(0)
    rejected = torch.randn(24, 10, generator=generator, dtype=torch.float64)
    chosen = torch.randn(24, 10, generator=generator, dtype=torch.float64)
    chosen[:, 3] = rejected[:, 3] + 1.0 + torch.rand(24, generator=generator)  # the signal
    head = fit_reward_head(chosen, rejected)
    assert head.fit_pairs == 24 and head.fit_accuracy == 1.0
    assert (head.scores(chosen) > head.scores(rejected)).all()
    assert head.weight.abs().argmax() == 3
    with pytest.raises(ValueError, match="people's pairs"):
        fit_reward_head(chosen[:0], rejected[:0])


def test_the_reward_head_reads_the_base_models_hidden_states(tiny_model_dir, adapter_dir):
    from dpo_core.modeling import load_model

    lm = load_model(str(tiny_model_dir), dtype="fp32", device="cpu", adapter=adapter_dir)
    features = answer_features(lm, PROMPTS[:2], ["one", "a longer answer"])
    hidden = lm.model.get_base_model().config.hidden_size
    assert features.shape == (2, 2 * hidden) and features.dtype == torch.float64
    plain = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")  # no adapter
    same = answer_features(plain, PROMPTS[:2], ["one", "a longer answer"])
    assert torch.allclose(features, same, atol=1e-5)  # the adapter is off: the base's states
    people = [AnswerPair(p, f"A list:\n- {p}\n- more", "no") for p in PROMPTS[:6]]
    head = fit_reward_model(lm, people)
    signed = signed_margins(lm, [*people[:2], AnswerPair("p", "no", "no")], REWARD_MODEL, head)
    assert signed[0] > 0 and signed[1] > 0 and signed[2] == 0
    with pytest.raises(ValueError, match="needs a head"):
        signed_margins(lm, people, REWARD_MODEL)


def test_the_cli_with_the_reward_model_writes_pairs_that_train_reads(
    tiny_model_dir, adapter_dir, tmp_path, capsys
):
    from dpo_core.modeling import load_model

    fit = [AnswerPair(p, f"Sure:\n- {p}\n- and more", "No.") for p in PROMPTS[:8]]
    fit_file = tmp_path / "fit.jsonl"
    fit_file.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "chosen": p.first, "rejected": p.second}) + "\n"
            for p in fit
        )
    )
    lm = load_model(str(tiny_model_dir), dtype="fp32", device="cpu", adapter=adapter_dir)
    head = fit_reward_model(lm, fit)
    calib_pairs = [AnswerPair(p, f"Answer one to {p}", f"Another answer: {p}!") for p in PROMPTS]
    signed = signed_margins(lm, calib_pairs, REWARD_MODEL, head).tolist()
    calib = write_agreeing(tmp_path / "people.jsonl", calib_pairs, signed)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:6]) + "\n")
    out = tmp_path / "self.jsonl"
    args = ["self-label", "--base", str(tiny_model_dir), "--adapter", str(adapter_dir)]
    args += ["--prompts", str(prompts), "--out", str(out), "--scorer", REWARD_MODEL]
    args += ["--max-new-tokens", "12", "--dtype", "fp32", "--device", "cpu"]
    assert main([*args, "--calibrate", str(calib)]) == 2  # no --fit: a clear error
    assert "--fit PAIRS.jsonl" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--calibrate", str(calib), "--fit", str(fit_file)]) == 0
    assert "agrees with people on 12 of the 12" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["scorer"] == REWARD_MODEL and r["margin"] > 0 for r in rows)
    train_reads(out, rows, tiny_model_dir, tmp_path)
