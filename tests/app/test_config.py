"""The app's settings: defaults and environment agree with the CLIs that share them."""

from __future__ import annotations

from pathlib import Path

from app.__main__ import build_parser, config_from_args
from app.config import AppConfig
from storage.db import default_url


def test_data_dir_follows_dpo_studio_data_however_the_config_is_made(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_STUDIO_DATA", str(tmp_path / "elsewhere"))
    assert AppConfig().data_dir == tmp_path / "elsewhere"
    assert config_from_args(build_parser().parse_args([])).data_dir == tmp_path / "elsewhere"
    assert AppConfig().resolved_db_url() == default_url(tmp_path / "elsewhere")
    monkeypatch.delenv("DPO_STUDIO_DATA")
    assert AppConfig().data_dir == Path("data")


def test_the_model_flags_are_the_ones_dpo_core_declares():
    """`python -m app` and `python -m dpo_core` get --model/--dtype/--load-in-4bit/--device
    from one function (dpo_core.modeling.add_model_args), so they take the same values."""
    from dpo_core.__main__ import build_parser as dpo_core_parser

    argv = ["--model", "m", "--dtype", "fp16", "--no-load-in-4bit", "--device", "cpu"]
    app = vars(build_parser().parse_args(argv))
    gen = vars(dpo_core_parser().parse_args(["generate", "--prompt", "p", *argv]))
    expected = {"model": "m", "dtype": "fp16", "load_in_4bit": False, "device": "cpu"}
    assert {k: app[k] for k in expected} == expected == {k: gen[k] for k in expected}
