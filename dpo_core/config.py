"""`TrainConfig`: every knob of a DPO run in one typed, validated dataclass.

Fields are grouped (model / data / loss / optimisation / LoRA / evaluation); the resolved
config is saved as `train_config.json` beside each adapter, and `from_dict` reads it back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dpo_core.losses import LOSS_TYPES, UNPAIRED_LOSS_TYPES, check_kto_weights, check_loss_args
from dpo_core.modeling import DTYPES, LORA_TARGETS, LoraSettings
from dpo_core.optim import SCHEDULERS


def _f(default: Any, help: str, group: str) -> Any:
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class TrainConfig:
    """A DPO run. Defaults suit LoRA on a small chat model and a few hundred pairs."""

    # model
    model: str = _f("embedded", "`embedded`, a Hugging Face id or a model directory", "model")
    dtype: str = _f("auto", "weights dtype: auto (bf16 where fast), bf16, fp16, fp32", "model")
    load_in_4bit: bool | None = _f(None, "NF4 base weights (default: on with CUDA)", "model")
    device: str | None = _f(None, "cpu, cuda, cuda:1 (default: cuda if present)", "model")
    init_adapter: str | None = _f(
        None, "continue training this adapter directory (the reference stays the base)", "model"
    )
    # data
    max_length: int = _f(512, "max tokens of prompt + completion", "data")
    max_prompt_length: int | None = _f(
        None, "max prompt tokens; a longer prompt keeps its end (default: max_length / 2)", "data"
    )
    share_prompt: bool = _f(
        True, "run prompt + chosen + rejected as one row, the prompt computed once", "data"
    )
    max_forward_tokens: int = _f(
        1024, "split forward passes above this many tokens (bounds memory, same gradient)", "data"
    )
    # loss
    loss_type: str = _f("sigmoid", f"one of {', '.join(LOSS_TYPES)}", "loss")
    beta: float = _f(0.5, "inverse temperature: how far the policy may move from the base", "loss")
    label_smoothing: float = _f(0.0, "assumed label-flip rate (sigmoid/robust/simpo)", "loss")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin", "loss")
    rpo_alpha: float = _f(
        0.0,
        "add this times the chosen answer's per-token NLL to the loss (RPO; 0: off)",
        "loss",
    )
    kto_desirable_weight: float = _f(1.0, "KTO: loss scale of desirable answers (lambda_D)", "loss")
    kto_undesirable_weight: float = _f(
        1.0, "KTO: loss scale of undesirable answers (lambda_U)", "loss"
    )
    kto_balance: bool = _f(
        True,
        "KTO: weigh the rarer class up so that both classes weigh the same in all "
        "(lambda_D n_D = lambda_U n_U, KTO paper eq. 8); off: the two weights as given",
        "loss",
    )
    # optimisation
    epochs: int = _f(3, "passes over the training pairs", "optim")
    batch_size: int = _f(4, "pairs per forward pass", "optim")
    grad_accum: int = _f(1, "forward passes per optimiser step", "optim")
    learning_rate: float = _f(2e-4, "peak AdamW learning rate", "optim")
    lr_scheduler: str = _f("cosine", f"one of {', '.join(SCHEDULERS)}", "optim")
    warmup_ratio: float = _f(0.1, "fraction of steps with a linear warm-up", "optim")
    weight_decay: float = _f(0.0, "AdamW weight decay", "optim")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this", "optim")
    gradient_checkpointing: bool = _f(False, "recompute activations: less memory, slower", "optim")
    seed: int = _f(0, "seed for LoRA init and batch order", "optim")
    # LoRA
    lora_r: int = _f(16, "LoRA rank", "lora")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)", "lora")
    lora_dropout: float = _f(
        0.0, "LoRA dropout (0: noise would blur the policy/reference log-ratio)", "lora"
    )
    lora_target_modules: tuple[str, ...] = _f(LORA_TARGETS, "modules that get LoRA", "lora")
    # evaluation and the over-optimisation guard (docs/defaults.md)
    eval_every: int = _f(
        0,
        "evaluate held-out pairs every N steps (0: at the end of each epoch, and every 16 "
        "steps within a longer epoch)",
        "eval",
    )
    heldout_fraction: float = _f(
        0.15, "with no held-out pairs given, hold out this share of the prompts", "eval"
    )
    early_stopping: bool = _f(
        True,
        "keep the best held-out checkpoint within the KL ceiling, stop when it is passed or "
        "nothing improves (needs min_heldout_pairs held-out pairs)",
        "eval",
    )
    min_heldout_pairs: int = _f(8, "fewest held-out pairs for early stopping", "eval")
    kl_ceiling: float = _f(
        8.0, "KL(policy || base) per sampled answer, in nats, that stops the run", "eval"
    )
    patience: int = _f(
        2,
        "stop after this many evaluations in a row whose held-out reward accuracy is below the "
        "best so far (the held-out loss does not count: dpo_core.guard says why)",
        "eval",
    )
    kl_prompts: int = _f(
        8, "answers sampled for the KL readout, spread over the held-out prompts (0: none)", "eval"
    )
    kl_max_new_tokens: int = _f(96, "tokens per answer sampled for the KL readout", "eval")
    # the SFT stage before DPO (dpo_core.sft)
    sft_epochs: int = _f(
        0,
        "passes over the SFT examples (rewrites, chosen answers) before DPO; 0: no SFT stage",
        "sft",
    )
    sft_learning_rate: float | None = _f(
        None, "peak learning rate of the SFT stage (default: learning_rate)", "sft"
    )

    def __post_init__(self) -> None:
        self.lora_target_modules = tuple(self.lora_target_modules)  # a list after JSON
        check_loss_args(self.loss_type, self.beta, self.label_smoothing, self.simpo_gamma)
        _require(
            math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0,
            f"rpo_alpha must be a non-negative number, got {self.rpo_alpha}",
        )
        check_kto_weights(self.kto_desirable_weight, self.kto_undesirable_weight)
        _require(
            not (self.rpo_alpha and self.loss_type in UNPAIRED_LOSS_TYPES),
            "rpo_alpha adds the chosen answer's NLL of a pair; it does not apply to kto",
        )
        self._check_model()
        self._check_data()
        self._check_optim()
        self.lora_settings()  # validates r, alpha, dropout, targets
        if "lm_head" in self.lora_target_modules:
            raise ValueError("lora_target_modules: LoRA on lm_head is not supported")
        self._check_eval()
        self._check_sft()

    def _check_model(self) -> None:
        _require(bool(self.model and self.model.strip()), "model must name a model")
        _require(
            self.dtype in ("auto", *DTYPES),
            f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}",
        )

    def _check_data(self) -> None:
        _require(self.max_length >= 2, f"max_length must be at least 2, got {self.max_length}")
        _require(
            self.max_forward_tokens >= 1,
            f"max_forward_tokens must be a positive integer, got {self.max_forward_tokens}",
        )
        if self.max_prompt_length is None:
            self.max_prompt_length = self.max_length // 2
        _require(
            1 <= self.max_prompt_length < self.max_length,
            f"max_prompt_length must be between 1 and max_length - 1 ({self.max_length - 1}), "
            f"got {self.max_prompt_length}",
        )

    def _check_optim(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= 1,
                f"{name} must be a positive integer, got {value}",
            )
        _require(
            math.isfinite(self.learning_rate) and 0 < self.learning_rate < 1,
            f"learning_rate must be in (0, 1), got {self.learning_rate}",
        )
        _require(
            self.lr_scheduler in SCHEDULERS,
            f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}",
        )
        _require(
            0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"
        )
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")

    def _check_eval(self) -> None:
        _require(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        _require(
            0 <= self.heldout_fraction <= 0.5,
            f"heldout_fraction must be in [0, 0.5], got {self.heldout_fraction}",
        )
        for name in ("min_heldout_pairs", "patience", "kl_max_new_tokens"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= 1,
                f"{name} must be a positive integer, got {value}",
            )
        _require(
            isinstance(self.kl_prompts, int) and self.kl_prompts >= 0,
            f"kl_prompts must be a whole number >= 0, got {self.kl_prompts}",
        )
        _require(self.kl_ceiling > 0, f"kl_ceiling must be > 0 nats, got {self.kl_ceiling}")

    def _check_sft(self) -> None:
        _require(
            isinstance(self.sft_epochs, int) and self.sft_epochs >= 0,
            f"sft_epochs must be a whole number >= 0, got {self.sft_epochs}",
        )
        # The DPO rate by default: both stages move the same LoRA weights, and a rate that
        # suits LoRA (1e-4 to 2e-4 is the usual SFT range) is what the DPO default already is.
        if self.sft_learning_rate is None:
            self.sft_learning_rate = self.learning_rate
        _require(
            math.isfinite(self.sft_learning_rate) and 0 < self.sft_learning_rate < 1,
            f"sft_learning_rate must be in (0, 1), got {self.sft_learning_rate}",
        )

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready flat dict (`from_dict` inverts it)."""
        out = asdict(self)
        out["lora_target_modules"] = list(self.lora_target_modules)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            valid = ", ".join(sorted(names))
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}; valid: {valid}")
        return cls(**values)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
