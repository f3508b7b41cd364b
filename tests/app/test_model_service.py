"""The shared model's service: positions while waiting, requests batched together, abandoned
requests free their rows, coalesced updates, errors reach the caller."""

from __future__ import annotations

import pytest

from app.serving.service import ModelService, Waiting
from app.serving.versions import VersionedModel
from dpo_core.engine import EngineLimits
from dpo_core.generation import AnswerSpec, GenerationUpdate, SamplingParams


def _service(tiny_lm, limits: EngineLimits | None = None, **kwargs) -> ModelService:
    service = ModelService(VersionedModel(tiny_lm, limits=limits), **kwargs)
    service.versions.generator.stop_ids = set()  # random weights: run every answer to its limit
    return service


def _specs(n_tokens: int) -> list[AnswerSpec]:
    params = SamplingParams(max_new_tokens=n_tokens)
    return [AnswerSpec(params, seed=1), AnswerSpec(params, seed=2)]


def test_requests_wait_in_line_and_see_their_position(tiny_lm):
    service = _service(tiny_lm, EngineLimits(max_rows=2))  # one pair at a time
    service.versions.lock.acquire()  # the model is busy with something else (a version switch)
    try:
        first = service.stream("Hello", _specs(4))
        second = service.stream("Hi there", _specs(4))
        assert next(second) == Waiting(2)  # one request ahead
        assert next(e for e in first if e != Waiting(1)) == Waiting(1, model_busy=True)
        assert service.waiting() == 2
    finally:
        service.versions.lock.release()
    done_first = [e for e in first if isinstance(e, GenerationUpdate)]
    assert done_first[-1].done and done_first[-1].token_counts == [4, 4]
    rest = list(second)
    assert rest[-1].done and rest[-1].token_counts == [4, 4]
    assert service.waiting() == 0


def test_two_requests_share_the_decode_loop(tiny_lm):
    service = _service(tiny_lm)
    first, second = service.stream("Hello", _specs(30)), service.stream("Hi", _specs(30))
    ends = [list(first)[-1], list(second)[-1]]
    assert all(e.done and e.token_counts == [30, 30] for e in ends)
    stats = service.versions.engine.stats
    assert stats.rows > 2 * stats.steps  # steps carried both requests' rows


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
    updates = [e for e in service.stream("Hello", _specs(100)) if isinstance(e, GenerationUpdate)]
    assert len(updates) == 2 and updates[-1].token_counts == [100, 100]
    assert updates[0].token_counts[0] < 100


def test_errors_reach_the_caller(tiny_lm):
    service = _service(tiny_lm)
    with pytest.raises(ValueError, match="prompt is empty"):
        service.stream("  ", _specs(2))
    with pytest.raises(ValueError, match="unknown model version 'v7'"):
        list(service.stream("Hello", [AnswerSpec(adapter="v7")]))
    assert service.waiting() == 0
    assert list(service.stream("Hello", _specs(2)))[-1].done  # the line still works


def test_reward_accuracy_in_chunks_equals_one_pass(tiny_lm, tiny_model_dir, tmp_path):
    from dpo_core.reward_eval import implicit_reward_accuracy
    from tests.tiny import save_random_adapter

    versions = VersionedModel(tiny_lm)
    versions.ensure_loaded("v1", str(save_random_adapter(tiny_model_dir, tmp_path / "v1")))
    pairs = [
        {"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i * 7}."}
        for i in range(11)
    ]
    chunked = versions.reward_accuracy(pairs, ["base", "v1"])["v1"]
    whole = implicit_reward_accuracy(tiny_lm, pairs, ["v1"])["v1"]
    assert chunked.pairs == whole.pairs == 11
    assert chunked.accuracy == pytest.approx(whole.accuracy)
    assert chunked.mean_margin == pytest.approx(whole.mean_margin, rel=1e-4, abs=1e-5)
