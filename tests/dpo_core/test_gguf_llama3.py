"""GGUF export of Llama 3.1/3.2 models: their `llama3` rope scaling becomes llama.cpp's
`rope_freqs.weight`, equal to what transformers computes; other rope scalings are refused; and,
where `llama_cpp` is installed, llama.cpp reading the file picks transformers' greedy tokens,
past the original context too.

The tiny model has Llama 3.1's shape (llama3 scaling, 4:1 GQA, untied head, rope_theta 5e5) but
an original context of 256 positions instead of 8192, so the scaling matters in short inputs:
with head_dim 32 the 16 rotary pairs fall 3 in the unscaled band (wavelength < 64), 2 in the
blended one and 11 in the `factor`-slowed one (wavelength > 256).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpo_core.export import ExportRequest, export_version, merge
from dpo_core.gguf_export import GgufExportError, check_llama, llama3_rope, llama3_rope_factors
from tests.dpo_core.test_export import save_sharpened
from tests.tiny import build_tiny_tokenizer, save_random_adapter

ORIGINAL_CONTEXT = 256  # `original_max_position_embeddings`; 8192 in Llama 3.1
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": ORIGINAL_CONTEXT,
}


def llama31_config(vocab_size: int, rope: dict | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,  # 4:1 grouped-query attention, as in Llama 3.1 8B
        max_position_embeddings=4 * ORIGINAL_CONTEXT,
        rope_parameters={"rope_theta": 500000.0, **(rope or LLAMA31_ROPE)},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


@pytest.fixture(scope="module")
def llama31_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(3)
    model = LlamaForCausalLM(llama31_config(len(tokenizer)))
    return save_sharpened(model, tokenizer, tmp_path_factory.mktemp("llama31"))


@pytest.fixture(scope="module")
def exported(llama31_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(GGUF file, adapter directory): the tiny Llama 3.1 with a random LoRA, merged, as f32."""
    torch.set_num_threads(1)
    adapter = save_random_adapter(llama31_dir, tmp_path_factory.mktemp("ad") / "v1", seed=4)
    out = tmp_path_factory.mktemp("export") / "gguf"
    request = ExportRequest(str(llama31_dir), adapter, "gguf", out, gguf_type="f32", version="v1")
    result = export_version(request)
    return out / next(f for f in result.files if f.endswith(".gguf")), adapter


def transformers_inv_freqs(config) -> tuple[torch.Tensor, torch.Tensor]:
    """(default, llama3) inverse frequencies, each (head_dim // 2,), computed by transformers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    default, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    return default, scaled


def test_rope_freqs_are_transformers_llama3_scaling(exported, llama31_dir):
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(llama31_dir)
    reader = GGUFReader(exported[0])
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = tensors["rope_freqs.weight"]
    assert rope_freqs.tensor_type == GGMLQuantizationType.F32
    default, scaled = transformers_inv_freqs(config)
    # llama.cpp divides each pair's unscaled frequency by its factor.
    expected = default / scaled
    assert torch.allclose(torch.from_numpy(rope_freqs.data.copy()), expected, rtol=1e-6)
    assert expected[:3].tolist() == [1.0, 1.0, 1.0] and (expected[5:] == 8.0).all()
    assert ((expected[3:5] > 1.0) & (expected[3:5] < 8.0)).all()  # the blended band
    fields = reader.fields
    assert fields["llama.rope.freq_base"].contents() == 500000.0
    assert fields["llama.context_length"].contents() == 4 * ORIGINAL_CONTEXT
    assert fields["llama.rope.dimension_count"].contents() == 32
    assert fields["llama.attention.head_count"].contents() == 4
    assert fields["llama.attention.head_count_kv"].contents() == 1
    assert not any(
        key.startswith("llama.rope.scaling") for key in fields
    )  # as llama.cpp's converter
    assert "output.weight" in tensors  # untied head


def test_rope_factors_read_transformers_4_rope_scaling_too():
    """A transformers 4 config keeps the numbers in `rope_scaling` and `rope_theta` beside it."""
    v4 = SimpleNamespace(model_type="llama", rope_scaling=LLAMA31_ROPE, rope_theta=500000.0)
    v5 = llama31_config(8)
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
)
def test_other_rope_scalings_are_refused_in_words(rope):
    config = SimpleNamespace(model_type="llama", rope_scaling=rope)
    name = rope.get("rope_type", rope.get("type"))
    with pytest.raises(GgufExportError, match=rf"rope scaling is '{name}'.*Export `merged`"):
        check_llama(config)


def test_incomplete_llama3_scaling_is_refused():
    rope = {k: v for k, v in LLAMA31_ROPE.items() if k != "original_max_position_embeddings"}
    with pytest.raises(GgufExportError, match="without original_max_position_embeddings"):
        check_llama(SimpleNamespace(model_type="llama", rope_scaling=rope))
    check_llama(SimpleNamespace(model_type="llama", rope_scaling=None))  # plain rotary: fine


def greedy(model, ids: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps
        )
    return out[0, len(ids) :].tolist()


def test_llama_cpp_picks_transformers_greedy_tokens(exported, llama31_dir):
    """Past the original context (256) the scaled and the plain rope answer differently;
    llama.cpp reading the file agrees with transformers on the merged model there."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    gguf_path, adapter = exported
    merged = merge(str(llama31_dir), adapter).model.eval()
    generator = torch.Generator().manual_seed(5)
    prompt = torch.randint(
        4, merged.config.vocab_size, (2 * ORIGINAL_CONTEXT,), generator=generator
    )
    prompt = prompt.tolist()
    want = greedy(merged, prompt, 24)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=1, verbose=False)
    llm.eval(prompt)
    got = []
    for _ in range(24):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        got.append(token)
        llm.eval([token])
    assert got == want
    plain = rope_without_scaling(merged)
    assert greedy(plain, prompt, 24) != want  # the scaling matters at these positions


def rope_without_scaling(model):
    """A copy of `model` whose rotary embedding uses the unscaled frequencies."""
    import copy

    plain = copy.deepcopy(model)
    default, _ = transformers_inv_freqs(model.config)
    plain.model.rotary_emb.inv_freq.copy_(default)
    plain.model.rotary_emb.original_inv_freq = default
    return plain
