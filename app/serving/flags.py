"""Command-line flags of the shared decode loop and of the Label queue: prefetch, its order
(`python -m app`)."""

from __future__ import annotations

import argparse

from dpo_core.engine import EngineLimits
from storage.uncertainty import LEAST_LABELED, QUEUE_ORDERS, UNCERTAIN_FIRST

DEFAULTS = EngineLimits()


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
        help="longer prompts are cut to this many tokens, with a notice (default: the context)",
    )
    g.add_argument(
        "--serial-generation",
        action="store_true",
        help="one request at a time, as before the shared decode loop (a benchmark baseline)",
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
