"""A saved version directory is a plain PEFT LoRA adapter that vLLM can serve unchanged
(`vllm serve BASE --enable-lora --lora-modules v1=DATA/adapters/v1`).

What the readers look at: PEFT reads `adapter_config.json` and `adapter_model.safetensors`.
vLLM's LoRA loader (`vllm.lora.peft_helper.PEFTHelper`, `vllm.lora.utils`) reads the same two
files and refuses an adapter with `r` above `--max-lora-rank` (default 16), `use_dora`,
`modules_to_save`, a bias other than "none", or a tensor name it cannot parse
(`base_model.model.<module>.lora_A.weight` / `lora_B.weight`), and a target module the model
does not have. Other files in the directory (our `train_config.json`, `metrics.json`, PEFT's
`README.md` model card) are read by neither and ignored.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file

from dpo_core import trainer
from dpo_core.config import TrainConfig
from dpo_core.modeling import LORA_TARGETS

SAVED_FILES = {
    "adapter_config.json",  # PEFT and vLLM
    "adapter_model.safetensors",  # PEFT and vLLM
    "README.md",  # PEFT's model card; ignored by both
    "train_config.json",  # ours: the resolved TrainConfig
    "metrics.json",  # ours: the final metrics
}
VLLM_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank
TENSOR_NAME = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?:A|B)\.weight")
PAIRS = [
    {"prompt": f"Tell me about {t}.", "chosen": f"{t} are lovely.", "rejected": "No."}
    for t in ("cats", "rain", "tea", "maps")
]


def check_servable_adapter(path: Path, base_model: str) -> dict:
    """Assert `path` holds what PEFT and vLLM read, and nothing they would refuse; returns
    the adapter config."""
    assert {p.name for p in path.iterdir()} == SAVED_FILES
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == base_model
    assert 0 < config["r"] <= VLLM_MAX_LORA_RANK and config["lora_alpha"] > 0
    assert set(config["target_modules"]) <= set(LORA_TARGETS)
    assert config["bias"] == "none" and not config.get("use_dora")
    assert not config.get("modules_to_save") and not config.get("use_rslora")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    modules = set()
    for name in tensors:
        match = TENSOR_NAME.fullmatch(name)
        assert match, f"vLLM cannot parse the tensor name {name}"
        modules.add(match["module"].rsplit(".", 1)[-1])
    assert modules == set(config["target_modules"])
    return config


def test_a_trained_version_is_a_plain_peft_adapter_vllm_can_serve(tiny_lm, tmp_path):
    config = TrainConfig(epochs=1, batch_size=4, max_length=96, lora_r=4, lora_alpha=8)
    out = trainer.train(tiny_lm, PAIRS, config, tmp_path / "v1").adapter_dir
    adapter = check_servable_adapter(out, tiny_lm.source)
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    assert set(adapter["target_modules"]) == set(LORA_TARGETS)
    assert PeftConfig.from_pretrained(str(out)).r == 4
    reloaded = PeftModel.from_pretrained(tiny_lm.model, str(out))
    saved = load_file(str(out / "adapter_model.safetensors"))
    lora = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert len(lora) == len(saved)
    for name, tensor in saved.items():  # PEFT's names carry the adapter name ("default")
        loaded = lora[name.replace(".weight", ".default.weight")]
        assert torch.equal(loaded, tensor), name


def test_the_default_rank_fits_vllms_default_max_lora_rank():
    assert TrainConfig().lora_r <= VLLM_MAX_LORA_RANK
