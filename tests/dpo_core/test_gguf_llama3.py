"""GGUF export of Llama 3.1/3.2 models: their `llama3` rope scaling becomes llama.cpp's
`rope_freqs.weight`, equal to what transformers computes; other rope scalings are refused; and,
where `llama_cpp` is installed, llama.cpp reading the file picks transformers' greedy tokens,
past the original context too.

The tiny models have Llama 3.1's shape (llama3 scaling with factors 8 / 1 / 4, 4:1 GQA, untied
head, rope_theta 5e5, a context 16 times the original one). One keeps Llama 3.1's original
context of 8192; the other has 256, so the scaling matters in short inputs. With head_dim 32,
each has rotary pairs in all three bands: unscaled, blended and slowed by `factor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpo_core.export import ExportRequest, export_version, merge
from dpo_core.gguf_export import GgufExportError, check_llama, llama3_rope, llama3_rope_factors
from tests.dpo_core.test_export import bpe_tokenizer, save_sharpened
from tests.tiny import save_random_adapter

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
LLAMA31_ROPE |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# `original_max_position_embeddings` of the tiny models: a short one, and Llama 3.1's own.
ORIGINAL_CONTEXTS = (256, 8192)


def llama31_config(vocab_size: int, original_context: int, rope: dict | None = None):
    from transformers import LlamaConfig

    rope = rope or LLAMA31_ROPE | {"original_max_position_embeddings": original_context}
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,  # 4:1 grouped-query attention, as in Llama 3.1 8B
        max_position_embeddings=16 * original_context,  # 131072 = 16 * 8192 in Llama 3.1
        rope_parameters={"rope_theta": 500000.0, **rope},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


@dataclass(frozen=True)
class Exported:
    base: Path  # the tiny Llama 3.1 model directory
    adapter: Path  # a random LoRA on it
    gguf: Path  # base + adapter merged, as f32 GGUF
    original_context: int


@pytest.fixture(scope="module", params=ORIGINAL_CONTEXTS, ids=lambda n: f"original{n}")
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    tokenizer = bpe_tokenizer()  # llama.cpp needs merges
    torch.manual_seed(3)
    model = LlamaForCausalLM(llama31_config(len(tokenizer), request.param))
    base = save_sharpened(model, tokenizer, tmp_path_factory.mktemp("llama31"))
    adapter = save_random_adapter(base, tmp_path_factory.mktemp("ad") / "v1", seed=4)
    out = tmp_path_factory.mktemp("export") / "gguf"
    export = ExportRequest(str(base), adapter, "gguf", out, gguf_type="f32", version="v1")
    gguf_name = next(f for f in export_version(export).files if f.endswith(".gguf"))
    return Exported(base, adapter, out / gguf_name, request.param)


def transformers_inv_freqs(config) -> tuple[torch.Tensor, torch.Tensor]:
    """(default, llama3) inverse frequencies, each (head_dim // 2,), computed by transformers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    default, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    return default, scaled


def test_rope_freqs_are_transformers_llama3_scaling(exported: Exported):
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoConfig

    reader = GGUFReader(exported.gguf)
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = tensors["rope_freqs.weight"]
    assert rope_freqs.tensor_type == GGMLQuantizationType.F32
    default, scaled = transformers_inv_freqs(AutoConfig.from_pretrained(exported.base))
    expected = default / scaled  # llama.cpp divides each pair's frequency by its number
    assert torch.allclose(torch.from_numpy(rope_freqs.data.copy()), expected, rtol=1e-6)
    assert (expected == 1.0).any() and (expected == 8.0).any()
    assert ((expected > 1.0) & (expected < 8.0)).any()  # the blended band
    fields = reader.fields
    assert fields["llama.rope.freq_base"].contents() == 500000.0
    assert fields["llama.context_length"].contents() == 16 * exported.original_context
    assert fields["llama.rope.dimension_count"].contents() == 32
    assert fields["llama.attention.head_count"].contents() == 4
    assert fields["llama.attention.head_count_kv"].contents() == 1
    scaling_keys = [key for key in fields if key.startswith("llama.rope.scaling")]
    assert scaling_keys == []  # llama.cpp's converter writes none for llama3 either
    assert "output.weight" in tensors  # untied head


def test_rope_factors_read_transformers_4_rope_scaling_too():
    """A transformers 4 config keeps the numbers in `rope_scaling` and `rope_theta` beside it."""
    v4 = SimpleNamespace(model_type="llama", rope_scaling=LLAMA31_ROPE, rope_theta=500000.0)
    v5 = llama31_config(8, 8192)
    assert llama3_rope(v4) == llama3_rope(v5)
    default, scaled = transformers_inv_freqs(v5)
    factors = llama3_rope_factors(llama3_rope(v4), 500000.0, 32)
    assert torch.allclose(factors, default / scaled, rtol=1e-6)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
    ],
    ids=["yarn", "linear", "dynamic", "longrope"],
)
def test_other_rope_scalings_are_refused_in_words(rope):
    config = SimpleNamespace(model_type="llama", rope_scaling=rope)
    name = rope.get("rope_type", rope.get("type"))
    with pytest.raises(GgufExportError, match=rf"rope scaling is '{name}'.*Export `merged`"):
        check_llama(config)


def test_incomplete_llama3_scaling_is_refused():
    rope = {k: v for k, v in LLAMA31_ROPE.items() if k != "original_max_position_embeddings"}
    with pytest.raises(
        GgufExportError, match=r"without original_max_position_embeddings in its config: add them"
    ):
        check_llama(SimpleNamespace(model_type="llama", rope_scaling=rope))
    check_llama(SimpleNamespace(model_type="llama", rope_scaling=None))  # plain rotary: fine


STEPS = 24  # greedy tokens compared


def greedy(model, ids: list[int], steps: int) -> list[int]:
    """The `steps` tokens of highest logit after `ids`, end-of-text included (as llama.cpp's
    logits are read below), one forward per token with the KV cache."""
    tokens, past, x = list(ids), None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            out = model(x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            x = torch.tensor([tokens[-1:]])
    return tokens[len(ids) :]


def test_llama_cpp_picks_transformers_greedy_tokens(exported: Exported):
    """256 positions past the original context, where the scaled and the plain rope answer
    differently, llama.cpp reading the file agrees with transformers on the merged model."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    merged = merge(str(exported.base), exported.adapter).model.eval()
    generator = torch.Generator().manual_seed(5)
    length = exported.original_context + 256
    prompt = torch.randint(4, merged.config.vocab_size, (length,), generator=generator).tolist()
    want = greedy(merged, prompt, STEPS)
    llm = llama_cpp.Llama(
        model_path=str(exported.gguf),
        n_ctx=length + STEPS,
        n_threads=1,
        logits_all=True,  # keeps `scores` (one row of logits per position)
        verbose=False,
    )
    llm.eval(prompt)
    got = []
    for _ in range(STEPS):
        got.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval(got[-1:])
    assert got == want
    assert greedy(rope_without_scaling(merged), prompt, STEPS) != want  # the scaling matters


def rope_without_scaling(model):
    """A copy of `model` whose rotary embedding uses the unscaled frequencies."""
    import copy

    plain = copy.deepcopy(model)
    default, _ = transformers_inv_freqs(model.config)
    plain.model.rotary_emb.inv_freq.copy_(default)
    plain.model.rotary_emb.original_inv_freq = default
    return plain
