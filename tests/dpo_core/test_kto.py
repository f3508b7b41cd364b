"""KTO: the loss against TRL's KTOTrainer, unpaired rows and their KL completions, training on
the tiny model, and the CLI's errors for rows in the wrong format."""

from __future__ import annotations

import json
import logging
import math
import re
from types import SimpleNamespace

import pytest
import torch

from common.pair_format import PairError, parse_kto_rows
from dpo_core import data, trainer
from dpo_core.__main__ import main
from dpo_core.config import TrainConfig
from dpo_core.losses import KTOWeights, kto_balanced_weights, kto_loss, kto_weight_advice

# ---- the loss, against TRL's own KTOTrainer._compute_loss ----------------------------------


class _Gather:
    device = torch.device("cpu")

    def gather_for_metrics(self, t):
        return t


class _MetricLists(dict):
    def __missing__(self, key):
        self[key] = []
        return self[key]


def trl_kto(policy, ref, policy_kl, ref_kl, desirable, beta, wd, wu):
    """TRL's loss (the batch mean), its metrics and the gradient wrt the policy log-probs,
    from `KTOTrainer._compute_loss` with precomputed reference log-probs. The model double
    returns per-token log-probs (one scored token per row) equal to the given sequence
    log-probs: input ids of 1 are the answers, of 2 the KL completions."""
    from trl import KTOTrainer

    policy = policy.clone().requires_grad_(True)
    trainer_ = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Gather(), aux_loss_enabled=False,
        precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
        desirable_weight=wd, undesirable_weight=wu, _metrics={"train": _MetricLists()},
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    trainer_._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trainer_, m, b)

    def model(input_ids, **_):
        logps = policy if input_ids[0, 0] == 1 else policy_kl
        zeros = torch.zeros(len(logps), 1)
        return SimpleNamespace(log_probs=logps[:, None], entropy=zeros, mean_logits=zeros)

    b = len(policy)
    mask = torch.tensor([[0, 1]] * b)
    inputs = {
        "input_ids": torch.ones(b, 2, dtype=torch.long), "attention_mask": torch.ones(b, 2),
        "completion_mask": mask, "KL_input_ids": torch.full((b, 2), 2),
        "KL_attention_mask": torch.ones(b, 2), "KL_completion_mask": mask,
        "label": desirable, "ref_logps": ref, "ref_KL_logps": ref_kl,
    }  # fmt: skip
    loss = KTOTrainer._compute_loss(trainer_, model, inputs, False)
    loss.backward()
    return loss.detach(), trainer_._metrics["train"], policy.grad


BATCHES = {
    "mixed": [True, False, True, True, False, False],
    "all desirable": [True] * 5,
    "all undesirable": [False] * 4,
}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize(("wd", "wu"), [(1.0, 1.0), (1.33, 1.0), (0.5, 2.0)])
def test_parity_with_trl_kto_trainer(batch, beta, wd, wu):
    desirable = torch.tensor(BATCHES[batch])
    g = torch.Generator().manual_seed(len(desirable) + int(10 * beta))
    policy = -40 * torch.rand(len(desirable), generator=g) - 1
    ref = policy + torch.randn(len(desirable), generator=g)  # log-ratios around 0
    policy_kl = -40 * torch.rand(len(desirable), generator=g) - 1
    ref_kl = policy_kl - 0.5 * torch.randn(len(desirable), generator=g) - 0.3
    theirs, metrics, their_grad = trl_kto(policy, ref, policy_kl, ref_kl, desirable, beta, wd, wu)

    mine = policy.clone().requires_grad_(True)
    out = kto_loss(
        mine, ref, policy_kl, ref_kl, desirable,
        beta=beta, desirable_weight=wd, undesirable_weight=wu,
    )  # fmt: skip
    out.losses.mean().backward()
    torch.testing.assert_close(out.losses.mean(), theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mine.grad, their_grad, rtol=1e-5, atol=1e-8)
    assert out.kl.item() == pytest.approx(metrics["kl"][0], abs=1e-6)
    if desirable.any():
        assert out.rewards[desirable].mean().item() == pytest.approx(metrics["rewards/chosen"][0])
    if not desirable.all():
        rejected = out.rewards[~desirable].mean().item()
        assert rejected == pytest.approx(metrics["rewards/rejected"][0])


def test_hand_computed_values_and_the_reference_point():
    """Log-ratios +1 (desirable) and -1 (undesirable); KL completions drift by 0.4 and 0.2
    nats: z0 = 0.3, losses 1 - sigma(beta (1 - 0.3)) and 1 - sigma(beta (0.3 + 1))."""
    policy = torch.tensor([-10.0, -12.0], requires_grad=True)
    ref = torch.tensor([-11.0, -11.0])
    policy_kl, ref_kl = torch.tensor([-5.0, -6.0], requires_grad=True), torch.tensor([-5.4, -6.2])
    out = kto_loss(policy, ref, policy_kl, ref_kl, torch.tensor([True, False]), beta=0.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [1 - sig(0.5 * 0.7), 1 - sig(0.5 * 1.3)]
    torch.testing.assert_close(out.losses, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.rewards, torch.tensor([0.5, -0.5]))
    assert out.kl.item() == pytest.approx(0.3, abs=1e-6)
    out.losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # up with the desirable, down with the other
    assert policy_kl.grad is None  # z0 is detached: the KL completions get no gradient
    assert not out.rewards.requires_grad and not out.kl.requires_grad


def test_the_reference_point_is_clamped_at_zero():
    x = torch.tensor([-3.0, -4.0])
    out = kto_loss(x, x, x - 2, x, torch.tensor([True, False]), beta=1.0)
    assert out.kl.item() == 0.0
    torch.testing.assert_close(out.losses, torch.full((2,), 0.5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"desirable_weight": 0.0}, "kto_desirable_weight must be a positive number"),
        ({"undesirable_weight": float("nan")}, "kto_undesirable_weight must be a positive"),
        ({"desirable": torch.tensor([1, 0])}, "desirable must be a bool tensor"),
        ({"desirable": torch.tensor([True])}, "same 1-D shape"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, message):
    x = torch.zeros(2)
    args = {"desirable": torch.tensor([True, False])} | kwargs
    with pytest.raises(ValueError, match=message):
        kto_loss(x, x, x, x, **args)


def test_config_validates_the_kto_fields():
    config = TrainConfig(loss_type="kto", kto_desirable_weight=1.33)
    assert (config.kto_desirable_weight, config.kto_undesirable_weight) == (1.33, 1.0)
    with pytest.raises(ValueError, match="kto_undesirable_weight must be a positive number"):
        TrainConfig(loss_type="kto", kto_undesirable_weight=-1.0)
    with pytest.raises(ValueError, match=r"rpo_alpha .* does not apply to kto"):
        TrainConfig(loss_type="kto", rpo_alpha=1.0)
    with pytest.raises(ValueError, match="not used by loss_type 'kto'"):
        TrainConfig(loss_type="kto", label_smoothing=0.1)


# ---- rows: unpaired answers, pairs, KL completions ------------------------------------------

TOPICS = ("cats", "rain", "tea", "maps", "jazz", "salt", "bees", "snow")


def votes(topics=TOPICS) -> list[dict]:
    """Per prompt, a good answer labelled true and a curt one labelled false."""
    rows = []
    for t in topics:
        prompt = f"Tell me about {t}."
        rows.append({"prompt": prompt, "completion": f"Gladly! {t} are lovely.", "label": True})
        rows.append({"prompt": prompt, "completion": "No.", "label": False})
    return rows


def test_pairs_and_unpaired_rows_become_labelled_answers():
    user, answer = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hey"}
    rows = [
        {"prompt": "p", "chosen": "good", "rejected": "bad", "weight": 2},
        {"prompt": "q", "completion": "fine", "label": True},
        {"prompt": [user], "completion": [answer], "label": False},
        {"completion": [user, answer], "label": True, "weight": 0.5},
    ]
    out = parse_kto_rows(rows, "votes")
    assert [(e.prompt, e.completion, e.desirable, e.weight) for e in out] == [
        ("p", "good", True, 2.0), ("p", "bad", False, 2.0), ("q", "fine", True, 1.0),
        ("Hi?", "Hey", False, 1.0), ("Hi?", "Hey", True, 0.5),
    ]  # fmt: skip


def test_each_answer_gets_another_prompts_answer_as_its_kl_completion():
    rows = votes()
    normalised = data.normalise_kto(rows)
    assert [e["desirable"] for e in normalised] == [True, False] * len(TOPICS)
    partners = data.kl_partners([r["prompt"] for r in rows])
    assert all(rows[j]["prompt"] != rows[i]["prompt"] for i, j in enumerate(partners))
    for example, j in zip(normalised, partners, strict=True):
        assert example["rejected"][0]["content"] == rows[j]["completion"]
    # a random cycle, not the row order: the KL completions mix both kinds of answer, for
    # the desirable examples as for the undesirable ones
    for label in (True, False):
        kl_labels = {rows[j]["label"] for i, j in enumerate(partners) if rows[i]["label"] is label}
        assert kl_labels == {True, False}
    # distinct prompts: a permutation (every answer is a KL completion once)
    assert sorted(data.kl_partners([f"p{i}" for i in range(50)])) == list(range(50))
    same = data.kl_partners(["a", "a", "a"])  # no other prompt: another answer all the same
    assert sorted(same) == [0, 1, 2] and all(j != i for i, j in enumerate(same))
    assert data.kl_partners(["a"]) == [0]
    assert data.kl_partners([r["prompt"] for r in rows]) == partners  # seeded: the same again


def test_kto_keeps_an_answer_identical_to_its_kl_completion(tiny_tokenizer):
    rows = [
        {"prompt": f"Q{i}?", "completion": "Same answer.", "label": i % 2 == 0} for i in range(3)
    ]
    out = data.tokenize_pairs(tiny_tokenizer, data.normalise_kto(rows), 96, 48)
    assert len(out.pairs) == 3 and not out.dropped
    assert [p.desirable for p in out.pairs] == [True, False, True]


BAD_ROWS = [
    ([], "no examples"),
    ([{"prompt": "p", "completion": "a"}], "votes: row 1: 'label' must be true"),
    ([{"prompt": "p", "completion": "a", "label": "yes"}], "row 1: 'label' must be true"),
    ([{"prompt": "p", "completion": "a", "label": 1}], "got 1"),
    ([{"prompt": "p", "completion": " ", "label": True}], "row 1: 'completion' is empty"),
    ([{"completion": "a", "label": True}], "needs a 'prompt' string"),
    ([{"prompt": "p", "completion": 3, "label": True}], "'completion' must be text or a list"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "label": True}],
     "row 2: 'completion' must be text"),
]  # fmt: skip


@pytest.mark.parametrize(("rows", "message"), BAD_ROWS)
def test_bad_rows_are_named_in_the_error(rows, message):
    with pytest.raises(PairError, match=re.escape(message)):
        data.normalise_kto(rows, source="votes")


def test_a_pair_loss_refuses_unpaired_rows_with_a_hint():
    with pytest.raises(PairError, match="row 2: these rows are single answers with a label: use"):
        data.normalise_pairs([{"prompt": "p", "chosen": "a", "rejected": "b"}, votes()[0]])


# ---- training ------------------------------------------------------------------------------


def kto_config(**overrides) -> TrainConfig:
    values = dict(
        loss_type="kto", epochs=4, batch_size=4, learning_rate=5e-3, max_length=96, lora_r=4,
        lora_alpha=8, warmup_ratio=0.0, beta=0.5,
    )  # fmt: skip
    return TrainConfig(**(values | overrides))


def test_kto_training_raises_desirable_answers_over_undesirable_ones(tiny_lm, tmp_path):
    steps: list[dict] = []
    config = kto_config(eval_every=4, early_stopping=False, kl_prompts=1, kl_max_new_tokens=8)
    result = trainer.train(
        tiny_lm, votes(), config, tmp_path / "v1", heldout=votes(TOPICS[:4]), on_step=steps.append
    )
    assert result.adapter_dir is not None and len(steps) == 16  # 16 answers, 4 per step
    first, evals = steps[0], [s for s in steps if "eval/loss" in s]
    assert first["loss"] == pytest.approx(0.5, abs=1e-5)  # policy == reference, z0 = 0
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert result.metrics["loss"] < first["loss"] - 0.15  # the last epoch's mean
    # the desirable answers' log-probs rose relative to the reference, the undesirable ones'
    # fell, and the gap widened from one evaluation to the next (the held-out examples, 4 of
    # each kind, are scored together: eval/rewards/chosen is the desirable ones' mean)
    margins = [e["eval/rewards/margins"] for e in evals]
    assert len(evals) == 4 and margins == sorted(margins) and margins[0] > 0.5
    final = result.metrics
    assert final["eval/rewards/chosen"] > 0 > final["eval/rewards/rejected"]
    assert final["eval/rewards/accuracies"] == 1.0
    # eval/kl stays the KL readout; KTO's reference point is eval/kto_kl
    assert {"eval/kl", "eval/kto_kl"} <= set(final) and final["eval/kto_kl"] > 0


def test_kto_trains_on_pairs_too(tiny_lm, tmp_path):
    pairs = [
        {"prompt": f"Say something about {t}.", "chosen": f"{t} are fine.", "rejected": "Meh."}
        for t in TOPICS
    ]
    config = kto_config(epochs=1, heldout_fraction=0.5, min_heldout_pairs=2, kl_prompts=0)
    dataset = trainer.prepare_dataset(tiny_lm.tokenizer, pairs, config, "training")
    assert [p.desirable for p in dataset.pairs] == [True, False] * len(pairs)
    result = trainer.train(tiny_lm, pairs, config, tmp_path / "v1")
    held_out = 2 * len(pairs) - result.metrics["num_pairs"]  # whole prompts: both answers
    assert held_out > 0 and held_out % 2 == 0
    assert math.isfinite(result.metrics["loss"]) and "eval/rewards/accuracies" in result.metrics


def test_cli_trains_kto_and_explains_rows_in_the_wrong_format(tiny_model_dir, tmp_path, capsys):
    rows = tmp_path / "votes.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in votes()) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    no_label = tmp_path / "no_label.jsonl"
    no_label.write_text(json.dumps({"prompt": "p", "completion": "a", "label": None}) + "\n")
    base = ["--model", str(tiny_model_dir), "--dtype", "fp32", "--max-length", "96"]
    small = ["--epochs", "1", "--lora-r", "4", "--kl-prompts", "0"]
    cases = [
        (["--pairs", str(rows)], f"{rows}: row 1: these rows are single answers with a label: "
         "use --loss-type kto"),
        (["--pairs", str(no_label), "--loss-type", "kto"], f"{no_label}: row 1: 'label' must"),
        (["--pairs", str(pairs), "--heldout", str(no_label), "--loss-type", "kto"],
         "no_label.jsonl: row 1: 'label' must be true"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(["train", *args, "--out", str(tmp_path / "x"), *base]) == 2, args
        assert message in capsys.readouterr().err
    out = tmp_path / "v1"
    code = main(["train", "--pairs", str(rows), "--loss-type", "kto", "--out", str(out),
                 *base, *small])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["loss_type"] == "kto" and saved["kto_desirable_weight"] == 1.0


def test_balancing_weighs_the_rarer_class_up_and_is_idempotent():
    assert kto_balanced_weights(36, 234, 1.0, 1.0) == KTOWeights(6.5, 1.0)
    assert kto_balanced_weights(30, 10, 1.0, 1.0) == KTOWeights(1.0, 3.0)
    assert kto_balanced_weights(36, 234, 6.5, 1.0) == KTOWeights(6.5, 1.0)  # already balanced
    assert kto_balanced_weights(20, 10, 1.0, 0.5) == KTOWeights(1.0, 2.0)  # n_D wd = n_U wu
    assert kto_balanced_weights(0, 10, 1.0, 1.0) == KTOWeights(1.0, 1.0)  # one class: as given
    assert kto_weight_advice(36, 234, 6.5, 1.0) is None  # within TRL's advice


def test_kto_runs_balance_the_classes_by_default_and_say_so(tiny_lm, tmp_path, caplog):
    """Mostly "both bad" votes: far more undesirable answers than desirable ones. By default
    the run weighs the desirable ones up (docs/loop.md: unbalanced, the answers fell apart);
    with kto_balance off it keeps the weights and logs TRL's advice."""
    rows = votes() + [
        {"prompt": f"Tell me about {t}.", "completion": f"{t}? Hmm.", "label": False}
        for t in TOPICS
    ]  # 8 desirable, 16 undesirable
    config = kto_config(epochs=1, kl_prompts=0, early_stopping=False)
    with caplog.at_level(logging.INFO, logger="dpo_core.objective"):
        result = trainer.train(tiny_lm, rows, config, tmp_path / "v1", heldout=votes(TOPICS[:2]))
    assert (result.config.kto_desirable_weight, result.config.kto_undesirable_weight) == (2, 1)
    saved = json.loads((tmp_path / "v1" / "train_config.json").read_text())
    assert saved["kto_desirable_weight"] == 2.0 and saved["kto_balance"] is True
    assert "8 desirable and 16 undesirable answers, weighed 2 and 1 (kto_balance)" in caplog.text
    caplog.clear()
    off = kto_config(epochs=1, kl_prompts=0, early_stopping=False, kto_balance=False)
    with caplog.at_level(logging.INFO, logger="dpo_core.objective"):
        result = trainer.train(tiny_lm, rows, off, tmp_path / "v2", heldout=votes(TOPICS[:2]))
    assert (result.config.kto_desirable_weight, result.config.kto_undesirable_weight) == (1, 1)
    assert "set EITHER kto_desirable_weight in [2.0, 2.66]" in caplog.text


def test_unbalanced_classes_get_trls_advice_on_the_weights():
    advice = kto_weight_advice(30, 10, 1.0, 1.0)
    assert advice is not None
    assert "kto_desirable_weight in [0.33, 0.44] or kto_undesirable_weight in [2.26, 3.0]" in advice
    assert kto_weight_advice(30, 10, 1.0, 3.0) is None  # lambda_D n_D / (lambda_U n_U) = 1
    assert kto_weight_advice(10, 10, 1.0, 1.0) is None
