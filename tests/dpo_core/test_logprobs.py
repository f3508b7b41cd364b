"""Completion log-probs: equal to log_softmax().gather() on full logits, in both batch layouts,
with the same gradients, and equal to TRL's tokenization and log-probs for the same pairs."""

from __future__ import annotations

import pytest
import torch

from dpo_core import data, logprobs
from dpo_core.logprobs import completion_logps

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five, I think. Or six?"},
    {"prompt": "Name a colour.", "chosen": "Blue, like the sky on a clear day.", "rejected": "No"},
    {"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello. How can I help you today, my friend?"},
]


@pytest.fixture
def model(tiny_model):
    tiny_model.lm_head.weight.requires_grad_(False)  # frozen, as under LoRA
    return tiny_model


@pytest.fixture
def tokenized(tiny_tokenizer):
    return data.tokenize_pairs(tiny_tokenizer, data.normalise_pairs(PAIRS), 256, 128).pairs


def plain_logps(model, pairs, pad_id):
    """The textbook computation: full logits, log_softmax, gather, mask the prompt and padding."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    rows += [(p.prompt_ids, p.rejected_ids) for p in pairs]  # [chosen; rejected]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (prompt, answer) in enumerate(rows):
        ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        attention[i, : len(prompt) + len(answer)] = 1
        completion[i, len(prompt) : len(prompt) + len(answer)] = 1
    logits = model(input_ids=ids, attention_mask=attention).logits  # (N, T, V)
    token = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
    return (token * completion[:, 1:]).sum(1)


@pytest.mark.parametrize("collate", [data.collate, data.collate_shared_prompt])
def test_equal_to_log_softmax_gather_with_equal_gradients(model, tokenized, collate, monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 5 * model.config.vocab_size)  # 5-row chunks
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])
    expected = plain_logps(model, tokenized, 3)
    (expected * weights).sum().backward()
    expected_grads = [p.grad.clone() for p in model.model.parameters()]
    model.zero_grad()

    batch = collate(tokenized, [0, 1, 2], pad_token_id=3)
    got, lengths = completion_logps(model, batch)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    expected_lengths = [len(p.chosen_ids) for p in tokenized]
    expected_lengths += [len(p.rejected_ids) for p in tokenized]
    assert lengths.tolist() == expected_lengths
    for p, g in zip(model.model.parameters(), expected_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_no_gradient_state_without_grad(model, tokenized):
    batch = data.collate_shared_prompt(tokenized, [0, 1, 2], 3)
    with torch.no_grad():
        logps, _ = completion_logps(model, batch)
    assert not logps.requires_grad


def test_training_the_head_is_refused(tiny_model, tokenized):
    batch = data.collate(tokenized, [0, 1, 2], 3)
    with pytest.raises(ValueError, match="training the LM head is not supported"):
        completion_logps(tiny_model, batch)


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    """TRL's DPOTrainer on the tiny model, fp32, CPU, tokenizing the same pairs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tests.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    conversational = [
        {
            "prompt": p["prompt"] if isinstance(p["prompt"], list)
            else [{"role": "user", "content": p["prompt"]}],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in PAIRS
    ]  # fmt: skip
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, bf16=False,
        report_to=[], max_length=256, per_device_train_batch_size=3,
        precompute_ref_log_probs=True,  # TRL computes the pairs' log-probs in its __init__
    )  # fmt: skip
    return DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(conversational),
        processing_class=tokenizer,
    )  # fmt: skip


def test_tokenization_matches_trl(trl_trainer, tokenized):
    theirs = list(trl_trainer.train_dataset)
    for ours, their in zip(tokenized, theirs, strict=True):
        assert ours.prompt_ids == their["prompt_ids"]
        assert ours.chosen_ids == their["chosen_ids"]
        assert ours.rejected_ids == their["rejected_ids"]


@pytest.mark.parametrize("collate", [data.collate, data.collate_shared_prompt])
def test_logps_match_trl(trl_trainer, collate):
    examples = list(trl_trainer.train_dataset)
    trl_batch = trl_trainer.data_collator(examples)
    their_chosen, their_rejected = trl_trainer.compute_ref_log_probs(trl_trainer.model, trl_batch)
    precomputed = [e["ref_chosen_logps"] for e in examples] + [
        e["ref_rejected_logps"] for e in examples
    ]
    pairs = [
        data.TokenizedPair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples
    ]
    batch = collate(pairs, [0, 1, 2], trl_trainer.processing_class.pad_token_id)
    trl_trainer.model.lm_head.weight.requires_grad_(False)
    with torch.no_grad():
        ours, _ = completion_logps(trl_trainer.model, batch)
    torch.testing.assert_close(
        ours, torch.cat([their_chosen, their_rejected]), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(ours, torch.tensor(precomputed), rtol=1e-5, atol=1e-4)
