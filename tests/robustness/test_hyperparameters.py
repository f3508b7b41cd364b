"""Bad hyperparameters from the Train tab's fields: negative, zero, NaN, infinite, empty,
fractional or non-numeric values get "Invalid settings: <field> ..." and no run is created."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from app.train.service import TrainingService, TrainRequest
from app.train.tab import default_values, request_from_values
from storage import runs
from storage.db import open_db
from storage.io import import_pairs

NAN, INF = math.nan, math.inf

BAD = [
    # (field, value as the form sends it, words the message must contain)
    ("beta", -0.1, "beta must be a positive number"),
    ("beta", 0.0, "beta must be a positive number"),
    ("beta", NAN, "beta must be a positive number"),
    ("beta", INF, "beta must be a positive number"),
    ("learning_rate", -1e-5, "learning_rate must be in (0, 1)"),
    ("learning_rate", NAN, "learning_rate must be in (0, 1)"),
    ("learning_rate", INF, "learning_rate must be in (0, 1)"),
    ("label_smoothing", -0.2, "label_smoothing must be in [0, 0.5)"),
    ("label_smoothing", NAN, "label_smoothing must be in [0, 0.5)"),
    ("epochs", 0, "epochs must be a positive integer"),
    ("epochs", -3, "epochs must be a positive integer"),
    ("epochs", 2.5, "epochs must be a whole number"),
    ("epochs", NAN, "epochs must be a whole number"),
    ("batch_size", None, "batch size is empty"),
    ("batch_size", "four", "could not convert"),
    ("lora_r", 0, "lora r must be a positive integer"),
    ("max_length", -512, "max length must be a positive integer"),
    ("heldout_fraction", NAN, "held-out fraction must be between 0 and"),
    ("heldout_fraction", 0.9, "held-out fraction must be between 0 and"),
]


@pytest.fixture
def service(tmp_path: Path) -> TrainingService:
    db_url = f"sqlite:///{tmp_path / 'studio.db'}"
    sm = open_db(db_url)
    pairs = tmp_path / "pairs.jsonl"  # one usable pair, so only the settings can be the problem
    pairs.write_text('{"prompt": "Name a planet.", "chosen": "Mars.", "rejected": "A banana."}\n')
    with sm.begin() as s:
        import_pairs(s, pairs)
    svc = TrainingService(
        sm,
        db_url=db_url,
        data_dir=tmp_path,
        base_model="tiny",
        model_settings={"model": "tiny", "dtype": "fp32", "device": "cpu"},
    )
    svc.recover()
    return svc


def start_from_form(service: TrainingService, **changes) -> str:
    """What the Train button does with the form's values; returns the message shown."""
    values = {**default_values(), **changes}
    try:
        request = request_from_values(values)
    except (ValueError, TypeError) as err:
        return f"Invalid settings: {err}"
    result = service.start(request)
    assert not result.ok, result.message
    return result.message


@pytest.mark.parametrize(("field", "value", "words"), BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_hyperparameter_is_refused_before_any_run(service, field, value, words):
    message = start_from_form(service, **{field: value})
    assert message.startswith("Invalid settings: ")
    assert words in message, message
    with service.sm.begin() as s:
        assert runs.list_runs(s) == []


def test_valid_request_passes_validation():
    """The defaults the form starts with are accepted (so the refusals above are specific)."""
    request = request_from_values(default_values())
    assert isinstance(request, TrainRequest)
    request.validate()
