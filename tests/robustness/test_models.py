"""Bad model choices: an unknown model id, a directory that is not a model, a missing or
broken adapter directory. The user gets one line saying what to do, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.__main__ import main as app_main
from dpo_core.modeling import ModelLoadError, load_adapter, load_model


@pytest.fixture
def offline(monkeypatch):
    """No hub: fail at once instead of retrying a network that is not there."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_unknown_model_id_at_the_cli(offline, tmp_path: Path, capsys):
    rc = app_main(["--model", "no-such-org/no-such-model", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: could not load model 'no-such-org/no-such-model'")
    assert "HF_TOKEN" in err and "Traceback" not in err


@pytest.mark.parametrize("model", ["", "   "])
def test_empty_model_name(model: str):
    with pytest.raises(ModelLoadError, match="no model given"):
        load_model(model)


def test_directory_that_is_not_a_model(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"has no config\.json, so it is not a model"):
        load_model(str(tmp_path))


def test_missing_adapter_directory(tiny_lm, tmp_path: Path):
    with pytest.raises(ModelLoadError, match="not an adapter directory"):
        load_adapter(tiny_lm.model, tmp_path / "adapters" / "v7")


def test_adapter_directory_without_config(tiny_lm, tmp_path: Path):
    half = tmp_path / "v1"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"no adapter_config\.json"):
        load_adapter(tiny_lm.model, half)
