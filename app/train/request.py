"""What a person asks of a training run: `TrainRequest`, the settings the Train tab and
/train_start expose (each declared once, with dpo_core's default and help text), their parsing
and checks, and the resolved dpo_core TrainConfig a request becomes.

Nothing here touches CUDA at import: the `devices` default (every visible GPU) is counted when
a request or the form asks for it, not when the module loads."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, get_type_hints

from dpo_core.heldout import MAX_HELDOUT_FRACTION
from dpo_core.losses import LOSS_TYPES
from storage.selection import DEFAULT_TRAIN_ON, DEFAULT_VOTES, TRAIN_ON, VOTE_MODES, VoteSelection
from storage.self_labels import MULTIPLIERS

NAMES = tuple[str, ...]  # the kind of a setting that lists names (annotators to leave out)
SELF_LABELS_OFF = "off"
# "Add the model's own labels": off, or so many self-labels per human label of the round
SELF_LABEL_CHOICES = (SELF_LABELS_OFF, *(f"{m}x" for m in MULTIPLIERS if m))


def self_label_multiplier_of(choice: str) -> int:
    """0 for `off`, 2 for `2x`, ...; ValueError naming the choices for anything else."""
    if choice not in SELF_LABEL_CHOICES:
        raise ValueError(
            f"add the model's own labels must be one of {', '.join(SELF_LABEL_CHOICES)}, "
            f"got {choice!r}"
        )
    return 0 if choice == SELF_LABELS_OFF else int(choice.removesuffix("x"))


def _visible_devices() -> int:
    """The `devices` default: one process per visible GPU, 1 on CPU (asks CUDA: called when a
    request is made, never at import)."""
    from dpo_core.distributed import visible_devices

    return visible_devices()


def config_default(name: str) -> Any:
    """A TrainConfig field's default: the Train tab's defaults are dpo_core's."""
    return _config_field(name).default


def _config_field(name: str) -> Field[Any]:
    from dpo_core.config import TrainConfig

    return {f.name: f for f in fields(TrainConfig)}[name]


def _setting(name: str, label: str, row: int, **extra: Any) -> Any:
    """A TrainRequest field for TrainConfig's `name`: dpo_core's default and help text, and
    how the Train tab shows it (its label, its row in the Advanced accordion, `choices` or a
    `maximum` where the form offers a list or a slider)."""
    field_ = _config_field(name)
    help_ = field_.metadata["help"]
    return field(
        default=field_.default, metadata={"label": label, "row": row, "help": help_, **extra}
    )


@dataclass(frozen=True)
class TrainRequest:
    """What the person chooses in the Train tab or sends to /train_start. Each setting is
    declared here once; `SETTINGS` (below) derives the form, the API and the parsing from it."""

    loss_type: str = _setting("loss_type", "Loss type", 0, choices=LOSS_TYPES)
    beta: float = _setting("beta", "beta", 0)
    label_smoothing: float = _setting("label_smoothing", "Label smoothing", 0)
    learning_rate: float = _setting("learning_rate", "Learning rate", 0)
    epochs: int = _setting("epochs", "Epochs", 1)
    batch_size: int = _setting("batch_size", "Batch size (pairs)", 1)
    grad_accum: int = _setting("grad_accum", "Gradient accumulation", 1)
    max_length: int = _setting("max_length", "Max length (tokens)", 1)
    lora_r: int = _setting("lora_r", "LoRA rank r", 2)
    lora_alpha: int = _setting("lora_alpha", "LoRA alpha", 2)
    heldout_fraction: float = _setting(
        "heldout_fraction", "Held-out fraction", 2, maximum=MAX_HELDOUT_FRACTION
    )
    continue_from_active: bool = field(
        default=True,
        metadata={
            "label": "Continue from the active adapter",
            "row": 3,
            "help": "off: a fresh adapter on the base model (the reference is the base either way)",
        },
    )
    train_on: str = field(
        default=DEFAULT_TRAIN_ON,
        metadata={
            "label": "Train on",
            "row": 3,
            "help": "all: every pair; parent: only pairs labeled on the answers of the version "
            "the run continues from (a round on its own answers); newest: all, weighted toward "
            "the newest versions' answers (x0.5 per version back)",
            "choices": TRAIN_ON,
        },
    )
    devices: int = field(
        default_factory=_visible_devices,
        metadata={
            "label": "Devices",
            "row": 3,
            "help": "training processes, one per GPU (default: every visible GPU; 1 on CPU); "
            "more than 1 runs the worker under torchrun, data-parallel, same steps",
        },
    )
    votes: str = field(
        default=DEFAULT_VOTES,
        metadata={
            "label": "Pairs judged by several annotators",
            "row": 4,
            "help": "majority: the choice of more than half of the votes trains (a tie of votes "
            "does not); unanimous: only when all agree; every: each vote is its own pair",
            "choices": VOTE_MODES,
        },
    )
    leave_out: tuple[str, ...] = field(
        default=(),
        metadata={
            "label": "Leave out annotators",
            "row": 4,
            "help": "their votes do not train (e.g. those the Data tab flags for position bias)",
        },
    )
    include_judge_votes: bool = field(
        default=False,
        metadata={
            "label": "Include AI judges' votes",
            "row": 4,
            "help": "votes by annotators named judge:<name> (AI feedback); off: human votes only",
        },
    )
    self_labels: str = field(
        default=SELF_LABELS_OFF,
        metadata={
            "label": "Add the model's own labels",
            "row": 4,
            "help": "off / 2x / 4x / 8x the human labels: the active version labels pairs of "
            "its own answers where it agrees with people's labels of them 90 % of the time; "
            "runs train on them with their weight (a person's vote overrides). Default off: "
            "no experiment has shown yet that they help",
            "choices": SELF_LABEL_CHOICES,
        },
    )
    sft_on_rewrites: bool = field(
        default=False,
        metadata={
            "label": "SFT on rewrites first",
            "row": 5,
            "help": "a short supervised stage (as many epochs as DPO's) on the 'Write a better "
            "answer' texts before DPO, in the same run; DPO then starts from that model",
        },
    )
    sft_include_chosen: bool = field(
        default=False,
        metadata={
            "label": "SFT on chosen answers too",
            "row": 5,
            "help": "the SFT stage also trains on every training pair's chosen answer",
        },
    )

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> TrainRequest:
        """A request from loosely typed values (a form sends floats, strings or None): each is
        converted to its setting's type; ValueError names the setting that is not."""
        return cls(**{s.name: s.parse(values[s.name]) for s in SETTINGS if s.name in values})

    def sft(self) -> dict[str, bool]:
        """What the SFT stage trains on (`app.train.run_inputs.sft_examples`' choices)."""
        return {"rewrites": self.sft_on_rewrites, "chosen": self.sft_include_chosen}

    def selection(self, parent_id: int | None = None) -> VoteSelection:
        """Which votes train, and which rounds of them (`parent_id`: the version the run
        continues from). ValueError for an unknown votes mode or train-on choice."""
        return VoteSelection(
            self.votes,
            self.leave_out,
            include_judges=self.include_judge_votes,
            include_self=self.self_labels != SELF_LABELS_OFF,
            train_on=self.train_on,
            parent_id=parent_id,
        )

    def validate(self) -> None:
        """Raise ValueError naming the setting for a value no run could use (TrainConfig checks
        the rest when the run's config is built)."""
        self.selection()
        self_label_multiplier_of(self.self_labels)
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if setting.kind is int and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{setting.spoken} must be a positive integer: {value}")
            if setting.maximum is not None and not 0.0 <= value <= setting.maximum:
                raise ValueError(
                    f"{setting.spoken} must be between 0 and {setting.maximum}, got {value}"
                )


@dataclass(frozen=True)
class Setting:
    """One training setting as the Train tab and /train_start expose it (from TrainRequest)."""

    name: str
    kind: Any  # str, float, int, bool, or NAMES (a list of names)
    label: str
    help: str
    row: int  # the row of the Advanced accordion it sits in
    choices: tuple[str, ...] = ()  # a str setting with a fixed list of values
    maximum: float | None = None  # a float setting the form offers as a slider from 0
    fixed_default: Any = None
    default_factory: Callable[[], Any] | None = None  # a default counted when asked (devices)

    @property
    def default(self) -> Any:
        """The setting's default (the `devices` one asks CUDA now, not at import)."""
        if self.default_factory is not None:
            return self.default_factory()
        return self.fixed_default

    @property
    def spoken(self) -> str:
        """The name as error messages say it: `lora r`, `batch size`, `held-out fraction`."""
        return self.name.replace("_", " ").replace("heldout", "held-out")

    def parse(self, value: Any) -> Any:
        """`value` as this setting's type; ValueError with the setting's name if it is not one."""
        if self.kind == NAMES:
            return parse_names(value, self.spoken)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.spoken} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            return str(value)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{self.spoken} is empty")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.spoken} must be a number (could not convert {value!r})"
            ) from None
        if self.kind is int:
            if not math.isfinite(number) or number != int(number):
                raise ValueError(f"{self.spoken} must be a whole number, got {value}")
            return int(number)
        return number


def parse_names(value: Any, spoken: str) -> tuple[str, ...]:
    """Names from a list (the form's multiselect, the API) or one comma-separated string."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{spoken} must be a list of names, got {value!r}")
    return tuple(v.strip() for v in value if v.strip())


def _settings() -> tuple[Setting, ...]:
    hints = get_type_hints(TrainRequest)
    return tuple(
        Setting(
            name=f.name,
            kind=hints[f.name],
            label=f.metadata["label"],
            help=f.metadata["help"],
            row=f.metadata["row"],
            choices=tuple(f.metadata.get("choices", ())),
            maximum=f.metadata.get("maximum"),
            fixed_default=None if f.default is MISSING else f.default,
            default_factory=None if f.default_factory is MISSING else f.default_factory,
        )
        for f in fields(TrainRequest)
    )


SETTINGS = _settings()


def build_train_config(
    request: TrainRequest, model_settings: dict[str, Any], init_adapter: str | None
) -> dict[str, Any]:
    """The resolved dpo_core TrainConfig for a request, as a dict (validated by TrainConfig).

    Everything the form does not set (evaluation points, the early-stopping guard, ...) keeps
    dpo_core's defaults."""
    from dpo_core.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in asdict(request).items() if k in names}
    values.update({k: v for k, v in model_settings.items() if k in names})
    if any(request.sft().values()):  # the SFT stage: as many epochs as DPO's
        values["sft_epochs"] = request.epochs
    return TrainConfig(**values, init_adapter=init_adapter).to_dict()
