"""Write a merged Llama-family model as a GGUF file for llama.cpp / Ollama, plus a Modelfile.

What llama.cpp's `convert_hf_to_gguf.py` does for a Llama model, in the subset this project
needs: tensor names from gguf's own name map, the rotary permutation of the Q and K projections
(llama.cpp's rope kernel pairs neighbouring dimensions, Hugging Face pairs the two halves;
transformers' GGUF reader undoes it with `LlamaTensorProcessor._reverse_permute_weights`), the
hyperparameters under `llama.*`, and a byte-level BPE tokenizer (tokens, merges, token types,
special ids, chat template) under `tokenizer.*`. Llama 3.1/3.2 rope scaling (`llama3`) becomes
llama.cpp's `rope_freqs.weight` tensor, as the converter's `LlamaModel.generate_extra_tensors`
writes it; other rope scalings are refused. Quantization uses the `gguf` package's own numpy
quantizers, so only the types it can *write* are offered (not the k-quants).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# GGUF type name -> (tensor type for 2-D weights, llama.cpp file type). 1-D tensors stay F32.
GGUF_TYPES = ("f16", "q8_0", "bf16", "f32", "q5_1", "q5_0", "q4_1", "q4_0")
GGUF_ARCH = "llama"
# The pre-tokenizer (the regex that cuts text before BPE) is named, not stored, in a GGUF.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GgufExportError(ValueError):
    """The model cannot be written as GGUF by this exporter; the message says why and what to do."""


@dataclass(frozen=True)
class GgufVocab:
    """A byte-level BPE tokenizer as llama.cpp stores it (`tokenizer.ggml.*`)."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None


def ggml_types(name: str) -> tuple[Any, Any]:
    """(GGMLQuantizationType for 2-D weights, LlamaFileType) of a type name such as `q8_0`."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    table = {
        "f32": (Q.F32, F.ALL_F32),
        "f16": (Q.F16, F.MOSTLY_F16),
        "bf16": (Q.BF16, F.MOSTLY_BF16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
        "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1),
        "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
        "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
        "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
    }
    if name not in table:
        raise GgufExportError(f"unknown GGUF type {name!r}; choose one of {', '.join(GGUF_TYPES)}")
    return table[name]


def check_llama(config: Any) -> None:
    """Refuse, with a message a user can act on, any model this exporter cannot write."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise GgufExportError(
            f"GGUF export supports Llama-architecture models only; this base is {model_type!r}. "
            "Export `merged` instead and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    llama3_rope(config)  # refuses other rope scalings and incomplete llama3 ones


@dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.1/3.2 rope scaling (`rope_type: llama3`): rotary pairs whose wavelength is
    longer than `original_context / low_freq_factor` turn `factor` times slower, those shorter
    than `original_context / high_freq_factor` keep their speed, those between are blended."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_context: int  # `original_max_position_embeddings`: the pre-training context


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope settings: `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5,
    which keeps `rope_theta` in there too). Empty for plain rotary embeddings."""
    return dict(
        getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    )


def llama3_rope(config: Any) -> Llama3Rope | None:
    """The `llama3` rope scaling of `config`; None for plain rotary embeddings. Any other
    scaling, or a `llama3` one without its four numbers, is refused in words."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise GgufExportError(
            f"GGUF export writes plain rotary embeddings and Llama 3.1/3.2 rope scaling "
            f"('llama3') only; this model's rope scaling is {rope_type!r}. Export `merged` and "
            "convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    # All four from the rope settings, where transformers reads them. (llama.cpp's converter takes
    # `original_max_position_embeddings` from the top of config.json, else 8192: the same for
    # Meta's checkpoints, wrong for a model trained with another original context.)
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [key for key in keys if params.get(key) is None]
    if missing:
        raise GgufExportError(
            f"'llama3' rope scaling without {', '.join(missing)} in its config: add them (Llama "
            "3.1 has factor 8, low_freq_factor 1, high_freq_factor 4, "
            "original_max_position_embeddings 8192) or export `merged`."
        )
    return Llama3Rope(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_context=int(params["original_max_position_embeddings"]),
    )


def llama3_rope_factors(rope: Llama3Rope, theta: float, head_dim: int) -> torch.Tensor:
    """llama.cpp's `rope_freqs.weight`: for each rotary pair, the number llama.cpp divides that
    pair's unscaled frequency `theta ** (-2i / head_dim)` by. Equals transformers' default
    inverse frequencies over its `llama3` ones.

    -> (head_dim // 2,) float32: 1 for short wavelengths, `factor` for long ones.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    # Between the two bands the scaled frequency is inv_freq * ((1 - smooth) / factor + smooth).
    smooth = (rope.original_context / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    factors = 1.0 / ((1.0 - smooth) / rope.factor + smooth)
    factors = torch.where(wavelen < rope.original_context / rope.high_freq_factor, 1.0, factors)
    factors = torch.where(
        wavelen > rope.original_context / rope.low_freq_factor, rope.factor, factors
    )
    return factors.to(torch.float32)


def check_gguf_source(source: str) -> None:
    """Whether the model directory / hub id `source` can be written as GGUF (config and
    tokenizer only: no weights are read)."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    check_llama(config)
    gguf_vocab(AutoTokenizer.from_pretrained(source), config.vocab_size)


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a Q or K projection from Hugging Face's rotary layout (halves) to
    llama.cpp's (interleaved pairs), as llama.cpp's `LlamaModel.permute` does.

    weight: (n_head * head_dim, hidden) -> same shape, rows of each head reordered.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names, Q and K permuted, tied head dropped."""
    from gguf import MODEL_ARCH, MODEL_TENSOR, TENSOR_NAMES, get_tensor_name_map

    config = model.config
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out: dict[str, torch.Tensor] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd; transformers ties when `output` is absent
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GgufExportError(f"no GGUF name for tensor {hf_name!r}; is this a plain Llama?")
        if name.endswith("attn_q.weight"):
            tensor = permute_rotary(tensor, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            tensor = permute_rotary(tensor, config.num_key_value_heads)
        out[name] = tensor
    rope = llama3_rope(config)
    if rope is not None:  # one copy; llama.cpp shares it between layers
        out[f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.weight"] = llama3_rope_factors(
            rope, rope_theta(config), head_dim(config)
        )
    return out


def encode_tensor(tensor: torch.Tensor, type_name: str) -> tuple[np.ndarray, Any]:
    """(data, GGML type) for one tensor: 1-D tensors and rows that do not fill a quantization
    block stay F32 / fall back to F16, as llama.cpp's converter does."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    data = tensor.detach().to(torch.float32).cpu().numpy()
    qtype, _ = ggml_types(type_name)
    if data.ndim == 1 or qtype == GGMLQuantizationType.F32:
        return data, GGMLQuantizationType.F32
    if data.shape[-1] % GGML_QUANT_SIZES[qtype][0] != 0:
        qtype = GGMLQuantizationType.F16
    if qtype == GGMLQuantizationType.F16:
        return data.astype(np.float16), qtype
    return quants.quantize(data, qtype), qtype


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GgufVocab:
    """Read a byte-level BPE tokenizer (GPT-2 / SmolLM / Llama 3 style) into llama.cpp's form."""
    from gguf import TokenType

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model", {})
    if model.get("type") != "BPE" or (state.get("decoder") or {}).get("type") != "ByteLevel":
        raise GgufExportError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3); this one is "
            f"{model.get('type')!r}. Export `merged` and use llama.cpp's convert_hf_to_gguf.py."
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GgufVocab(
        pre=pre_tokenizer_name(state.get("pre_tokenizer")),
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=merges,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        unk_id=tokenizer.unk_token_id,
        pad_id=tokenizer.pad_token_id,
        add_bos=bool(getattr(tokenizer, "add_bos_token", False)),
        chat_template=tokenizer.chat_template,
    )


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the text-splitting rule of a tokenizer.json.
    llama.cpp refuses to load a file whose name it does not know (GPT-2's is `gpt-2`)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise GgufExportError(
        f"unknown pre-tokenizer {kinds}: GGUF export knows GPT-2, SmolLM and Llama 3 tokenizers. "
        "Export `merged` and use llama.cpp's convert_hf_to_gguf.py."
    )


def write_gguf(
    model: Any, tokenizer: Any, path: Path, type_name: str, name: str, pre: str | None = None
) -> Path:
    """Write `model` (a merged, unquantized LlamaForCausalLM) and its tokenizer to `path`.
    `pre` overrides the pre-tokenizer name read from the tokenizer (see `source_pre`)."""
    from gguf import GGML_QUANT_VERSION, GGUFWriter

    check_llama(model.config)
    vocab = gguf_vocab(tokenizer, model.config.vocab_size)
    if pre:
        vocab = replace(vocab, pre=pre)
    _, file_type = ggml_types(type_name)
    writer = GGUFWriter(str(path), GGUF_ARCH)
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    _add_hparams(writer, model.config)
    _add_vocab(writer, vocab)
    for tensor_name, tensor in gguf_tensors(model).items():
        data, qtype = encode_tensor(tensor, type_name)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def source_pre(gguf_path: Path) -> str | None:
    """`tokenizer.ggml.pre` of an existing GGUF file. The embedded model's tokenizer came out of
    its GGUF through transformers, which splits text the GPT-2 way for `smollm`; writing `gpt-2`
    back would lose SmolLM2's one-digit-per-token rule in llama.cpp, so its name is kept."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else None


def head_dim(config: Any) -> int:
    """Width of one attention head (the rotary dimension: Llama rotates all of it)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hparams(writer: Any, config: Any) -> None:
    # llama3 rope scaling has no key of its own: the factors travel as `rope_freqs.weight`.
    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(dim)
    writer.add_vocab_size(config.vocab_size)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)


def rope_theta(config: Any) -> float:
    """The rotary base: `rope_theta`, or where transformers 5 keeps it (`rope_parameters`)."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = rope_parameters(config).get("rope_theta", 10000.0)
    return float(theta)


def _add_vocab(writer: Any, vocab: GgufVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for value, add in (
        (vocab.bos_id, writer.add_bos_token_id),
        (vocab.eos_id, writer.add_eos_token_id),
        (vocab.unk_id, writer.add_unk_token_id),
        (vocab.pad_id, writer.add_pad_token_id),
    ):
        if value is not None:
            add(value)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def ollama_modelfile(gguf_name: str, tokenizer: Any) -> str:
    """An Ollama Modelfile for the GGUF beside it: ChatML and Llama 3 chat formats get an
    explicit TEMPLATE (and the template's default system prompt); any other format is left to
    Ollama, which derives a template from the GGUF's `tokenizer.chat_template`."""
    template = tokenizer.chat_template or ""
    lines = [f"FROM ./{gguf_name}", ""]
    if "<|im_start|>" in template:
        lines += ['TEMPLATE """' + CHATML_GO_TEMPLATE + '"""', 'PARAMETER stop "<|im_end|>"']
    elif "<|start_header_id|>" in template:
        lines += ['TEMPLATE """' + LLAMA3_GO_TEMPLATE + '"""', 'PARAMETER stop "<|eot_id|>"']
    else:
        lines.append("# TEMPLATE: Ollama reads the chat template from the GGUF metadata.")
    system = default_system_prompt(tokenizer)
    if system:
        lines.append('SYSTEM """' + system + '"""')
    if tokenizer.eos_token and tokenizer.eos_token not in "\n".join(lines):
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    return "\n".join(lines) + "\n"


CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
LLAMA3_GO_TEMPLATE = (
    "<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def default_system_prompt(tokenizer: Any) -> str | None:
    """The system message a ChatML template inserts when a chat has none (SmolLM2 has one)."""
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    head = "<|im_start|>system\n"
    if not text.startswith(head):
        return None
    return text[len(head) : text.index("<|im_end|>")]
