"""Model loading: embedded cache, local dirs, 4-bit, LoRA attach/save/reload, clear errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from dpo_core import modeling
from dpo_core.generation import SamplingParams, sample_answers
from dpo_core.modeling import LoraSettings, ModelLoadError, attach_lora, load_model


@pytest.mark.embedded
def test_embedded_model_loads_and_generates(embedded_lm):
    assert type(embedded_lm.model).__name__ == "LlamaForCausalLM"
    n_params = sum(p.numel() for p in embedded_lm.model.parameters())
    assert 130e6 < n_params < 140e6
    answers = sample_answers(
        embedded_lm, "Name three planets.", n=2, params=SamplingParams(max_new_tokens=24)
    )
    assert len(answers) == 2
    assert all(a.strip() for a in answers)


@pytest.mark.embedded
def test_embedded_cache_is_reused(embedded_lm, monkeypatch):
    cache = modeling.embedded_model_dir()
    weights = cache / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_gguf():
        raise AssertionError("the GGUF file must not be read again once the cache exists")

    monkeypatch.setattr(modeling, "embedded_gguf_path", no_gguf)
    again = load_model("embedded", device="cpu")
    assert again.info["path"] == str(cache)
    assert weights.stat().st_mtime_ns == mtime


def test_conversion_crash_leaves_no_cache(tmp_path, monkeypatch, tiny_tokenizer, tiny_model):
    """A crash while writing the converted model must not leave a (broken) cache behind."""
    import transformers

    def crash_midway(directory, *args, **kwargs):
        Path(directory, "config.json").write_text("{}")  # half-written output
        raise RuntimeError("simulated crash while writing weights")

    tiny_model.save_pretrained = crash_midway
    monkeypatch.setattr(modeling, "embedded_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer
    )
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        modeling.embedded_model_dir(tmp_path / "cache")
    parent = tmp_path / "cache" / "embedded"
    assert not (parent / modeling.EMBEDDED_NAME).exists()
    assert list(parent.iterdir()) == []  # temporary directory cleaned up


def test_local_directory_loads(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    assert lm.model.dtype == torch.float32
    assert lm.tokenizer.chat_template
    assert not lm.load_in_4bit


@pytest.mark.embedded
def test_4bit_on_cpu_is_smaller_and_generates(embedded_lm):
    q = load_model("embedded", device="cpu", load_in_4bit=True)
    assert q.load_in_4bit
    full_bytes = embedded_lm.model.get_memory_footprint()
    q_bytes = q.model.get_memory_footprint()
    assert q_bytes < 0.75 * full_bytes, (q_bytes, full_bytes)
    linear = q.model.model.layers[0].self_attn.q_proj
    assert type(linear).__name__ == "Linear4bit"
    answers = sample_answers(q, "Say hello.", n=1, params=SamplingParams(max_new_tokens=8))
    assert answers[0].strip()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_leaves_base_untouched_and_reloads_identically(tiny_lm, tmp_path):
    base = tiny_lm.model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = attach_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    for target in LoraSettings().target_modules:
        assert any(target in n for n in wrapped), target

    # One optimiser step so the adapter is not the identity (lora_B starts at zero).
    ids = torch.randint(0, 250, (2, 12))
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    peft_model.eval()
    tuned = _logits(peft_model, ids)
    with peft_model.disable_adapter():
        assert not torch.allclose(tuned, _logits(peft_model, ids))

    for name, tensor in peft_model.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(tensor, before[key]), name

    out = modeling.save_adapter(peft_model, tmp_path / "v1", extra={"config.json": {"r": 4}})
    assert (out / "adapter_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(FileExistsError):
        modeling.save_adapter(peft_model, out)

    fresh = load_model(str(tiny_lm.info["path"]), dtype="fp32", device="cpu", adapter=out)
    assert torch.allclose(_logits(fresh.model, ids), tuned, atol=1e-6)


def test_bad_model_id_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(ModelLoadError, match="not an adapter directory"):
        modeling.load_adapter(object(), tmp_path / "missing-adapter")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert modeling.resolve_dtype("fp32", cpu) == torch.float32
    expected = torch.bfloat16 if modeling.cpu_has_fast_bf16() else torch.float32
    assert modeling.resolve_dtype("auto", cpu) == expected
    with pytest.raises(ValueError, match="unknown dtype"):
        modeling.resolve_dtype("int3", cpu)


def test_lora_settings_validation():
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSettings(dropout=1.5)


def test_cli_help_runs():
    import subprocess
    import sys

    for module in ("app", "dpo_core"):
        res = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True,
            text=True,
            env={**os.environ},
            check=False,
        )
        assert res.returncode == 0, res.stderr
        assert "usage" in res.stdout


def test_bitsandbytes_kernel_warning_is_held_back_and_explained_once_for_cpu_4bit(
    caplog, monkeypatch
):
    """bitsandbytes' import-time "Failed to load CPU gemm_4bit_forward" warning is dropped;
    what it means is said once, and only when a 4-bit model runs on the CPU."""
    modeling.quiet_bitsandbytes()
    modeling.quiet_bitsandbytes()  # idempotent: one filter
    bnb_logger = logging.getLogger(modeling.BNB_CPU_LOGGER)
    assert bnb_logger.filters.count(modeling._KERNEL_WARNING) == 1
    monkeypatch.setattr(modeling._KERNEL_WARNING, "said", False)
    with caplog.at_level(logging.INFO):
        bnb_logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module"
        )
        bnb_logger.warning("another bitsandbytes warning")
    assert "gemm_4bit_forward" not in caplog.text
    assert "another bitsandbytes warning" in caplog.text  # only that one is held back
    cpu = torch.device("cpu")
    assert modeling.cpu_4bit_notice(False, cpu) is None
    assert modeling.cpu_4bit_notice(True, torch.device("cuda")) is None
    with caplog.at_level(logging.INFO):
        notice = modeling.cpu_4bit_notice(True, cpu)
    assert notice is not None and "slower" in notice and "pip install kernels" in notice
    assert notice in caplog.text  # said in the log
    assert modeling.cpu_4bit_notice(True, cpu) is None  # once
