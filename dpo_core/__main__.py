"""`python -m dpo_core`: generate answers, train a DPO adapter or export a version."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from dpo_core.export_cli import add_export_parser
from dpo_core.modeling import EMBEDDED, ModelLoadError, load_model
from dpo_core.train_cli import add_train_parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=EMBEDDED, help="`embedded`, a HF id or a directory")
    parser.add_argument("--adapter", default=None, help="a saved LoRA adapter directory")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NF4 4-bit via bitsandbytes (default: on with CUDA, off on CPU)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")


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
    add_train_parser(sub, add_model_args)
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ModelLoadError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
