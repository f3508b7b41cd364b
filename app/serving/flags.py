"""Command-line flags of the shared decode loop and of the Label queue: prefetch, its order
(`python -m app`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import torch

from dpo_core.engine import EngineLimits
from storage.uncertainty import LEAST_LABELED, QUEUE_ORDERS, UNCERTAIN_FIRST

DEFAULTS = EngineLimits()
# The longest prompt on a CPU host by default: it prefills alone in about 5 s on the 2-core
# development machine (bench/limits.py: 1024 tokens 5.3 s, 2048 12.8 s, 7000 68.6 s). On a GPU
# the whole context prefills in well under a second, so there the default is the context.
CPU_MAX_PROMPT_TOKENS = 1024


def add_serving_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("serving many annotators")
    g.add_argument(
        "--max-rows",
        type=int,
        default=DEFAULTS.max_rows,
        help=f"answers decoded together (default {DEFAULTS.max_rows}: 8 pairs)",
    )
    g.add_argument(
        "--max-cached-tokens",
        type=int,
        default=DEFAULTS.max_cached_tokens,
        help="KV-cache positions the running answers may reserve; more requests wait in line "
        f"(default {DEFAULTS.max_cached_tokens})",
    )
    g.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longer prompts are cut to this many tokens, with a notice (default: "
        f"{CPU_MAX_PROMPT_TOKENS} on a CPU, where that prefills in a few seconds; the model's "
        "context on a GPU; 0: the context)",
    )
    g.add_argument(
        "--serial-generation",
        action="store_true",
        help="one request at a time, as before the shared decode loop (a benchmark baseline)",
    )
    g.add_argument(
        "--generation-url",
        default=os.environ.get("DPO_STUDIO_GENERATION_URL") or None,
        help="an OpenAI-compatible server (vLLM) that writes every answer, e.g. "
        "http://127.0.0.1:8000/v1; it must read the adapters at their paths here "
        "(docs/vllm.md). Default $DPO_STUDIO_GENERATION_URL, else this process",
    )
    g.add_argument(
        "--no-prefetch",
        action="store_true",
        help="do not generate an annotator's next pair before their vote",
    )
    g.add_argument(
        "--queue-order",
        choices=QUEUE_ORDERS,
        default=None,
        help="which prompts the Label queue offers first, stored for every replica: "
        f"{LEAST_LABELED} (the default) or {UNCERTAIN_FIRST} (where the served version is least "
        "sure, scored in the background; see the README). Default: keep the stored order",
    )


def engine_limits(args: argparse.Namespace) -> EngineLimits:
    return EngineLimits(
        max_rows=args.max_rows,
        max_cached_tokens=args.max_cached_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_requests=1 if args.serial_generation else None,
    )


def for_device(limits: EngineLimits, device: torch.device) -> EngineLimits:
    """The limits as served on `device`: no prompt limit given means `CPU_MAX_PROMPT_TOKENS` on
    a CPU and the model's context elsewhere (an explicit 0 means the context everywhere)."""
    if limits.max_prompt_tokens is None and device.type == "cpu":
        return replace(limits, max_prompt_tokens=CPU_MAX_PROMPT_TOKENS)
    return limits
