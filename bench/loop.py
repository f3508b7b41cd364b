"""The label -> train -> label loop, measured (issue 18; write-up: docs/loop.md).

    .venv/bin/python bench/loop.py run                  # every condition, rules list and figures
    .venv/bin/python bench/loop.py run --conditions rounds:2x64:parent,rounds:2x64:all --seeds 0,1
    .venv/bin/python bench/loop.py table                # the markdown tables, from the cache
    .venv/bin/python bench/loop.py run --model tiny --budget 8 --max-new-tokens 16 \\
        --conditions rounds:2x4:parent --rules figures   # a smoke run on a tiny random model

A simulated annotator follows a hidden rule (`list`: answers laid out as lists, a rule about
form; `figures`: answers that give concrete figures, a rule about content). With a fixed
budget of labels, each condition runs R rounds: the current version (the base model first)
answers unused training prompts as the Label tab samples (temperature 0.8, top-p 0.95), the
annotator judges what it is shown, and `dpo_core.trainer.train` with the project's defaults
trains the next version, continuing from the current one (`TrainConfig.init_adapter`). Each
version is measured on 32 held-out prompts never trained on, with `bench/defaults_sweep.py`'s
measures (win rate against the base's answers, relevance, fluency, KL per answer).

Conditions (`KIND:RxN[:MODE]`, N labels in each of R rounds; `KIND:R` splits `--budget`):
- `rounds`: pairs of two fresh answers (one label each); MODE says what a round trains on:
  `parent` (this round's pairs), `all` (all pairs so far), `newest` (all, weight 0.5^age);
- `kto`: KTO (loss_type "kto") on every verdict, ties too ("both good" / "both bad"), both
  class weights 1 (`kto_balance` off);
- `ktobal`: `kto` with the rarer class weighed up (`kto_balance`, the default since this bench);
- `rank4`: 4 answers ranked by the rule, their implied pairs (a ranking costs 3 labels);
- `uncertain`: the current version's least sure prompts first (`dpo_core.uncertainty`);
- `sft`: an SFT stage on the chosen answers, then DPO, in each round.

Everything is cached under bench/out/loop/<model>/ (each round's verdicts, adapter and
measures), so a rerun resumes where the last one stopped and a round shared by several
conditions (round 1 is the same for every MODE) is computed once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import defaults_sweep as ds
from bench.loop_base import (
    KTO_KINDS,
    LOOP_RULES,
    MODES,
    SAMPLE_BATCH,
    Arm,
    Bench,
    Condition,
    Lineage,
    Screen,
    default_conditions,
    labels_of,
    open_bench,
    out_dir,
    parse_condition,
    sample_answers,
    version,
)
from bench.loop_selflabel import SelfLabels, check_table, run_check, self_labels
from bench.loop_tables import print_tables, stderr
from dpo_core import losses, trainer
from dpo_core.config import TrainConfig

SAME_ROUND1 = ("kto", "ktobal", "sft", "rpo")  # round 1 shows `rounds` round 1 (sibling_screens)
RPO_ALPHA = 1.0  # `rpo`: the weight of the chosen answers' NLL (TRL's and the RPO paper's value)
MAX_PASSES = 8  # a round shows each of its prompts at most this many times (16 answers)
NEWEST_DECAY = 0.5  # `newest`: a pair labelled k rounds ago weighs 0.5^k

logger = logging.getLogger("loop")


def unavailable(cond: Condition) -> str | None:
    """Why dpo_core cannot run `cond` yet (another part of issue 18 adds it), or None."""
    if cond.kind in KTO_KINDS and "kto" not in losses.LOSS_TYPES:
        return 'dpo_core.losses has no loss_type "kto" yet'
    if cond.kind == "uncertain" and importlib.util.find_spec("dpo_core.uncertainty") is None:
        return "there is no dpo_core/uncertainty.py yet"
    if cond.kind == "sft" and not sft_supported():
        return "dpo_core.trainer.train takes no sft_examples (or TrainConfig no sft_epochs) yet"
    if cond.mode == "newest" and cond.rounds > 1 and not weights_supported():
        return 'the trainer does not read a pair\'s "weight" yet'
    return None


def sft_supported() -> bool:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return "sft_epochs" in fields and "sft_examples" in inspect.signature(trainer.train).parameters


def weights_supported() -> bool:
    from dpo_core import data

    return "weight" in {f.name for f in dataclasses.fields(data.TokenizedPair)}


def label_round(
    bench: Bench, model: Any, arm: Arm, round_no: int, prompts: list[str]
) -> list[Screen]:
    """Show the round's prompts, a chunk at a time and round-robin (each prompt once, then
    each again with new answers, ...), until the round's labels are spent."""
    cond = arm.cond
    chunk = max(1, SAMPLE_BATCH // cond.answers_per_screen)
    screens: list[Screen] = []
    for visit in range(MAX_PASSES):
        for start in range(0, len(prompts), chunk):
            part = prompts[start : start + chunk]
            seed = 1_000_000 * arm.seed + 10_000 * round_no + 100 * visit + start // chunk
            answers = sample_answers(bench, model, part, cond.answers_per_screen, seed)
            for prompt, texts in zip(part, answers, strict=True):
                screens.append(arm.judge(round_no, prompt, texts))
                if spent(screens, cond):
                    return screens
    logger.warning(
        "round %d: only %d of %d labels after %d passes over %d prompts",
        round_no,
        labels_of(screens, cond),
        cond.per_round,
        MAX_PASSES,
        len(prompts),
    )
    return screens


def sibling_screens(bench: Bench, arm: Arm, round_no: int) -> list[Screen] | None:
    """The round's verdicts as a sibling arm labelled them, if one has: the same version's
    answers to the same prompts, sampled with the same seeds, so the same screens (only what
    each arm trains on differs). Round 2 of another MODE of `rounds`; round 1 of `rounds` for
    `kto`, `ktobal` and `sft` (two answers to the same share of prompts, on the base model)."""
    for sibling in siblings(arm, round_no):
        folder = sibling.folder(bench.out, round_no)
        if (folder / "record.json").exists():
            logger.info("%s round %d: the screens of %s", arm.name, round_no, sibling.name)
            return [Screen(**row) for row in ds.read_jsonl(folder / "screens.jsonl")]
    return None


def siblings(arm: Arm, round_no: int) -> list[Arm]:
    """The arms whose round `round_no` shows what `arm`'s does (see `sibling_screens`)."""
    cond = arm.cond
    if round_no == 1 and cond.kind in SAME_ROUND1:
        return [Arm(dataclasses.replace(cond, kind="rounds"), arm.rule, arm.seed)]
    if round_no == 2 and cond.kind == "rounds":
        others = [m for m in MODES if m != cond.mode]
        return [Arm(dataclasses.replace(cond, mode=m), arm.rule, arm.seed) for m in others]
    if round_no == 2 and cond.kind == "self":  # v1 is `rounds`' v1: the same screens
        return [Arm(rounds_twin(cond, m), arm.rule, arm.seed) for m in MODES]
    return []


def rounds_twin(cond: Condition, mode: str | None = None) -> Condition:
    """The `rounds` condition a `self` condition adds self-labels to."""
    twin = dataclasses.replace(cond, kind="rounds", times=0, scorer="")
    return dataclasses.replace(twin, mode=mode) if mode else twin


def spent(screens: list[Screen], cond: Condition) -> bool:
    """Whether the round's labels are spent: another verdict would overdraw them."""
    return cond.per_round - labels_of(screens, cond) < cond.labels_per_screen


def round_prompts(bench: Bench, arm: Arm, round_no: int, state: Lineage, model: Any) -> list[str]:
    """The round's share of the training prompts (1/R of them, none shown before); for
    `uncertain`, as many of the unused prompts, those the current version is least sure of."""
    prompts, rounds = bench.train_prompts, arm.cond.rounds
    share = prompts[(round_no - 1) * len(prompts) // rounds : round_no * len(prompts) // rounds]
    if arm.cond.kind != "uncertain":
        return share
    shown = {s.prompt for s in state.screens}
    pool = [p for p in prompts if p not in shown]
    seed = 1_000_000 * arm.seed + 10_000 * round_no + 9_999  # apart from label_round's
    return least_sure_first(bench, model, pool, seed)[: len(share)]


def least_sure_first(bench: Bench, model: Any, prompts: list[str], seed: int) -> list[str]:
    """`prompts`, least sure first: the version's margin between two answers it samples to
    each (`dpo_core.uncertainty.pair_margins`: the implicit-reward margin of an adapter, the
    mean per-token log-prob difference for the base); two identical answers count as sure."""
    from dpo_core import uncertainty

    answers = sample_answers(bench, model, prompts, 2, seed)
    pairs = [uncertainty.AnswerPair(p, a, b) for p, (a, b) in zip(prompts, answers, strict=True)]
    adapter = None if model is bench.lm.model else model.active_adapter
    scorer = dataclasses.replace(bench.lm, model=model)  # the version, adapter on
    margins = uncertainty.pair_margins(scorer, pairs, adapter).values
    sure = [math.inf if a == b else m for (a, b), m in zip(answers, margins, strict=True)]
    return [prompts[i] for i in sorted(range(len(prompts)), key=sure.__getitem__)]


# --- one round ------------------------------------------------------------------------------


def training_rows(arm: Arm, screens: list[Screen], round_no: int) -> list[dict[str, Any]]:
    """What the round trains on: this round's verdicts (`parent`) or all so far (`all`,
    `newest` with the weight 0.5^age), as pairs or, for `kto`, as unpaired rows."""
    mode = arm.cond.mode
    used = [s for s in screens if mode != "parent" or s.round == round_no]
    if arm.cond.kind in KTO_KINDS:
        return [row for s in used for row in s.unpaired()]
    rows = []
    for screen in used:
        weight = NEWEST_DECAY ** (round_no - screen.round) if mode == "newest" else None
        for pair in screen.pairs(arm.rule):
            rows.append(pair if weight is None else {**pair, "weight": weight})
    return rows


def train_round(
    bench: Bench, arm: Arm, rows: list[dict[str, Any]], parent: Path | None, out_dir: Path
) -> tuple[Path | None, dict[str, Any]]:
    """Train the next version with the project's defaults, continuing from `parent`."""
    if not rows:
        return parent, {"stop_reason": "no verdict to train on: the version stays as it was"}
    settings: dict[str, Any] = {"kl_max_new_tokens": bench.max_new_tokens, "seed": arm.seed}
    settings["init_adapter"] = str(parent) if parent else None
    heldout = bench.heldout_pairs(arm.rule)
    extra: dict[str, Any] = {}
    if arm.cond.kind in KTO_KINDS:
        settings["loss_type"] = "kto"
        settings["kto_balance"] = arm.cond.kind == "ktobal"  # kto: the weights as given (1, 1)
    if arm.cond.kind == "rpo":
        settings["rpo_alpha"] = RPO_ALPHA
    if arm.cond.kl_ceiling is not None:
        settings["kl_ceiling"] = arm.cond.kl_ceiling
    if arm.cond.kind == "sft":
        settings["sft_epochs"] = TrainConfig().epochs  # as the Train tab: as many as DPO's
        extra["sft_examples"] = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    t0 = time.perf_counter()
    result = trainer.train(
        bench.lm,
        rows,
        TrainConfig(**settings),
        out_dir,
        heldout=heldout,
        kl_prompts=bench.heldout.prompts,
        **extra,
    )
    return result.adapter_dir, {
        "stop_reason": result.stop_reason,
        "train_minutes": (time.perf_counter() - t0) / 60,
        "steps": result.metrics.get("steps"),
        "kept_step": result.metrics.get("kept_step"),
        "within_kl_ceiling": result.metrics.get("within_kl_ceiling"),
    }


def run_round(bench: Bench, arm: Arm, round_no: int, state: Lineage, folder: Path) -> None:
    """Label the current version's answers, train, measure; write the round's folder
    (`record.json` last: a folder without it is an unfinished round, redone)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    new = sibling_screens(bench, arm, round_no)
    if new is None:
        with version(bench.lm, state.adapter) as model:
            prompts = round_prompts(bench, arm, round_no, state, model)
            new = label_round(bench, model, arm, round_no, prompts)
    rows = training_rows(arm, [*state.screens, *new], round_no)
    own = SelfLabels()
    if arm.cond.kind == "self" and round_no > 1:
        own = self_labels(bench, arm, state, new, round_no)
        if not own.rows and same_as_twin(bench, arm, round_no, new, own):
            return
    rows += own.rows
    logger.info(
        "%s round %d: %d screens, %d labels, training on %d rows",
        *(arm.name, round_no),
        *(len(new), labels_of(new, arm.cond), len(rows)),
    )
    adapter, training = train_round(bench, arm, rows, state.adapter, folder / "adapter")
    record = {"round": round_no, **training, **measure_version(bench, adapter, arm.seed)}
    record |= {"rows_trained": len(rows), "minutes": (time.perf_counter() - t0) / 60}
    record |= own.record
    record["adapter"] = str(adapter.relative_to(bench.out)) if adapter else None
    ds.append_jsonl(folder / "screens.jsonl", [dataclasses.asdict(s) for s in new])
    (folder / "record.json").write_text(json.dumps(record))


def same_as_twin(bench: Bench, arm: Arm, round_no: int, new: list[Screen], own: SelfLabels) -> bool:
    """With no self-label kept a `self` round trains what its `rounds` twin trained: reuse
    that round's version and measures if it is run (True), noting the self-label record."""
    twin = Arm(rounds_twin(arm.cond), arm.rule, arm.seed).folder(bench.out, round_no)
    if not (twin / "record.json").exists():
        return False
    record = json.loads((twin / "record.json").read_text()) | own.record
    record["same_as"] = str(twin.relative_to(bench.out))
    folder = arm.folder(bench.out, round_no)
    ds.append_jsonl(folder / "screens.jsonl", [dataclasses.asdict(s) for s in new])
    (folder / "record.json").write_text(json.dumps(record))
    logger.info("%s round %d: no self-label kept, the same as %s", arm.name, round_no, twin)
    return True


def measure_version(bench: Bench, adapter: Path | None, seed: int) -> dict[str, Any]:
    """defaults_sweep's measures of a version on the held-out prompts, plus the standard
    error of each rule's win rate over the answers."""
    with version(bench.lm, adapter) as model:
        out = ds.measure(
            bench.lm,
            model,
            bench.heldout,
            seed,
            bench.measure_samples,
            LOOP_RULES,
            bench.max_new_tokens,
        )
    answers = list(zip(bench.heldout.prompts * bench.measure_samples, out["answers"], strict=True))
    for rule in LOOP_RULES:
        out[f"{rule}/win_stderr"] = win_stderr(bench, rule, answers)
    return out


def win_stderr(bench: Bench, rule: str, answers: list[tuple[str, str]]) -> float:
    """The standard error of a win rate over the answers (each against the base's answers to
    its prompt)."""
    per_answer = [
        ds.rule_metrics(rule, [(prompt, text)], bench.heldout.base, LOOP_RULES)[rule + "/win_rate"]
        for prompt, text in answers
    ]
    return stderr(per_answer)


# --- an arm, resumable ----------------------------------------------------------------------


def run_arm(bench: Bench, arm: Arm) -> None:
    """Every round of the arm, each computed once and then read from the cache; one line per
    round in results.jsonl."""
    state = Lineage()
    for round_no in range(1, arm.cond.rounds + 1):
        folder = arm.folder(bench.out, round_no)
        if not (folder / "record.json").exists():
            run_round(bench, arm, round_no, state, folder)
        record = json.loads((folder / "record.json").read_text())
        new = [Screen(**row) for row in ds.read_jsonl(folder / "screens.jsonl")]
        state.screens += new
        state.adapter = bench.out / record["adapter"] if record["adapter"] else None
        line = {"condition": arm.cond.name, "kind": arm.cond.kind, "mode": arm.cond.mode}
        line |= {"rule": arm.rule, "seed": arm.seed, "screens": len(state.screens)}
        line |= {"labels": labels_of(state.screens, arm.cond), "round_screens": len(new)}
        note_result(bench, line | {k: v for k, v in record.items() if k != "answers"})
        logger.info("%s round %d: %s", arm.name, round_no, ds.brief(record, arm.rule))


def note_result(bench: Bench, line: dict[str, Any]) -> None:
    """Add a line to results.jsonl unless that condition, rule, seed and round are there."""
    if not has_result(bench, line):
        ds.append_jsonl(bench.out / "results.jsonl", [line])


def has_result(bench: Bench, line: dict[str, Any]) -> bool:
    key = ("condition", "rule", "seed", "round")
    results = ds.read_jsonl(bench.out / "results.jsonl")
    return any(all(r.get(k) == line[k] for k in key) for r in results)


def measure_base(bench: Bench, seed: int, rule: str) -> None:
    """The base model's own row (its win rate against its own answers is about 0.5), once for
    every rule (`rule` None); a rule added since then gets a row of its own."""
    results = ds.read_jsonl(bench.out / "results.jsonl")
    earlier = [r for r in results if r["condition"] == "base" and r["seed"] == seed]
    if any(f"{rule}/win_rate" in r for r in earlier):
        return
    line = {"condition": "base", "rule": rule if earlier else None, "seed": seed, "round": 0}
    t0 = time.perf_counter()
    record = measure_version(bench, None, seed)
    record.pop("answers")
    line |= {"labels": 0, "screens": 0, "rows_trained": 0}
    note_result(bench, line | record | {"minutes": (time.perf_counter() - t0) / 60})


# --- the command line -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model", default="embedded", help="embedded, tiny (the tests' random model) or a dir"
    )
    common.add_argument(
        "--rules", default=",".join(LOOP_RULES), help=f"comma-separated: {', '.join(LOOP_RULES)}"
    )
    common.add_argument(
        "--max-new-tokens", type=int, default=ds.MAX_NEW_TOKENS, help="tokens per answer"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--budget", type=int, default=128, help="labels per condition")
    run.add_argument(
        "--conditions",
        help="comma-separated KIND:RxN[:MODE] or KIND:R[:MODE] (N = budget / R), e.g. "
        "rounds:2x64:parent; default: every condition (docs/loop.md)",
    )
    run.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    run.add_argument(
        "--measure-samples", type=int, default=1, help="answers per held-out prompt (4: less noise)"
    )
    run.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)"
    )
    sub.add_parser("run", parents=[common, run], help="run the conditions (cached per round)")
    sub.add_parser(
        "check",
        parents=[common, run],
        help="each self-label scorer on round 2's screens of the conditions (run them first)",
    )
    sub.add_parser("table", parents=[common], help="print the markdown tables from the cache")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Arguments, the lists parsed and checked (a bad one: argparse's error, exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in args.rules if r not in LOOP_RULES] or ([] if args.rules else ["''"])
    if unknown:
        parser.error(f"--rules: unknown {', '.join(unknown)}; choose from {', '.join(LOOP_RULES)}")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.command in ("run", "check"):
        try:
            args.seeds = parse_seeds(args.seeds)
            if args.budget < 1 or args.measure_samples < 1:
                raise ValueError("--budget and --measure-samples must be at least 1")
            specs = args.conditions.split(",") if args.conditions else []
            conditions = [parse_condition(s, args.budget) for s in specs]
            args.conditions = conditions or default_conditions(args.budget)
        except ValueError as err:
            parser.error(str(err))
    return args


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds: expected whole numbers and commas, got {text!r}") from None


def run_command(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    runnable = []
    for cond in args.conditions:
        why = unavailable(cond)
        if why:
            print(f"skipping {cond.name}: {why}")
        else:
            runnable.append(cond)
    bench = open_bench(args.model, args.max_new_tokens, args.measure_samples)
    failed = []
    for arm in [Arm(c, r, s) for s in args.seeds for c in runnable for r in args.rules]:
        measure_base(bench, arm.seed, arm.rule)
        try:
            run_arm(bench, arm)
        except Exception:  # one broken arm must not cost the others' hours
            logger.exception("%s failed", arm.name)
            failed.append(arm.name)
    print_tables(bench.out, args.rules)
    for name in failed:
        print(f"failed: {name} (the log above says why)")
    return 1 if failed else 0


def check_command(args: argparse.Namespace) -> int:
    """The scorer check on round 2 of every condition, rule and seed asked for."""
    torch.set_num_threads(args.threads)
    bench = open_bench(args.model, args.max_new_tokens, args.measure_samples)
    missing = 0
    for arm in [Arm(c, r, s) for s in args.seeds for c in args.conditions for r in args.rules]:
        try:
            print(check_table(arm, run_check(bench, arm)) + "\n")
        except FileNotFoundError as err:
            print(f"not checked: {err}")
            missing += 1
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "table":
        print_tables(out_dir(args.model, args.max_new_tokens), args.rules)
        return 0
    return check_command(args) if args.command == "check" else run_command(args)


if __name__ == "__main__":
    sys.exit(main())
