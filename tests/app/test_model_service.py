"""The shared model's request line: positions while waiting, one generation at a time,
abandoned requests free the model, coalesced updates, errors reach the caller."""

from __future__ import annotations

import pytest

from app.serving.service import ModelService, Waiting
from app.serving.versions import VersionedModel
from dpo_core.generation import AnswerSpec, GenerationUpdate, SamplingParams


def _service(tiny_lm, **kwargs) -> ModelService:
    service = ModelService(VersionedModel(tiny_lm), **kwargs)
    service.versions.generator.stop_ids = set()  # random weights: run every answer to its limit
    return service


def _specs(n_tokens: int) -> list[AnswerSpec]:
    params = SamplingParams(max_new_tokens=n_tokens)
    return [AnswerSpec(params, seed=1), AnswerSpec(params, seed=2)]


def test_requests_wait_in_line_and_see_their_position(tiny_lm):
    service = _service(tiny_lm)
    service.versions.lock.acquire()  # the model is busy with something else (a comparison)
    try:
        first = service.stream("Hello", _specs(4))
        second = service.stream("Hi there", _specs(4))
        assert next(first) == Waiting(1, model_busy=True)  # next, but the model is busy
        assert next(second) == Waiting(1)  # one request ahead
        assert service.waiting() == 2
    finally:
        service.versions.lock.release()
    done_first = [e for e in first if isinstance(e, GenerationUpdate)]
    assert done_first[-1].done and done_first[-1].token_counts == [4, 4]
    rest = list(second)
    assert rest[-1].done and rest[-1].token_counts == [4, 4]
    assert service.waiting() == 0


def test_an_abandoned_request_frees_the_model(tiny_lm):
    service = _service(tiny_lm)
    first = service.stream("Hello", _specs(1000))
    assert isinstance(next(first), Waiting | GenerationUpdate)
    first.close()  # the browser tab was closed
    after = list(service.stream("Hi", _specs(3)))
    assert after[-1].done
    assert service.waiting() == 0


def test_updates_are_coalesced_but_first_and_last_always_come(tiny_lm):
    service = _service(tiny_lm, update_interval_s=3600)
    updates = [e for e in service.stream("Hello", _specs(30)) if isinstance(e, GenerationUpdate)]
    assert [u.token_counts for u in updates] == [[1, 1], [30, 30]]


def test_errors_reach_the_caller(tiny_lm):
    service = _service(tiny_lm)
    with pytest.raises(ValueError, match="prompt is empty"):
        service.stream("  ", _specs(2))
    with pytest.raises(ValueError, match="unknown model version 'v7'"):
        list(service.stream("Hello", [AnswerSpec(adapter="v7")]))
    assert service.waiting() == 0
    assert list(service.stream("Hello", _specs(2)))[-1].done  # the line still works
