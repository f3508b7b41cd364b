"""Export round trips: merged weights give base + adapter's logits; the GGUF file loads back
with transformers' GGUF reader and picks the same next tokens; bad input leaves nothing behind."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from dpo_core.__main__ import main
from dpo_core.export import ExportError, ExportRequest, export_version
from dpo_core.gguf_export import GgufExportError, check_llama, gguf_vocab, permute_rotary
from dpo_core.modeling import LoraSettings, attach_lora, load_model, save_adapter
from tests.tiny import CHATML_TEMPLATE, build_tiny_model

# fp32 merge: W + B·A·scale is summed once instead of applied as two matmuls, so the logits
# differ only by float32 rounding.
MERGED_ATOL = 1e-4
PROMPTS = ["Hello there, how are you?", "Write a haiku about the sea.", "What is DPO?"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer():
    """A real byte-level BPE (merges learned in-process from a small corpus), ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [p * 3 for p in PROMPTS] + ["the quick brown fox jumps over the lazy dog"] * 5
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = bpe_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=1)
    return save_sharpened(model, tokenizer, tmp_path_factory.mktemp("bpe-llama"))


def save_sharpened(model, tokenizer, path: Path) -> Path:
    """Save a random model with its head scaled up, so next-token choices are not near-ties."""
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(bpe_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA (r=4) on every projection, big enough to change every greedy choice."""
    torch.set_num_threads(1)
    lm = load_model(str(bpe_model_dir), dtype="fp32", device="cpu")
    model = attach_lora(lm.model, LoraSettings(r=4, alpha=8))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return save_adapter(model, tmp_path_factory.mktemp("ad") / "v1")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def test_merged_checkpoint_gives_base_plus_adapter_logits(bpe_model_dir, adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = export_version(ExportRequest(str(bpe_model_dir), adapter_dir, "merged", out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(
        result.files
    )
    assert "README.md" in result.files and "adapter_config.json" not in result.files
    reference = load_model(str(bpe_model_dir), dtype="fp32", device="cpu", adapter=adapter_dir)
    base = load_model(str(bpe_model_dir), dtype="fp32", device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert merged.dtype == torch.float32  # the base checkpoint's dtype
    ids = reference.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    expected = logits(reference.model, ids)
    assert torch.allclose(logits(merged, ids), expected, atol=MERGED_ATOL)
    assert (logits(base.model, ids) - expected).abs().max() > 100 * MERGED_ATOL  # adapter counts


# Share of positions whose greedy next token must survive the round trip: all in f16; q8_0's
# rounding (about 0.4% of each block's largest weight) may flip a rare near-tie.
AGREEMENT = {"f16": 1.0, "q8_0": 0.9}


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_loads_back_with_the_same_next_tokens(bpe_model_dir, adapter_dir, tmp_path, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gguf"
    request = ExportRequest(
        str(bpe_model_dir), adapter_dir, "gguf", out, gguf_type=gguf_type, version="v1"
    )
    result = export_version(request)
    gguf_name = next(f for f in result.files if f.endswith(".gguf"))
    assert gguf_name.endswith(f"-{gguf_type}.gguf") and "Modelfile" in result.files
    reference = load_model(str(bpe_model_dir), dtype="fp32", device="cpu", adapter=adapter_dir)
    base = load_model(str(bpe_model_dir), dtype="fp32", device="cpu")
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=gguf_name)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    same, total = 0, 0
    for prompt in PROMPTS:
        ids = reference.tokenizer(prompt, return_tensors="pt").input_ids
        assert tokenizer(prompt).input_ids == ids[0].tolist()  # vocabulary and merges survive
        want = logits(reference.model, ids)[0].argmax(-1)
        got = logits(back, ids)[0].argmax(-1)
        assert got[-1] == want[-1], prompt  # the next token after the prompt
        assert (logits(base.model, ids)[0].argmax(-1) != want).all()  # the adapter is in there
        same, total = same + int((got == want).sum()), total + len(want)
    assert same / total >= AGREEMENT[gguf_type]


def test_rotary_permutation_is_undone_by_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.randn(2 * 16, 64)  # 2 KV heads of dim 16
    processor = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    permuted = permute_rotary(weight, 2).numpy()
    back = processor.process(weights=permuted, name="blk.0.attn_k.weight").weights
    assert torch.equal(torch.from_numpy(back), weight)
    assert not torch.equal(torch.from_numpy(permuted), weight)


def test_model_card_is_hub_ready_and_tells_the_4bit_merge(bpe_model_dir, adapter_dir, tmp_path):
    from huggingface_hub import ModelCard

    (adapter_dir / "train_config.json").write_text(json.dumps({"load_in_4bit": True, "beta": 0.5}))
    (adapter_dir / "metrics.json").write_text(json.dumps({"num_pairs": 42, "rewards/margins": 1.5}))
    out = tmp_path / "card"
    request = ExportRequest(
        str(bpe_model_dir), adapter_dir, "merged", out, version="v2", lineage=("base", "v1", "v2")
    )
    result = export_version(request)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == bpe_model_dir.name
    assert data["library_name"] == "transformers" and "dpo" in data["tags"]
    assert data["dpo_studio"]["lineage"] == ["base", "v1", "v2"]
    assert data["dpo_studio"]["preference_pairs"] == 42
    assert (
        "4-bit" in card.text and "full-precision" in card.text and "base -> v1 -> v2" in card.text
    )
    assert "| beta | 0.5 |" in card.text and "| rewards/margins | 1.5 |" in card.text
    assert any("4-bit" in note for note in result.notes)


def test_modelfile_uses_the_chat_format(bpe_model_dir, tmp_path):
    out = tmp_path / "base-gguf"
    result = export_version(ExportRequest(str(bpe_model_dir), None, "gguf", out))
    gguf_name = next(f for f in result.files if f.endswith(".gguf"))
    text = (out / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{gguf_name}\n")
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text


def test_non_llama_base_is_refused_for_gguf(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out"
    with pytest.raises(GgufExportError, match=r"Llama-architecture models only.*'gpt2'"):
        export_version(ExportRequest(str(tmp_path / "gpt2"), None, "gguf", out))
    assert not out.exists() and list(tmp_path.glob(".out-*")) == []


def test_rope_scaling_other_than_llama3_is_refused_for_gguf():
    """Llama 3.1/3.2's scaling is written (tests/dpo_core/test_gguf_llama3.py); others are not."""
    from transformers import LlamaConfig

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    scaling |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    check_llama(LlamaConfig(rope_scaling=scaling))
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    with pytest.raises(GgufExportError, match=r"rope scaling is 'yarn'"):
        check_llama(LlamaConfig(rope_scaling=yarn))
    check_llama(LlamaConfig())  # plain rotary: fine


def test_gpt2_split_is_named_as_llama_cpp_knows_it():
    """llama.cpp calls GPT-2's split `gpt-2` and refuses to load a file that says `gpt2`
    ("unknown pre-tokenizer type"); transformers' reader ignores the name."""
    tokenizer = bpe_tokenizer()
    assert gguf_vocab(tokenizer, len(tokenizer)).pre == "gpt-2"


def test_tokenizers_gguf_cannot_describe_are_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(GgufExportError, match="byte-level BPE tokenizers"):
        gguf_vocab(PreTrainedTokenizerFast(tokenizer_object=word_level), 2)
    other_split = bpe_tokenizer()
    other_split.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(GgufExportError, match=r"unknown pre-tokenizer \['Whitespace'\]"):
        gguf_vocab(other_split, len(other_split))


def test_existing_output_is_refused_and_kept(bpe_model_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_version(ExportRequest(str(bpe_model_dir), None, "merged", out))
    assert (out / "keep.txt").read_text() == "mine"


def test_not_an_adapter_directory(bpe_model_dir, tmp_path):
    with pytest.raises(ExportError, match="not an adapter directory"):
        export_version(ExportRequest(str(bpe_model_dir), tmp_path, "merged", tmp_path / "o"))


def test_full_disk_leaves_nothing_half_written(bpe_model_dir, tmp_path, monkeypatch):
    def full_disk(merged, path):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dpo_core.export.save_merged", full_disk)
    out = tmp_path / "full"
    with pytest.raises(ExportError, match=r"not enough disk space.*nothing was written"):
        export_version(ExportRequest(str(bpe_model_dir), None, "merged", out))
    assert list(tmp_path.iterdir()) == []


def test_cli_export_and_its_errors(bpe_model_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["export", "--base", str(bpe_model_dir), "--adapter", str(adapter_dir)]
    assert main([*args, "--format", "gguf", "--gguf-type", "q8_0", "--out", str(out)]) == 0
    assert "exported gguf" in capsys.readouterr().out
    assert any(p.suffix == ".gguf" for p in out.iterdir())
    assert main([*args, "--format", "merged", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_gguf_round_trip(tmp_path):
    """The embedded SmolLM2 (itself shipped as GGUF), with a random LoRA, written as f16 GGUF
    and read back: the same greedy next token after each chat prompt as the merged model."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_core.export import merge
    from dpo_core.modeling import LoraSettings, attach_lora, save_adapter

    torch.set_num_threads(1)
    lm = load_model("embedded", dtype="fp32", device="cpu")
    model = attach_lora(lm.model, LoraSettings(r=4, alpha=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    adapter = save_adapter(model, tmp_path / "v1")
    out = tmp_path / "gguf"
    result = export_version(ExportRequest("embedded", adapter, "gguf", out, version="v1"))
    gguf_name = next(f for f in result.files if f.endswith(".gguf"))
    assert any("Q4_1 GGUF" in note for note in result.notes)  # the card says what the base was
    assert "You are a helpful AI assistant named SmolLM" in (out / "Modelfile").read_text()
    fields = GGUFReader(out / gguf_name).fields
    assert fields["llama.rope.freq_base"].contents() == 100000.0
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    merged = merge("embedded", adapter)
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=gguf_name)
    assert tokenizer.chat_template == merged.tokenizer.chat_template
    for prompt in PROMPTS:
        chat = [{"role": "user", "content": prompt}]
        text = merged.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False
        )
        ids = merged.tokenizer(text, return_tensors="pt").input_ids
        assert tokenizer(text).input_ids == ids[0].tolist()
        assert logits(back, ids)[0, -1].argmax() == logits(merged.model, ids)[0, -1].argmax()
