"""`python -m dpo_core train`: DPO on a JSONL file of pairs, with a progress bar.

Every `TrainConfig` field is a flag (`--beta 0.2`, `--loss-type ipo`, `--no-share-prompt`);
`--config train_config.json` starts from a saved config, the same run (model, dtype, device and
init adapter included); only the flags given override it.

Under `torchrun --nproc_per_node N -m dpo_core train ...` (or `accelerate launch -m dpo_core
train ...`) the N processes train data-parallel (`dpo_core.distributed`): the same global batch
per step, rank 0 shows the progress and writes the adapter.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import Field, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_core import distributed
from dpo_core.config import TrainConfig
from dpo_core.modeling import LoadedModel, add_model_args, load_model
from dpo_core.pairs_file import load_pairs_jsonl, load_prompts_jsonl

if TYPE_CHECKING:
    from dpo_core.trainer import TrainResult

logger = logging.getLogger(__name__)

# Set by add_model_args' flags (--adapter is init_adapter), not by one flag per field.
MODEL_FIELDS = ("model", "dtype", "load_in_4bit", "device", "init_adapter")
FLAG_TYPES: dict[str, Any] = {
    "int": int,
    "int | None": int,
    "float": float,
    "float | None": float,
    "str": str,
}


def add_train_parser(sub: Any) -> None:
    """Register the `train` subcommand: its files, the model flags and one flag per
    `TrainConfig` field. A flag not given stays out of the namespace (`argparse.SUPPRESS`), so
    `build_config` can tell it from a saved config's value."""
    p = sub.add_parser("train", help="train a DPO LoRA adapter on a JSONL file of pairs")
    p.add_argument(
        "--pairs",
        required=True,
        type=Path,
        help="JSONL: prompt, chosen, rejected (optional weight); for --loss-type kto also "
        "single answers: prompt, completion, label (true/false)",
    )
    p.add_argument("--out", required=True, type=Path, help="new adapter directory to write")
    p.add_argument("--heldout", type=Path, help="JSONL of held-out pairs to evaluate")
    p.add_argument(
        "--kl-prompts-from",
        type=Path,
        metavar="JSONL",
        help="sample the KL readout from these prompts (a `prompt` per line; default: the "
        "held-out pairs' prompts)",
    )
    p.add_argument(
        "--sft",
        type=Path,
        metavar="JSONL",
        help="SFT examples (`prompt`, `completion` per line) to train on before DPO, for "
        "--sft-epochs passes (the DPO reference is then the SFT'd model)",
    )
    p.add_argument("--config", type=Path, help="a train_config.json to start from")
    add_model_args(p, keep_unset=True)
    for f in fields(TrainConfig):
        if f.name not in MODEL_FIELDS:
            _add_field_flag(p, f)
    p.set_defaults(func=cmd_train)


def _add_field_flag(parser: argparse.ArgumentParser, f: Field[Any]) -> None:
    flag = "--" + f.name.replace("_", "-")
    default = " ".join(f.default) if isinstance(f.default, tuple) else f.default
    kwargs = {"help": f"{f.metadata['help']} (default: {default})", "default": argparse.SUPPRESS}
    if f.type == "bool":
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif f.type.startswith("tuple"):
        parser.add_argument(flag, nargs="+", **kwargs)
    else:
        parser.add_argument(flag, type=FLAG_TYPES[f.type], **kwargs)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The saved config (if any), then every flag given: a saved config starts the same run,
    its model, dtype, device and init adapter included, unless a flag says otherwise."""
    values = read_saved_config(args.config) if args.config else {}
    given = vars(args)
    for f in fields(TrainConfig):
        dest = "adapter" if f.name == "init_adapter" else f.name
        if dest in given:
            values[f.name] = given[dest]
    return TrainConfig.from_dict(values)


def read_saved_config(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read a config ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config is a JSON object of TrainConfig fields")
    return values


class ProgressBar:
    """A tqdm bar fed by `on_step`, showing loss and reward accuracy."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, metrics: dict[str, float]) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=int(metrics["total_steps"]), desc="train", unit="step")
        if "sft/loss" in metrics:  # the SFT stage before DPO
            self.bar.set_postfix(sft_loss=f"{metrics['sft/loss']:.4f}")
        else:
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}"
            )
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopOnInterrupt:
    """Ctrl-C asks the loop to stop between steps (a second Ctrl-C aborts at once)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort)...", file=sys.stderr)

    def __call__(self) -> bool:
        return self.requested

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self.previous)


@dataclass(frozen=True)
class TrainInputs:
    """The files `train` reads, read and checked before the model is loaded."""

    pairs: list[dict[str, Any]]
    heldout: list[dict[str, Any]] | None
    kl_prompts: list[str] | None
    sft_examples: list[dict[str, Any]] | None = None


def cmd_train(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.out.exists():
        raise FileExistsError(f"{args.out} already exists; choose a new adapter directory")
    inputs = read_inputs(args, config.loss_type)
    check_sft_flags(config, inputs)
    comm, device = distributed.init_from_env(config.device)
    try:
        t0 = time.perf_counter()
        lm = load_model(
            config.model, dtype=config.dtype, load_in_4bit=config.load_in_4bit, device=device
        )
        logger.info("model loaded in %.1f s", time.perf_counter() - t0)
        result = train_with_progress(lm, inputs, config, args.out, comm)
    finally:
        distributed.close()
    return report(result) if comm.is_main else (130 if result.cancelled else 0)


def read_inputs(args: argparse.Namespace, loss_type: str = "sigmoid") -> TrainInputs:
    """Pairs (KTO: unpaired examples or pairs), held-out ones, KL prompts and SFT examples; a
    bad file fails here, naming its row."""
    from dpo_core.data import normalise_kto, normalise_pairs
    from dpo_core.losses import UNPAIRED_LOSS_TYPES
    from dpo_core.sft import check_examples

    check = normalise_kto if loss_type in UNPAIRED_LOSS_TYPES else normalise_pairs
    pairs = load_pairs_jsonl(args.pairs)
    check(pairs, source=str(args.pairs))
    heldout = None
    if args.heldout:
        heldout = load_pairs_jsonl(args.heldout)
        check(heldout, source=str(args.heldout))
    kl_prompts = load_prompts_jsonl(args.kl_prompts_from) if args.kl_prompts_from else None
    sft_examples = None
    if args.sft:
        sft_examples = check_examples(load_pairs_jsonl(args.sft, "SFT examples"), str(args.sft))
    return TrainInputs(pairs, heldout, kl_prompts, sft_examples)


def check_sft_flags(config: TrainConfig, inputs: TrainInputs) -> None:
    """--sft and --sft-epochs go together (before the model is loaded)."""
    if inputs.sft_examples and config.sft_epochs == 0:
        raise ValueError("--sft needs --sft-epochs N (N >= 1): how many passes over the examples")
    if config.sft_epochs and not inputs.sft_examples:
        raise ValueError(
            f"sft_epochs is {config.sft_epochs} (--sft-epochs or --config) but no --sft "
            "FILE.jsonl of examples was given"
        )


def train_with_progress(
    lm: LoadedModel, inputs: TrainInputs, config: TrainConfig, out: Path, comm: distributed.Comm
) -> TrainResult:
    """`train` in the process group `comm`, with a progress bar on its rank 0; Ctrl-C stops
    between steps."""
    from dpo_core.trainer import train

    progress, stop = (ProgressBar() if comm.is_main else None), StopOnInterrupt()
    try:
        return train(
            lm,
            inputs.pairs,
            config,
            out,
            heldout=inputs.heldout,
            kl_prompts=inputs.kl_prompts,
            sft_examples=inputs.sft_examples,
            on_step=progress,
            should_stop=stop,
            comm=comm,
        )
    finally:
        if progress is not None:
            progress.close()
        stop.restore()


def report(result: TrainResult) -> int:
    """Print how the run ended; the exit status (130: cancelled)."""
    if result.cancelled:
        print("training cancelled; no adapter was saved")
        return 130
    print(format_metrics(result.metrics))
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(result.stop_reason)
    print(f"adapter saved to {result.adapter_dir}")
    return 0


def format_metrics(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:.4g}" for k, v in metrics.items())
