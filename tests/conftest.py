"""Shared fixtures: a tiny random Llama chat model (offline) and the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model directory holding a tiny random LlamaForCausalLM with a chat template."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_tiny_model(len(tiny_tokenizer))


@pytest.fixture
def tiny_lm(tiny_model_dir: Path):
    """The tiny model loaded through the same code path as any local directory (fp32, CPU)."""
    from dpo_core.modeling import load_model

    return load_model(str(tiny_model_dir), dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def embedded_lm():
    """The real embedded SmolLM2-135M-Instruct (converted once to the cache, then ~1 s)."""
    from dpo_core.modeling import load_model

    return load_model("embedded", device="cpu")
