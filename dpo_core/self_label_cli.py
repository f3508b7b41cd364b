"""`python -m dpo_core self-label`: a version labels pairs of its own answers.

    python -m dpo_core self-label --base B --adapter A --prompts FILE --out OUT.jsonl
        [--n N] [--scorer NAME] [--threshold auto|FLOAT] [--calibrate PAIRS.jsonl]
        [--fit PAIRS.jsonl]

FILE has one prompt per line (or a `prompt` per JSON line). `--calibrate` takes people's pairs
on A's own answers; with `--threshold auto` (the default) the threshold comes from them
(`dpo_core.self_label.calibrate`), and when no margin qualifies the command writes nothing and
says why. OUT has TRL pairs (`prompt`, `chosen`, `rejected`) plus `margin` and `weight`, which
`python -m dpo_core train --pairs OUT.jsonl` reads as is. `--scorer reward-model` fits a
reward head on the base model's hidden states to the people's pairs in `--fit` (required with
it) and labels by the difference of its scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.pair_format import parse_pairs
from dpo_core.self_label import REWARD_MODEL, SCORERS, AnswerPair, RewardHead, SelfLabel, Threshold

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThresholdArg:
    """`--threshold`: `auto` (value None: from --calibrate) or a margin >= 0."""

    value: float | None

    @classmethod
    def parse(cls, text: str) -> ThresholdArg:
        if text == "auto":
            return cls(None)
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected auto or a number, got {text!r}") from None
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"a threshold is a margin >= 0, got {text}")
        return cls(value)


def add_self_label_parser(sub: Any) -> None:
    p = sub.add_parser("self-label", help="a version labels pairs of its own answers")
    p.add_argument("--base", required=True, help="base model: embedded, a hub id or a directory")
    p.add_argument("--adapter", required=True, type=Path, help="the version's adapter directory")
    p.add_argument("--prompts", required=True, type=Path, help="one prompt per line, or JSONL")
    p.add_argument("--out", required=True, type=Path, help="JSONL of kept pairs to write")
    p.add_argument("--n", type=int, default=None, help="at most this many prompts (default all)")
    p.add_argument("--scorer", choices=SCORERS, default="margin")
    p.add_argument("--threshold", type=ThresholdArg.parse, default=ThresholdArg(None))
    p.add_argument("--calibrate", type=Path, help="people's pairs on the adapter's own answers")
    p.add_argument(
        "--fit", type=Path, help="people's pairs the reward-model scorer's head is fitted on"
    )
    p.add_argument("--weight", type=float, default=1.0, help="training weight of each kept pair")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_self_label)


def read_prompts(path: Path, limit: int | None) -> list[str]:
    """One prompt per non-blank line, or the `prompt` of a JSON object on that line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read prompts ({err})") from err
    prompts = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if text.startswith("{"):
            try:
                text = json.loads(text).get("prompt")
            except (json.JSONDecodeError, AttributeError):
                text = None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f'{path}, line {number}: expected a non-empty "prompt" string')
        if text:
            prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line, or a JSON object with a prompt)")
    return prompts[:limit] if limit is not None else prompts


def check_args(args: argparse.Namespace) -> None:
    """The usage rules, before any model is loaded."""
    if args.threshold.value is None and args.calibrate is None:
        raise ValueError(
            "no people's labels of this version's own answers: pass --calibrate PAIRS.jsonl "
            "(people's pairs on the adapter's answers) to set the threshold, or --threshold "
            "FLOAT to choose one yourself; no pairs written"
        )
    if args.scorer == REWARD_MODEL and args.fit is None:
        raise ValueError(
            "--scorer reward-model fits a reward head on people's pairs: pass --fit PAIRS.jsonl "
            "(e.g. the pairs the version was trained on); no pairs written"
        )
    if args.fit is not None and args.scorer != REWARD_MODEL:
        raise ValueError(f"--fit is for --scorer {REWARD_MODEL} only (got --scorer {args.scorer})")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if not args.weight >= 0:
        raise ValueError(f"--weight must be >= 0, got {args.weight}")
    if args.out.exists():
        raise FileExistsError(f"{args.out} exists; choose a new --out")


def people_pairs(path: Path, what: str) -> list[AnswerPair]:
    """People's pairs from a JSONL file, the chosen answer first."""
    from dpo_core.pairs_file import load_pairs_jsonl

    rows = load_pairs_jsonl(path, what)
    return [AnswerPair(p.prompt, p.chosen, p.rejected) for p in parse_pairs(rows, str(path))]


def calibration_threshold(lm: Any, path: Path, scorer: str, head: RewardHead | None) -> Threshold:
    """The threshold from people's pairs on the version's own answers (chosen put first)."""
    from dpo_core.self_label import calibrate, signed_margins

    pairs = people_pairs(path, "calibration pairs")
    return calibrate(signed_margins(lm, pairs, scorer, head).tolist())


def own_answer_pairs(
    lm: Any, prompts: list[str], max_new_tokens: int, seed: int
) -> list[AnswerPair]:
    """Two sampled answers of the active adapter to each prompt (seeds seed+2i, seed+2i+1)."""
    from dpo_core.generation import AnswerGenerator, AnswerSpec, SamplingParams

    generator = AnswerGenerator(lm)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    pairs = []
    for i, prompt in enumerate(prompts):
        specs = [AnswerSpec(params, seed + 2 * i), AnswerSpec(params, seed + 2 * i + 1)]
        first, second = generator.generate(prompt, specs).texts
        pairs.append(AnswerPair(prompt, first, second))
        logger.info("answered %d/%d prompts", i + 1, len(prompts))
    return pairs


def write_rows(path: Path, labels: list[SelfLabel], scorer: str, version: str) -> None:
    """Write the kept pairs atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for label in labels:
            f.write(json.dumps(label.row(scorer, version), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def cmd_self_label(args: argparse.Namespace) -> int:
    from dpo_core.modeling import load_model
    from dpo_core.self_label import fit_reward_model, keep_labels, labelable, signed_margins

    check_args(args)
    prompts = read_prompts(args.prompts, args.n)
    fit = people_pairs(args.fit, "pairs to fit the reward head on") if args.fit else None
    lm = load_model(args.base, dtype=args.dtype, device=args.device, adapter=args.adapter)
    head = fit_reward_model(lm, fit) if fit else None
    threshold = Threshold(args.threshold.value, None, 0, 0, "threshold given on the command line")
    if args.threshold.value is None:
        threshold = calibration_threshold(lm, args.calibrate, args.scorer, head)
        print(f"{args.scorer}: {threshold.reason}")
        if threshold.value is None:
            print(f"no pairs written to {args.out}", file=sys.stderr)
            return 1
    answered = own_answer_pairs(lm, prompts, args.max_new_tokens, args.seed)
    pairs = [p for p in answered if labelable(p)]  # an answer that ended at once: no label
    labels = []
    if pairs:
        signed = signed_margins(lm, pairs, args.scorer, head)
        labels = keep_labels(pairs, signed, threshold.value, args.weight)
    write_rows(args.out, labels, args.scorer, args.adapter.name)
    print(
        f"wrote {len(labels)} of {len(answered)} pairs to {args.out} "
        f"(scorer {args.scorer}, margin >= {threshold.value:.3g})"
    )
    return 0
