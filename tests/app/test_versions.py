"""The served model's versions: adapters load into the shared weights and answer per row."""

from __future__ import annotations

import pytest
import torch

from app.serving.versions import BASE, VersionedModel
from dpo_core.config import TrainConfig
from dpo_core.generation import SamplingParams, chat_input_ids
from dpo_core.trainer import train

PAIRS = [
    {"prompt": f"Say something about {t}.", "chosen": f"{t} is nice!!", "rejected": "no"}
    for t in ("cats", "rain", "tea", "maps")
]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture
def adapter_dir(tiny_lm, tmp_path):
    config = TrainConfig(
        model="tiny",
        dtype="fp32",
        device="cpu",
        epochs=4,
        batch_size=2,
        learning_rate=5e-2,
        max_length=64,
        lora_r=4,
        lora_alpha=8,
    )  # fmt: skip  -- a large learning rate, so v1's greedy answers differ from the base's
    return train(tiny_lm, PAIRS, config, tmp_path / "v1").adapter_dir


def _hf_greedy(model, tokenizer, prompt: str) -> str:
    ids = chat_input_ids(tokenizer, prompt)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_each_row_answers_with_its_own_version(tiny_lm, adapter_dir):
    models = VersionedModel(tiny_lm)
    fast = models.generator.fast
    models.ensure_loaded("v1", str(adapter_dir))
    assert models.loaded() == [BASE, "v1"]
    assert models.generator.fast is fast is not None  # the packed weights were kept, not rebuilt
    prompt = "Say something about tea."
    base, v1 = models.generate(prompt, [BASE, "v1"], seed=0, params=GREEDY).texts
    model = models.lm.model  # now a PeftModel around the same base weights
    with model.disable_adapter():
        assert base == _hf_greedy(model, tiny_lm.tokenizer, prompt)
    model.set_adapter("v1")
    assert v1 == _hf_greedy(model, tiny_lm.tokenizer, prompt)
    assert v1 != base


def test_activate_switches_the_default_version(tiny_lm, adapter_dir):
    models = VersionedModel(tiny_lm)
    assert models.active == BASE
    models.activate("v1", str(adapter_dir))
    assert models.active == "v1"
    assert models.lm.model.active_adapter == "v1"
    models.ensure_loaded("v1", str(adapter_dir))  # loading twice is a no-op
    assert models.loaded() == [BASE, "v1"]


def test_a_missing_adapter_directory_is_a_clear_error(tiny_lm, tmp_path):
    models = VersionedModel(tiny_lm)
    with pytest.raises(ValueError, match=r"v9: its adapter directory .* is missing"):
        models.ensure_loaded("v9", str(tmp_path / "gone"))
    assert models.loaded() == [BASE]
