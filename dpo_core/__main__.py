"""`python -m dpo_core`: generate answers, train a DPO adapter, export a version, or let a
version label pairs of its own answers (self-label)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from common.cli import setup_logging
from dpo_core.export_cli import add_export_parser
from dpo_core.modeling import ModelLoadError, add_model_args, load_model
from dpo_core.self_label_cli import add_self_label_parser
from dpo_core.train_cli import add_train_parser


def cmd_generate(args: argparse.Namespace) -> int:
    from dpo_core.generation import SamplingParams, sample_answers

    params = SamplingParams(args.temperature, args.top_p, args.max_new_tokens)
    t0 = time.perf_counter()
    lm = load_model(
        args.model,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        device=args.device,
        adapter=args.adapter,
    )
    logging.info("model loaded in %.1f s", time.perf_counter() - t0)
    answers = sample_answers(lm, args.prompt, n=args.n, params=params, seed=args.seed)
    for i, answer in enumerate(answers, 1):
        print(f"--- answer {i} ---\n{answer}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpo_core", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="sample answers to one prompt")
    add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("-n", type=int, default=2, help="number of answers")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)
    add_train_parser(sub)
    add_export_parser(sub)
    add_self_label_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ModelLoadError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
