"""Paired generation: the fast decoder computes what the model computes, streaming, seeds,
independent parameters per answer, adapters per row, empty and huge prompts."""

from __future__ import annotations

import itertools

import pytest
import torch

from dpo_core.fast_llama import BASE, FastLlama
from dpo_core.generation import (
    AnswerGenerator,
    AnswerSpec,
    SamplingParams,
    chat_input_ids,
    sample_answers,
)
from dpo_core.modeling import LoraSettings, attach_lora
from dpo_core.packed_weights import quantize
from dpo_core.sampling import CANDIDATES, RowSampler

PROMPT = "Tell me about the sea."
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0, -1].float()


def test_fast_decoder_matches_the_model_forward(tiny_lm):
    """Prefill and cached decoding steps give the model's own logits (fp32, weights unpacked)."""
    model = tiny_lm.model
    ids = chat_input_ids(tiny_lm.tokenizer, PROMPT)[0]
    session = FastLlama(model, "none").session([BASE, BASE], max_len=ids.shape[0] + 8)
    logits = session.prefill(ids)
    assert torch.allclose(logits[0], _hf_logits(model, ids), atol=1e-5)
    seqs = [ids, ids]
    for step in range(3):
        tokens = torch.tensor([7 + step, 40 + step])
        seqs = [torch.cat([s, t[None]]) for s, t in zip(seqs, tokens, strict=True)]
        logits = session.step(tokens)
        for row in range(2):
            assert torch.allclose(logits[row], _hf_logits(model, seqs[row]), atol=1e-5)


def test_greedy_answers_equal_hf_generate(tiny_lm):
    ids = chat_input_ids(tiny_lm.tokenizer, PROMPT)
    with torch.no_grad():
        out = tiny_lm.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
        )
    expected = tiny_lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    for fast in (True, False):
        update = AnswerGenerator(tiny_lm, weights="none", fast=fast).generate(
            PROMPT, [AnswerSpec(GREEDY), AnswerSpec(GREEDY, seed=5)]
        )
        assert update.texts == [expected, expected]
        assert update.engine == ("fast" if fast else "standard")


def _two_adapters(tiny_lm):
    """The tiny model wrapped in PEFT with two random (non-identity) adapters, v1 and v2."""
    from peft import PeftModel

    model = attach_lora(tiny_lm.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    assert isinstance(model, PeftModel)
    model.add_adapter("v2", model.peft_config["default"])
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    model.eval()
    return model


def test_each_row_uses_its_own_adapter(tiny_lm):
    """One batch: row 0 = adapter v2, row 1 = base, row 2 = default; each matches PEFT."""
    model = _two_adapters(tiny_lm)
    ids = chat_input_ids(tiny_lm.tokenizer, PROMPT)[0]
    session = FastLlama(model, "none").session(["v2", BASE, "default"], ids.shape[0] + 4)
    session.prefill(ids)
    tokens = torch.tensor([11, 12, 13])
    logits = session.step(tokens)
    seq = [torch.cat([ids, t[None]]) for t in tokens]
    model.set_adapter("v2")
    assert torch.allclose(logits[0], _hf_logits(model, seq[0]), atol=1e-5)
    with model.disable_adapter():
        base = _hf_logits(model, seq[1])
    assert torch.allclose(logits[1], base, atol=1e-5)
    model.set_adapter("default")
    assert torch.allclose(logits[2], _hf_logits(model, seq[2]), atol=1e-5)
    assert not torch.allclose(logits[2], base, atol=1e-2)  # the adapter does change the answer


def test_versions_answer_the_same_prompt_and_seed_alike_on_both_engines(tiny_lm):
    """Version X vs version Y with the same seed: the adapter decides, the engines agree."""
    tiny_lm.model = _two_adapters(tiny_lm)
    specs = [AnswerSpec(GREEDY, 3, adapter=a) for a in ("base", "v2", None, "default")]
    fast = AnswerGenerator(tiny_lm, weights="none").generate(PROMPT, specs)
    slow = AnswerGenerator(tiny_lm, fast=False).generate(PROMPT, specs)
    assert fast.engine == "fast" and slow.engine == "standard"
    assert fast.texts == slow.texts
    assert fast.texts[0] != fast.texts[1]  # base and v2 differ
    assert fast.texts[2] == fast.texts[3]  # None: the active adapter
    with pytest.raises(ValueError, match="unknown model version 'v9'"):
        AnswerGenerator(tiny_lm).generate(PROMPT, [AnswerSpec(adapter="v9")])


def test_generator_follows_an_adapter_loaded_after_it_was_built(tiny_lm):
    generator = AnswerGenerator(tiny_lm, weights="none")
    base_answer = generator.generate(PROMPT, [AnswerSpec(GREEDY)]).texts
    peft_model = _two_adapters(tiny_lm)  # PEFT wraps the same base weights
    generator.rebind(peft_model)
    assert generator.fast is not None and generator.adapters() == ["default", "v2"]
    specs = [AnswerSpec(GREEDY, adapter="v2"), AnswerSpec(GREEDY, adapter="base")]
    got = generator.generate(PROMPT, specs).texts
    assert got == AnswerGenerator(tiny_lm, fast=False).generate(PROMPT, specs).texts
    assert got[1] == base_answer[0] != got[0]


def test_stream_grows_both_answers_token_by_token(tiny_lm):
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=20)
    generator = AnswerGenerator(tiny_lm)
    generator.stop_ids = set()  # random weights: make sure both answers run to the limit
    updates = list(generator.stream(PROMPT, [AnswerSpec(params, 1), AnswerSpec(params, 2)]))
    assert len(updates) == 20
    assert [u.token_counts for u in updates] == [[n, n] for n in range(1, 21)]
    assert not any(u.done for u in updates[:-1]) and updates[-1].done
    for row in range(2):
        texts = [u.texts[row] for u in updates[:-1]]
        assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # only ever grows
        assert updates[-1].answers[row].finish_reason == "length"
    assert updates[0].first_token_s == updates[-1].first_token_s <= updates[-1].elapsed_s


def test_seeds_reproduce_and_params_are_independent(tiny_lm):
    generator = AnswerGenerator(tiny_lm)
    generator.stop_ids = set()
    hot = SamplingParams(temperature=1.5, top_p=1.0, max_new_tokens=16)
    short = SamplingParams(temperature=0.7, top_p=0.5, max_new_tokens=5)
    first = generator.generate(PROMPT, [AnswerSpec(hot, 1), AnswerSpec(short, 2)])
    again = generator.generate(PROMPT, [AnswerSpec(hot, 1), AnswerSpec(short, 2)])
    assert first.texts == again.texts
    assert first.token_counts == [16, 5]
    # Row 0 does not depend on what it is batched with; a new seed gives a new answer.
    other = generator.generate(PROMPT, [AnswerSpec(hot, 1), AnswerSpec(GREEDY, 99)])
    assert other.texts[0] == first.texts[0]
    reseeded = generator.generate(PROMPT, [AnswerSpec(hot, 7), AnswerSpec(hot, 8)])
    assert reseeded.texts[0] != first.texts[0]
    assert reseeded.texts[0] != reseeded.texts[1]


def test_empty_prompt_is_refused_before_generating(tiny_lm):
    generator = AnswerGenerator(tiny_lm)
    for prompt in ("", "   \n\t"):
        with pytest.raises(ValueError, match="prompt is empty"):
            generator.stream(prompt, [AnswerSpec()])
    with pytest.raises(ValueError, match="at least one answer"):
        generator.stream(PROMPT, [])


def test_huge_prompt_is_cut_to_the_context_with_a_notice(tiny_lm):
    context = tiny_lm.model.config.max_position_embeddings
    params = SamplingParams(temperature=0.8, max_new_tokens=8)
    huge = "The sea is wide and deep. " * 4000  # 104,000 characters
    update = AnswerGenerator(tiny_lm).generate(huge, [AnswerSpec(params, 1), AnswerSpec(params, 2)])
    assert update.truncated
    assert context - 8 - 2 <= update.prompt_tokens <= context - 8
    assert "104,000 characters" in update.notice and "first" in update.notice
    assert all(0 < n <= 8 for n in update.token_counts)
    small = AnswerGenerator(tiny_lm).generate(PROMPT, [AnswerSpec(params)])
    assert not small.truncated and small.notice is None


def test_max_new_tokens_beyond_the_context_is_refused(tiny_lm):
    too_long = SamplingParams(max_new_tokens=tiny_lm.model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        AnswerGenerator(tiny_lm).stream(PROMPT, [AnswerSpec(too_long)])


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_sample_answers_keeps_its_simple_interface(tiny_lm):
    answers = sample_answers(tiny_lm, PROMPT, n=3, params=SamplingParams(max_new_tokens=6))
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


# --- packed weights ------------------------------------------------------------------------


def test_auto_keeps_the_plain_weight_where_packing_decodes_slower(monkeypatch):
    """On a CPU without fast int4/int8 kernels (AVX2-only) the plain matmul wins: keep it."""
    from dpo_core.packed_weights import packed_is_faster

    monkeypatch.setattr("dpo_core.packed_weights.packed_is_faster", lambda q, w: False)
    dense = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    assert quantize(dense, "auto") is None
    assert quantize(dense, "int8").kind == "int8"  # a forced format is kept regardless
    assert isinstance(packed_is_faster(quantize(dense, "int8"), dense), bool)


def test_weights_on_a_4bit_grid_pack_losslessly_others_to_int8(monkeypatch):
    monkeypatch.setattr("dpo_core.packed_weights.packed_is_faster", lambda q, w: True)
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 16, (64, 4, 32), generator=gen).float()
    levels[..., 0], levels[..., 1] = 0, 15  # like a Q4_1 block: its min and max are on the grid
    scale = torch.rand(64, 4, 1, generator=gen) * 0.01 + 0.001  # one per group of 32
    low = torch.randn(64, 4, 1, generator=gen) * 0.01
    on_grid = (levels * scale + low).view(64, 128)
    packed = quantize(on_grid, "auto")
    assert packed.kind == "int4"
    x = torch.randn(3, 128, generator=gen)
    assert torch.allclose(packed.matmul(x), x @ on_grid.t(), atol=1e-4)

    dense = torch.randn(64, 128, generator=gen)
    packed = quantize(dense, "auto")
    assert packed.kind == "int8"
    error = (packed.matmul(x) - x @ dense.t()).norm() / (x @ dense.t()).norm()
    assert error < 0.02
    assert quantize(dense, "none") is None


def test_packed_decoder_stays_close_to_the_exact_one(tiny_lm):
    ids = chat_input_ids(tiny_lm.tokenizer, PROMPT)[0]
    exact, packed = FastLlama(tiny_lm.model, "none"), FastLlama(tiny_lm.model, "int8")
    assert packed.weight_kinds()["qkv"] == "int8"
    outs = []
    for fast in (exact, packed):
        session = fast.session([BASE], ids.shape[0] + 2)
        session.prefill(ids)
        outs.append(session.step(torch.tensor([9])).log_softmax(-1))
    kl = torch.nn.functional.kl_div(outs[1], outs[0], log_target=True, reduction="sum")
    assert kl < 1e-3


# --- sampling --------------------------------------------------------------------------------


def _frequencies(logits: torch.Tensor, top_p: float, n: int) -> torch.Tensor:
    sampler = RowSampler([1.0], [top_p], [0])
    counts = torch.zeros(logits.shape[-1])
    for _ in range(n):
        counts[sampler(logits[None])[0]] += 1
    return counts / n


def test_top_p_samples_only_the_nucleus_in_proportion():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    freq = _frequencies(probs.log(), top_p=0.8, n=4000)
    assert freq[3] == 0 and freq[4] == 0  # outside the nucleus {0.5, 0.2, 0.15}
    assert torch.allclose(freq[:3], probs[:3] / 0.85, atol=0.03)
    full = _frequencies(probs.log(), top_p=1.0, n=4000)
    assert torch.allclose(full, probs, atol=0.03)


def test_nucleus_wider_than_the_candidates_is_exact():
    vocab = 4 * CANDIDATES
    freq = _frequencies(torch.zeros(vocab), top_p=0.5, n=3000)  # flat: nucleus = half the vocab
    assert int((freq > 0).sum()) > CANDIDATES
    assert int((freq > 0).sum()) <= vocab // 2


def test_greedy_rows_and_seeded_rows():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    sampler = RowSampler([0.0, 1.0], [1.0, 1.0], [0, 0])
    assert all(int(sampler(logits)[0]) == 1 for _ in range(20))
    draws = [RowSampler([1.0], [1.0], [42])(logits[:1]).item() for _ in range(2)]
    assert draws[0] == draws[1]


@pytest.mark.embedded
def test_embedded_model_answers_sensibly_on_the_fast_path(embedded_lm):
    generator = AnswerGenerator(embedded_lm)
    kinds = generator.fast.weight_kinds()
    # the embedded weights sit on a 4-bit grid (Q4_1 GGUF): packed losslessly to int4 where
    # that decodes faster on this CPU, else left as they are; never a lossy int8 copy
    assert kinds["qkv"] in ("int4", str(embedded_lm.model.dtype))
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    update = generator.generate(
        "What is the capital of France?", [AnswerSpec(greedy), AnswerSpec(SamplingParams(), 4)]
    )
    assert "Paris" in update.texts[0]
    assert update.texts[1].strip()
