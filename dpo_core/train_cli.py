"""`python -m dpo_core train`: DPO on a JSONL file of pairs, with a progress bar.

Every `TrainConfig` field is a flag (`--beta 0.2`, `--loss-type ipo`, `--no-share-prompt`);
`--config train_config.json` starts from a saved config, and flags override it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from dpo_core.config import TrainConfig

logger = logging.getLogger(__name__)

MODEL_FIELDS = ("model", "dtype", "load_in_4bit", "device", "init_adapter")  # see add_model_args
FLAG_TYPES: dict[str, Any] = {"int": int, "int | None": int, "float": float, "str": str}


def add_train_parser(sub: Any, add_model_args: Any) -> None:
    """Register the `train` subcommand; `add_model_args` adds --model/--adapter/--dtype/..."""
    p = sub.add_parser("train", help="train a DPO LoRA adapter on a JSONL file of pairs")
    p.add_argument("--pairs", required=True, type=Path, help="JSONL: prompt, chosen, rejected")
    p.add_argument("--out", required=True, type=Path, help="new adapter directory to write")
    p.add_argument("--heldout", type=Path, help="JSONL of held-out pairs to evaluate")
    p.add_argument(
        "--kl-prompts-from", type=Path, metavar="JSONL",
        help="sample the KL readout from these prompts (a `prompt` per line; default: the "
        "held-out pairs' prompts)",
    )  # fmt: skip
    p.add_argument("--config", type=Path, help="a train_config.json to start from")
    add_model_args(p)
    for f in fields(TrainConfig):
        if f.name in MODEL_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {_default(f)})"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text,
                           default=argparse.SUPPRESS)  # fmt: skip
        elif f.type.startswith("tuple"):
            p.add_argument(flag, nargs="+", help=help_text, default=argparse.SUPPRESS)
        else:
            p.add_argument(flag, type=FLAG_TYPES[f.type], help=help_text,
                           default=argparse.SUPPRESS)  # fmt: skip
    p.set_defaults(func=cmd_train)


def _default(f: Any) -> Any:
    value = f.default
    return " ".join(value) if isinstance(value, tuple) else value


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Saved config (if any) < command-line flags; model flags always apply."""
    values: dict[str, Any] = {}
    if args.config:
        try:
            values = json.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{args.config}: cannot read a config ({err})") from err
    for f in fields(TrainConfig):
        if f.name not in MODEL_FIELDS and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    values.update(
        model=args.model,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        device=args.device,
        init_adapter=args.adapter,
    )
    return TrainConfig.from_dict(values)


class ProgressBar:
    """A tqdm bar fed by `on_step`, showing loss and reward accuracy."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, metrics: dict[str, float]) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=int(metrics["total_steps"]), desc="train", unit="step")
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


def cmd_train(args: argparse.Namespace) -> int:
    from dpo_core.data import normalise_pairs
    from dpo_core.modeling import load_model
    from dpo_core.trainer import load_pairs_jsonl, load_prompts_jsonl, train

    config = build_config(args)
    if args.out.exists():
        raise FileExistsError(f"{args.out} already exists; choose a new adapter directory")
    pairs = load_pairs_jsonl(args.pairs)
    heldout = load_pairs_jsonl(args.heldout) if args.heldout else None
    kl_prompts = load_prompts_jsonl(args.kl_prompts_from) if args.kl_prompts_from else None
    for checked in (pairs, heldout):  # fail on a bad file before loading the model
        if checked is not None:
            normalise_pairs(checked)
    t0 = time.perf_counter()
    lm = load_model(
        config.model, dtype=config.dtype, load_in_4bit=config.load_in_4bit, device=config.device
    )
    logger.info("model loaded in %.1f s", time.perf_counter() - t0)
    progress, stop = ProgressBar(), StopOnInterrupt()
    try:
        result = train(
            lm, pairs, config, args.out, heldout=heldout, kl_prompts=kl_prompts,
            on_step=progress, should_stop=stop,
        )  # fmt: skip
    finally:
        progress.close()
        stop.restore()
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
