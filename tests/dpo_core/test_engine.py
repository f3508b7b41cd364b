"""The shared decode loop: same answers alone or batched, rows of several versions in one batch,
limits with FIFO positions, chunked prefill, and faults that stay with their request."""

from __future__ import annotations

import threading

import pytest
import torch

from dpo_core.engine import EngineLimits, GenerationEngine, ModelLock, PrefillPacer, Waiting
from dpo_core.generation import AnswerGenerator, AnswerSpec, GenerationUpdate, SamplingParams
from dpo_core.modeling import LoraSettings, attach_lora

PROMPTS = ["Tell me about the sea.", "Hi", "Name three planets, please, and say why."]


def _engine(lm, **limits) -> GenerationEngine:
    generator = AnswerGenerator(lm, weights="none")
    generator.stop_ids = set()  # random weights: run every answer to its limit
    return GenerationEngine(generator, ModelLock(), EngineLimits(**limits))


def _specs(n_tokens: int, seed: int = 0, adapter: str | None = None) -> list[AnswerSpec]:
    params = [SamplingParams(0.7, 0.95, n_tokens), SamplingParams(1.0, 1.0, n_tokens + 3)]
    return [AnswerSpec(p, seed + i, adapter) for i, p in enumerate(params)]


def _two_adapters(lm) -> None:
    model = attach_lora(lm.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    model.add_adapter("v2", model.peft_config["default"])
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    lm.model = model.eval()


def _final(ticket) -> GenerationUpdate:
    return ticket.result()


def test_a_request_gets_the_same_tokens_alone_and_beside_others(tiny_lm):
    _two_adapters(tiny_lm)
    engine = _engine(tiny_lm)
    jobs = [
        (PROMPTS[i % 3], _specs(8 + 3 * i, seed=10 * i, adapter=a))
        for i, a in enumerate(["base", "v2", None, "default", "base"])
    ]
    alone = [engine.generate(prompt, specs).texts for prompt, specs in jobs]
    tickets = [engine.submit(prompt, specs) for prompt, specs in jobs]
    together = [_final(t).texts for t in tickets]
    assert together == alone
    assert engine.stats.rows / engine.stats.steps > 2  # they really shared steps
    # ... and the loop agrees with the one-request generator
    generator = AnswerGenerator(tiny_lm, weights="none")
    generator.stop_ids = set()
    assert [generator.generate(p, s).texts for p, s in jobs] == alone
    engine.close()


def test_rows_of_different_versions_share_a_batch(tiny_lm):
    _two_adapters(tiny_lm)
    engine = _engine(tiny_lm)
    greedy = SamplingParams(0, 1.0, 10)
    specs = [AnswerSpec(greedy, 1, adapter=a) for a in ("base", "v2", "default")]
    got = engine.generate(PROMPTS[0], specs)
    assert got.done and len(set(got.texts)) == 3  # each row answered with its own version
    engine.close()


def test_finished_rows_leave_and_each_request_streams(tiny_lm):
    engine = _engine(tiny_lm)
    short, long = engine.submit("Hi", _specs(3)), engine.submit("Hello", _specs(40))
    events = list(short.updates())
    assert isinstance(events[-1], GenerationUpdate) and events[-1].token_counts == [3, 6]
    final = _final(long)
    assert final.token_counts == [40, 43] and final.done
    assert engine.waiting() == 0
    engine.close()


def test_beyond_the_limits_requests_wait_first_in_first_out(tiny_lm):
    engine = _engine(tiny_lm, max_rows=2)
    engine.lock.acquire()  # someone else holds the model: nothing is admitted yet
    try:
        streams = [engine.submit(p, _specs(5)).updates() for p in PROMPTS]
        assert [next(s) for s in streams[1:]] == [Waiting(2), Waiting(3)]
        busy = next(e for e in streams[0] if e != Waiting(1))
        assert busy == Waiting(1, model_busy=True)  # next, but the model is held
    finally:
        engine.lock.release()
    seen = [[e.position for e in s if isinstance(e, Waiting)] for s in streams[1:]]
    assert all(p == sorted(p, reverse=True) for p in seen)  # positions only go down
    assert engine.waiting() == 0
    engine.close()


def test_an_abandoned_request_frees_its_rows(tiny_lm):
    engine = _engine(tiny_lm, max_rows=2)
    first = engine.submit("Hello", _specs(5000 // 4))
    updates = first.updates()
    next(updates)
    updates.close()  # the browser tab was closed
    assert _final(engine.submit("Hi", _specs(3))).done
    assert engine.waiting() == 0
    engine.close()


def test_an_error_fails_only_its_request(tiny_lm, monkeypatch):
    _two_adapters(tiny_lm)
    engine = _engine(tiny_lm)
    with pytest.raises(ValueError, match="unknown model version 'v9'"):
        engine.submit("Hi", _specs(3, adapter="v9"))
    fast = engine.generator.fast
    real = fast.lora_layers

    def broken(adapter: str):
        if adapter == "v2":
            raise RuntimeError("adapter v2 is corrupt")
        return real(adapter)

    monkeypatch.setattr(fast, "lora_layers", broken)
    good = engine.submit("Hello", _specs(20, adapter="default"))
    bad = engine.submit("Hi", _specs(3, adapter="v2"))
    with pytest.raises(ValueError, match="adapter v2 is corrupt"):
        _final(bad)
    assert _final(good).token_counts == [20, 23]
    engine.close()


def test_long_prompts_prefill_in_chunks_with_the_same_answer(tiny_lm):
    prompt = "A long prompt about the sea. " * 40  # ~1200 byte tokens
    whole = _engine(tiny_lm, prefill_chunk=4096)
    chunked = _engine(tiny_lm, prefill_chunk=100)
    greedy = [AnswerSpec(SamplingParams(0, 1.0, 10))]
    assert chunked.generate(prompt, greedy).texts == whole.generate(prompt, greedy).texts
    long = chunked.submit(prompt, _specs(5))
    short = chunked.submit("Hi", _specs(5))  # answered while the long prompt prefills
    order = []
    threads = [
        threading.Thread(target=lambda t=t, n=n: (_final(t), order.append(n)))
        for t, n in ((short, "short"), (long, "long"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert chunked.stats.steps > 0 and order[0] == "short"
    whole.close()
    chunked.close()


def test_a_version_switch_waits_for_a_step_and_running_rows_keep_their_version(tiny_lm):
    _two_adapters(tiny_lm)
    engine = _engine(tiny_lm)
    greedy = [AnswerSpec(SamplingParams(0, 1.0, 30), 1, adapter=None)]
    expected = engine.generate(PROMPTS[0], greedy).texts  # the active adapter: default
    ticket = engine.submit(PROMPTS[0], greedy)
    events = ticket.updates()
    next(e for e in events if isinstance(e, GenerationUpdate))
    with engine.lock:  # as VersionedModel.activate does
        tiny_lm.model.set_adapter("v2")
    assert _final(ticket).texts == expected
    assert engine.generate(PROMPTS[0], greedy).texts != expected  # new requests: v2
    engine.close()


@pytest.mark.embedded
def test_embedded_model_answers_alike_alone_and_batched():
    # In fp32. In bf16 (the default on AVX512-BF16 CPUs) a matmul's rounding depends on how many
    # rows it has, so a sampled answer may part ways after a few tokens (seen here, 2026-12-07).
    from dpo_core.modeling import load_model

    generator = AnswerGenerator(load_model("embedded", device="cpu", dtype="fp32"))
    engine = GenerationEngine(generator)
    jobs = [(p, _specs(24, seed=i)) for i, p in enumerate(PROMPTS)]
    alone = [engine.generate(p, s).texts for p, s in jobs]
    together = [_final(t).texts for t in [engine.submit(p, s) for p, s in jobs]]
    assert together == alone
    engine.close()


def test_a_prompt_beyond_the_admin_maximum_is_cut_with_a_notice(tiny_lm):
    engine = _engine(tiny_lm, max_prompt_tokens=40)
    got = engine.generate("A long prompt about the sea. " * 10, _specs(3))
    assert got.done and got.truncated and got.prompt_tokens <= 40
    assert "only its first" in (got.notice or "")
    assert "this server's limit (40 prompt tokens: --max-prompt-tokens)" in got.notice
    engine.close()


def _tiny_gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=1024)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_the_standard_path_batches_waiting_requests_with_the_same_answers(tiny_lm, architecture):
    from dataclasses import replace

    lm = (
        tiny_lm
        if architecture == "llama"
        else replace(tiny_lm, model=_tiny_gpt2(tiny_lm.tokenizer))
    )
    generator = AnswerGenerator(lm, fast=False)
    generator.stop_ids = set()
    engine = GenerationEngine(generator, ModelLock())
    jobs = [(p, _specs(6 + 2 * i, seed=i)) for i, p in enumerate(PROMPTS)]
    alone = [engine.generate(p, s) for p, s in jobs]
    steps, rows = engine.stats.steps, engine.stats.rows
    engine.lock.acquire()  # hold the loop so that all three are waiting when it admits them
    try:
        tickets = [engine.submit(p, s) for p, s in jobs]
    finally:
        engine.lock.release()
    together = [t.result() for t in tickets]
    assert [u.texts for u in together] == [u.texts for u in alone]
    assert {u.engine for u in together} == {"standard"}
    batched = (engine.stats.rows - rows) / (engine.stats.steps - steps)
    assert batched == 6  # one batch of six rows (finished rows idle along to the end)
    engine.close()


def test_a_prefetch_waits_behind_normal_requests_until_promoted(tiny_lm):
    from dpo_core.engine import PREFETCH

    engine = _engine(tiny_lm, max_rows=2)
    engine.lock.acquire()
    try:
        prefetch = engine.submit("Hi", _specs(3), priority=PREFETCH).updates()
        normal = engine.submit("Hello", _specs(3)).updates()
        assert next(normal).position == 1 and next(prefetch).position == 2
        engine.promote(prefetch_ticket := engine._pending[1].ticket)
        assert prefetch_ticket is engine._pending[0].ticket  # it came first
    finally:
        engine.lock.release()
    assert list(normal)[-1].done and list(prefetch)[-1].done
    engine.close()


def test_a_process_that_exits_while_the_loop_decodes_exits_cleanly(tiny_model_dir, tmp_path):
    """A daemon decode loop killed inside a torch op at interpreter exit aborted the process
    (exit 134, "terminate called without an active exception"); the loop is stopped first."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from dpo_core.modeling import load_model
from dpo_core.engine import EngineLimits, GenerationEngine, ModelLock
from dpo_core.generation import AnswerGenerator, AnswerSpec, GenerationUpdate, SamplingParams
lm = load_model({str(tiny_model_dir)!r}, dtype="fp32", device="cpu")
generator = AnswerGenerator(lm, weights="none")
generator.stop_ids = set()
engine = GenerationEngine(generator, ModelLock(), EngineLimits())
# Kept in a variable: a closed stream cancels its request, and the loop must still be busy.
stream = engine.submit("Hi", [AnswerSpec(SamplingParams(1.0, 1.0, 2000), 0)]).updates()
for event in stream:  # wait for the first streamed token: the loop is decoding now
    if isinstance(event, GenerationUpdate) and event.answers[0].token_count > 0:
        break
assert not event.done, "the answer finished before the process could exit mid-decode"
print("exiting mid-decode", event.answers[0].token_count)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exiting mid-decode" in result.stdout


def test_the_prefill_pacer_gives_prefill_a_third_of_the_time_while_others_decode():
    pacer = PrefillPacer(chunk=512)
    assert pacer.budget(decoding=True) == 512  # nothing measured yet
    pacer.prefilled(512, 2.0, decoding=False)  # 256 prompt tokens/s, alone: no debt
    assert pacer.budget(decoding=False) == 512  # nobody decodes: the whole chunk
    pacer.stepped(0.25)
    assert pacer.budget(decoding=True) == 64  # one 0.25 s step's worth
    pacer.prefilled(64, 0.25)  # 0.25 s of prefill is 0.5 s of debt (a third share), less
    assert pacer.budget(decoding=True) == 0  # the one step of credit: a decode-only turn
    pacer.stepped(0.25)
    assert pacer.budget(decoding=True) == 64  # paid: prefill again
    pacer.prefilled(64, 0.25)  # no credit this time: two decode-only turns
    pacer.stepped(0.25)
    assert pacer.budget(decoding=True) == 0
    pacer.stepped(0.25)
    assert pacer.budget(decoding=True) == 64
    for _ in range(30):
        pacer.stepped(0.01)
    assert pacer.budget(decoding=True) == PrefillPacer.MIN_CHUNK  # never less
    for _ in range(30):
        pacer.stepped(10.0)
    assert pacer.budget(decoding=True) == 512  # never more than the chunk
    pacer.prefilled(512, 100.0)
    assert pacer.budget(decoding=False) == 512  # nobody decodes: the debt does not matter
