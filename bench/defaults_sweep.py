"""Choose DPO Studio's training defaults by experiment (write-up: docs/defaults.md).

    .venv/bin/python bench/defaults_sweep.py sample          # answers to label (cached)
    .venv/bin/python bench/defaults_sweep.py sweep           # the grid (cached per checkpoint)
    .venv/bin/python bench/defaults_sweep.py table           # the markdown tables
    .venv/bin/python bench/defaults_sweep.py pairs --rule list --out DIR   # JSONL for the CLI
    .venv/bin/python bench/defaults_sweep.py evaluate [--adapter DIR] --rule list

The embedded model answers 96 varied prompts (bench/defaults_prompts.json), 96 new tokens at
most: 64 training prompts get 8 answers each sampled as the Label tab samples (temperature 0.8,
top-p 0.95; the first two rounds labelled answers 0-3 only); 32 held-out prompts get 2 such base
answers plus 2 from the model's own distribution (temperature 1). 64 more training prompts
(bench/defaults_prompts_more.json, third round) get 8 answers each. A rule labels the answers as
a person following it would: two answers to one prompt whose rule scores differ make a pair,
the higher one chosen (`rule_pairs`: every such two, or `fresh`: two new answers at a time, as
the Label tab shows them). Each grid point trains with `dpo_core.trainer.train` on 64 training
pairs and is measured at the end of chosen epochs on the held-out prompts:

- win rate: the rule's score of a tuned answer (Label-tab sampling) against each base answer to
  the same prompt, ties counting half; and the share of answers that follow the rule at all;
- relevance: the share of answers that mention the prompt's subject (tuned vs base answers);
- fluency: the mean per-token log-prob of the answers under the base model (tuned vs base);
- KL(tuned || base) per answer: log p_tuned(y) - log p_base(y) averaged over answers y sampled
  from the tuned model at temperature 1 (`dpo_core.kl`, as the trainer's `eval/kl`).

Everything lands in bench/out/defaults/ (samples, then one JSON line per checkpoint), so a rerun
only computes what is missing. `--threads 1` (the default) is several times faster than 2 when
other processes share the two cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_core import kl, trainer
from dpo_core.config import TrainConfig
from dpo_core.modeling import load_model

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "defaults_prompts.json"
MORE_PROMPTS = HERE / "defaults_prompts_more.json"  # 64 more training prompts (third round)
OUT = HERE / "out" / "defaults"
SAMPLES = OUT / "samples.jsonl"
RESULTS = OUT / "results.jsonl"
N_TRAIN_PROMPTS, N_HELDOUT = 64, 32
TRAIN_ANSWERS, BASE_ANSWERS = 8, 2
FIRST_ROUND_ANSWERS = 4  # the first two rounds labelled answers 0-3 of each training prompt
MAX_NEW_TOKENS = 96
LABEL_SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # what the Label tab shows a person
MAX_PAIRS = 64
TRAIN_SPLITS, HELDOUT_SPLITS = ("train",), ("heldout", "heldout_label")
MORE_SPLITS = ("train", "train_more")  # the training prompts plus MORE_PROMPTS

logger = logging.getLogger("defaults_sweep")


# --- rules ----------------------------------------------------------------------------------

LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)


def list_score(text: str) -> float:
    """Rule `list`: how many lines are bulleted or numbered list items."""
    return float(len(LIST_ITEM.findall(text)))


def tidy_list_score(text: str) -> float:
    """Rule `tidy`: 1 for an answer laid out as a list of at least 2 distinct items, else 0.
    A person asked to prefer lists prefers a list to prose, not a longer list to a shorter
    one, and not a list that loops (an item repeated, numbers aside, counts as looping)."""
    items = [re.sub(r"[\d\W_]+", " ", m).strip().lower() for m in LIST_LINE.findall(text)]
    return float(len(items) >= 2 and len(set(items)) == len(items))


LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+(\S.*)$", re.MULTILINE)


YOU = re.compile(r"\byou(?:r|rs|rself|'re|'ll|'ve)?\b", re.IGNORECASE)


def you_score(text: str) -> float:
    """Rule `you`: how often the answer addresses the reader directly (you, your, ...)."""
    return float(len(YOU.findall(text)))


Score = Callable[[str], float]  # a rule: an answer's text -> how well it follows the rule
RULES: dict[str, Score] = {"list": list_score, "you": you_score, "tidy": tidy_list_score}


def rule_score(rule: str, text: str, rules: Mapping[str, Score] = RULES) -> float:
    if rule not in rules:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(rules)}")
    return rules[rule](text)


def repetition(text: str) -> float:
    """Share of the answer's word 3-grams (numbers masked) that already occurred earlier in
    it: degenerate, looping answers score high although the base model finds them likely."""
    words = re.sub(r"\d+", "#", text.lower()).split()  # "1. x" and "2. x" repeat each other
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def mentions_subject(text: str, stems: list[str]) -> bool:
    return any(re.search(r"\b" + re.escape(s), text, re.IGNORECASE) for s in stems)


# --- stage 1: sample ------------------------------------------------------------------------


def load_prompts() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) prompt entries: a fixed shuffle of the prompt list."""
    entries = json.loads(PROMPTS.read_text())
    random.Random(0).shuffle(entries)
    return entries[:N_TRAIN_PROMPTS], entries[N_TRAIN_PROMPTS : N_TRAIN_PROMPTS + N_HELDOUT]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def sample_stage(lm: Any, batch_size: int) -> None:
    """Sample the training candidates and the held-out base answers, resuming a partial run."""
    train, heldout = load_prompts()
    first = range(FIRST_ROUND_ANSWERS)
    jobs = [("train", e["prompt"], i, LABEL_SAMPLING) for i in first for e in train]
    jobs += heldout_jobs(heldout)
    later = range(FIRST_ROUND_ANSWERS, TRAIN_ANSWERS)  # added in the third round, sampled last
    jobs += [("train", e["prompt"], i, LABEL_SAMPLING) for i in later for e in train]
    more = [e["prompt"] for e in json.loads(MORE_PROMPTS.read_text())]
    jobs += [("train_more", p, i, LABEL_SAMPLING) for i in range(TRAIN_ANSWERS) for p in more]
    sample_jobs(lm, jobs, SAMPLES, batch_size)


SampleJob = tuple[str, str, int, dict[str, float]]  # split, prompt, answer index, sampling


def heldout_jobs(heldout: list[dict[str, Any]]) -> list[SampleJob]:
    """The held-out prompts' base answers: 2 from the model's own distribution (`heldout`),
    then 2 sampled as the Label tab samples (`heldout_label`, what the win rate compares to)."""
    jobs: list[SampleJob] = [
        ("heldout", e["prompt"], i, {}) for i in range(BASE_ANSWERS) for e in heldout
    ]
    return jobs + [
        ("heldout_label", e["prompt"], i, LABEL_SAMPLING)
        for i in range(BASE_ANSWERS)
        for e in heldout
    ]


def sample_jobs(
    lm: Any,
    jobs: list[SampleJob],
    path: Path,
    batch_size: int,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> None:
    """Sample each job's answer from the base model into `path` (JSONL), `batch_size` at a
    time, skipping the jobs `path` already holds: a rerun resumes a partial run. A job's seed
    depends on its position in `jobs`, so the same list gives the same answers."""
    position = {j[:3]: n for n, j in enumerate(jobs)}
    done = {(r["split"], r["prompt"], r["index"]) for r in read_jsonl(path)}
    todo = [j for j in jobs if j[:3] not in done]
    logger.info("%d of %d answers to sample", len(todo), len(jobs))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        t0 = time.perf_counter()
        rows = []
        for params in ({"temperature": 0.8, "top_p": 0.95}, {}):
            part = [j for j in chunk if j[3] == params]
            if not part:
                continue
            seed = 1000 * (position[chunk[0][:3]] // batch_size) + len(params)
            completions = kl.sample_completions(
                lm, lm.model, [j[1] for j in part], max_new_tokens=max_new_tokens,
                seed=seed, batch_size=batch_size, **params,
            )  # fmt: skip
            for (split, _, index, _), c in zip(part, completions, strict=True):
                rows.append(sample_row(split, index, c))
        append_jsonl(path, rows)
        logger.info("sampled %d answers in %.0f s", len(rows), time.perf_counter() - t0)


def sample_row(split: str, index: int, c: kl.Completion) -> dict[str, Any]:
    return {
        "split": split,
        "prompt": c.prompt,
        "index": index,
        "text": c.text,
        "answer_ids": list(c.answer_ids),
        "finished": c.finished,
    }


def as_completion(lm: Any, row: dict[str, Any]) -> kl.Completion:
    ids = tuple(kl.prompt_ids(lm.tokenizer, row["prompt"]))
    return kl.Completion(row["prompt"], ids, tuple(row["answer_ids"]), row["text"], row["finished"])


# --- labelling ------------------------------------------------------------------------------


def rule_pairs(
    rule: str,
    samples: list[dict[str, Any]],
    splits: tuple[str, ...],
    answers: int = FIRST_ROUND_ANSWERS,
    fresh: bool = False,
    rules: Mapping[str, Score] = RULES,
) -> list[dict[str, Any]]:
    """Pairs a person following the rule would label from the first `answers` answers of each
    prompt of `splits`, the higher-scoring answer chosen, ties skipped, ordered round-robin
    over the prompts so the first N pairs spread over as many prompts as possible.

    By default every two answers whose scores differ make a pair (largest score gap first), so
    one answer can appear in several pairs. `fresh` pairs the answers as the Label tab shows
    them, two new answers at a time (answers 0 and 1, 2 and 3, ...): every answer is judged at
    most once."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in samples:
        if row["split"] in splits and row["text"] and row["index"] < answers:
            by_prompt.setdefault(row["prompt"], []).append(row)
    queues = []
    for prompt, rows in by_prompt.items():
        rows = sorted(rows, key=lambda r: r["index"])
        scored = [(rule_score(rule, r["text"], rules), r["text"]) for r in rows]
        if fresh:
            shown = [(scored[i], scored[i + 1]) for i in range(0, len(scored) - 1, 2)]
            shown = [(a, b) if a[0] > b[0] else (b, a) for a, b in shown if a[0] != b[0]]
        else:
            shown = sorted(
                ((a, b) for a in scored for b in scored if a[0] > b[0]),
                key=lambda ab: ab[1][0] - ab[0][0],
            )
        queues.append([{"prompt": prompt, "chosen": a[1], "rejected": b[1]} for a, b in shown])
    pairs = []
    for depth in range(max((len(q) for q in queues), default=0)):
        pairs += [q[depth] for q in queues if depth < len(q)]
    return pairs


# --- measuring a model on the held-out prompts -----------------------------------------------


@dataclass
class Heldout:
    """The held-out prompts, their subjects and the base model's answers (2 per prompt)."""

    prompts: list[str]
    subjects: dict[str, list[str]]
    base: dict[str, list[dict[str, Any]]]  # prompt -> sample rows
    base_fluency: dict[str, list[float]]  # prompt -> per-token base log-prob of each answer


def heldout_base_rows(samples: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Held-out prompt -> the base answers sampled for it (Label-tab sampling), prompt order."""
    _, entries = load_prompts()
    base: dict[str, list[dict[str, Any]]] = {e["prompt"]: [] for e in entries}
    for row in samples:
        if row["split"] == "heldout_label":
            base[row["prompt"]].append(row)
    return base


def load_heldout(lm: Any, samples: list[dict[str, Any]]) -> Heldout:
    _, entries = load_prompts()
    base = heldout_base_rows(samples)
    rows = [r for p in base for r in base[p]]
    logps = kl.answer_logps(lm, lm.model, [as_completion(lm, r) for r in rows])
    fluency: dict[str, list[float]] = {p: [] for p in base}
    for row, logp in zip(rows, logps.tolist(), strict=True):
        fluency[row["prompt"]].append(logp / len(row["answer_ids"]))
    subjects = {e["prompt"]: e["subject"] for e in entries}
    return Heldout(list(base), subjects, base, fluency)


def measure(
    lm: Any,
    model: Any,
    heldout: Heldout,
    seed: int = 0,
    samples: int = 1,
    rules: Mapping[str, Score] = RULES,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Compare `model` with the base on the held-out prompts: `samples` answers per prompt
    sampled as the Label tab samples (each rule's win rate, relevance, fluency) and one from
    the model's own distribution (temperature 1, for the KL(model || base) estimate)."""
    sample = {"max_new_tokens": max_new_tokens, "batch_size": len(heldout.prompts)}
    own = kl.sample_completions(lm, model, heldout.prompts, seed=10_000 + seed, **sample)
    estimate = kl.kl_from_completions(lm, model, own)
    completions = []
    for k in range(samples):  # seed 20_000 + seed first: the sweep's single sample
        completions += kl.sample_completions(
            lm, model, heldout.prompts, seed=20_000 + seed + 100 * k, **sample, **LABEL_SAMPLING
        )
    base_logps = kl.base_logps(lm, model, completions).tolist()
    base_rows = [(p, r) for p in heldout.prompts for r in heldout.base[p]]
    out: dict[str, Any] = {
        "kl": estimate.kl,
        "kl_stderr": estimate.stderr,
        "relevance": _mean(
            mentions_subject(c.text, heldout.subjects[c.prompt]) for c in completions
        ),
        "fluency": _mean(
            lp / len(c.answer_ids) for lp, c in zip(base_logps, completions, strict=True)
        ),
        "base_relevance": _mean(
            mentions_subject(r["text"], heldout.subjects[p]) for p, r in base_rows
        ),
        "base_fluency": _mean(f for p in heldout.prompts for f in heldout.base_fluency[p]),
        "answers": [c.text for c in completions],
    }
    answers = [(c.prompt, c.text) for c in completions]
    for rule in rules:
        out.update(rule_metrics(rule, answers, heldout.base, rules))
    return out


def rule_metrics(
    rule: str,
    answers: list[tuple[str, str]],
    base: dict[str, list[dict[str, Any]]],
    rules: Mapping[str, Score] = RULES,
) -> dict:
    """Win rate of each (prompt, answer) against each base answer to the same prompt (ties
    count half), and the share of answers that follow the rule at all (score > 0)."""
    outcomes, follows, base_follows = [], [], []
    for prompt, text in answers:
        score = rule_score(rule, text, rules)
        follows.append(score > 0)
        for row in base[prompt]:
            other = rule_score(rule, row["text"], rules)
            outcomes.append(1.0 if score > other else 0.5 if score == other else 0.0)
            base_follows.append(other > 0)
    return {
        f"{rule}/win_rate": _mean(outcomes),
        f"{rule}/share": _mean(follows),
        f"{rule}/base_share": _mean(base_follows),
    }


def _mean(values: Any) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


# --- stage 2: the grid ----------------------------------------------------------------------


@dataclass(frozen=True)
class GridPoint:
    """One training run of the sweep, measured at the end of the epochs in `measured`."""

    rule: str
    learning_rate: float
    beta: float
    loss_type: str = "sigmoid"
    epochs: int = 3
    pairs: int = MAX_PAIRS
    measured: tuple[int, ...] = (1, 2, 3)
    rpo_alpha: float = 0.0
    seed: int = 0
    lora_r: int = 16  # lora_alpha = 2 r, as the defaults

    @property
    def loss(self) -> str:
        return f"{self.loss_type}+rpo{self.rpo_alpha:g}" if self.rpo_alpha else self.loss_type

    @property
    def key(self) -> str:
        key = f"{self.rule} lr={self.learning_rate:g} beta={self.beta:g} {self.loss}"
        key += f" epochs={self.epochs}" + (f" seed={self.seed}" if self.seed else "")
        key += f" r={self.lora_r}" if self.lora_r != 16 else ""
        return key if self.pairs == MAX_PAIRS else f"{key} pairs={self.pairs}"


# Most informative first; measuring a checkpoint costs about as much as an epoch of training.
GRID = [
    GridPoint("list", 2e-4, 0.1),
    GridPoint("list", 5e-4, 0.1),
    GridPoint("list", 1e-4, 0.1),
    GridPoint("you", 1e-4, 0.1),
    GridPoint("list", 2e-4, 0.5),
    GridPoint("list", 5e-4, 0.5),
    GridPoint("you", 2e-4, 0.5),
    GridPoint("list", 3e-4, 0.5),
    GridPoint("list", 3e-4, 1.0),
    GridPoint("list", 5e-4, 1.0),
    GridPoint("list", 5e-5, 0.1),
    GridPoint("you", 5e-4, 0.5),
    GridPoint("you", 2e-4, 0.1),
    GridPoint("you", 5e-5, 0.1),
    GridPoint("list", 2e-4, 0.5, "ipo"),
    GridPoint("list", 2e-4, 0.5, rpo_alpha=1.0),
    GridPoint("you", 2e-4, 0.5, rpo_alpha=1.0),
    GridPoint("list", 2e-4, 0.25),
    GridPoint("tidy", 2e-4, 0.5),
    GridPoint("list", 2.5e-4, 0.5),
    GridPoint("list", 2e-4, 0.5, seed=1),
    GridPoint("list", 2.5e-4, 0.5, lora_r=4),
    GridPoint("list", 5e-4, 0.5, lora_r=4),
    GridPoint("list", 2e-4, 2.0, "ipo"),
]


def sweep_stage(lm: Any, only: str | None) -> None:
    samples = read_jsonl(SAMPLES)
    heldout = load_heldout(lm, samples)
    done = {(r["run"], r["epoch"]) for r in read_jsonl(RESULTS)}
    if ("base", 0) not in done:
        record = {"run": "base", "epoch": 0, **measure(lm, lm.model, heldout)}
        append_jsonl(RESULTS, [record])
    for point in GRID:
        if (only and only not in point.key) or all((point.key, e) in done for e in point.measured):
            continue
        run_grid_point(lm, point, samples, heldout)


def run_grid_point(lm: Any, point: GridPoint, samples: list, heldout: Heldout) -> None:
    """Train one grid point; measure and record the checkpoints at the end of the epochs in
    `point.measured` as they happen (the trainer evaluates at the end of every epoch)."""
    config = TrainConfig(
        learning_rate=point.learning_rate, beta=point.beta, loss_type=point.loss_type,
        epochs=point.epochs, early_stopping=False, kl_prompts=0, seed=point.seed,
        lora_r=point.lora_r, lora_alpha=2 * point.lora_r,
        rpo_alpha=point.rpo_alpha,
    )  # fmt: skip
    pairs = rule_pairs(point.rule, samples, TRAIN_SPLITS)[: point.pairs]
    heldout_pairs = rule_pairs(point.rule, samples, HELDOUT_SPLITS)
    logger.info("%s: %d pairs, %d held-out pairs", point.key, len(pairs), len(heldout_pairs))
    t0 = time.perf_counter()
    measured: list[dict[str, Any]] = []
    evals = 0

    def on_eval(model: Any) -> dict[str, float]:
        nonlocal evals
        evals += 1
        if evals in point.measured:
            measured.append(measure(lm, model, heldout))
        return {}

    def on_step(metrics: dict[str, float]) -> None:
        if "eval/loss" not in metrics or round(metrics["epoch"]) not in point.measured:
            return
        record = {
            "run": point.key, "rule": point.rule, "learning_rate": point.learning_rate,
            "beta": point.beta, "loss_type": point.loss, "epochs": point.epochs,
            "seed": point.seed, "lora_r": point.lora_r,
            "epoch": round(metrics["epoch"]), "pairs": len(pairs),
            "heldout_pairs": len(heldout_pairs), "train_loss": metrics["loss"],
            "eval_loss": metrics["eval/loss"], "eval_acc": metrics["eval/rewards/accuracies"],
            "minutes": (time.perf_counter() - t0) / 60, **measured[-1],
        }  # fmt: skip
        append_jsonl(RESULTS, [record])
        logger.info("%s epoch %d: %s", point.key, record["epoch"], brief(record, point.rule))

    with tempfile.TemporaryDirectory() as tmp:
        trainer.train(
            lm, pairs, config, Path(tmp) / "adapter", heldout=heldout_pairs,
            on_step=on_step, on_eval=on_eval,
        )  # fmt: skip


def brief(r: dict[str, Any], rule: str) -> str:
    return (
        f"win {r[rule + '/win_rate']:.2f} share {r[rule + '/share']:.2f} "
        f"relevance {r['relevance']:.2f} fluency {r['fluency']:.2f} kl {r['kl']:.1f}"
    )


# --- tables ---------------------------------------------------------------------------------


def _row_order(r: dict[str, Any]) -> tuple:
    return (
        r["pairs"], r["loss_type"], r.get("lora_r", 16) != 16, r.get("seed", 0), r["beta"],
        r["learning_rate"], r["epoch"],
    )  # fmt: skip


def table(rule: str, results: list[dict[str, Any]]) -> str:
    """One markdown table of every measured checkpoint trained on `rule`."""
    base = next(r for r in results if r["run"] == "base")
    if rule + "/win_rate" not in base:  # a rule added after the base was measured
        base_rows = heldout_base_rows(read_jsonl(SAMPLES))
        answers = list(zip(base_rows, base["answers"], strict=True))
        base = {**base, **rule_metrics(rule, answers, base_rows)}
    head = (
        "| lr | beta | loss | epoch | win rate | follows rule | mentions subject "
        "| fluency (base log-prob/token) | repeated 3-grams | KL (nats/answer) | held-out acc "
        "| train loss |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| base | | | | {base[rule + '/win_rate']:.2f} | {base[rule + '/share']:.2f} "
        f"| {base['relevance']:.2f} | {base['fluency']:.2f} "
        f"| {_mean(map(repetition, base['answers'])):.2f} | 0 | | |"
    ]
    rows = [r for r in results if r.get("rule") == rule]
    rows.sort(key=_row_order)
    for r in rows:
        repeated = _mean(map(repetition, r["answers"]))
        pairs = "" if r["pairs"] == MAX_PAIRS else f" ({r['pairs']} pairs)"
        pairs += f" (seed {r['seed']})" if r.get("seed") else ""
        pairs += f" (LoRA r{r['lora_r']})" if r.get("lora_r", 16) != 16 else ""
        lines.append(
            f"| {r['learning_rate']:g} | {r['beta']:g} | {r['loss_type']}{pairs} | {r['epoch']}"
            f"/{r['epochs']} | {r[rule + '/win_rate']:.2f} | {r[rule + '/share']:.2f} "
            f"| {r['relevance']:.2f} | {r['fluency']:.2f} | {repeated:.2f} "
            f"| {r['kl']:.1f} ± {r['kl_stderr']:.1f} | {r['eval_acc']:.2f} "
            f"| {r['train_loss']:.3f} |"
        )
    return head + "\n".join(lines)


def write_pairs(
    rule: str,
    out: Path,
    answers: int = FIRST_ROUND_ANSWERS,
    fresh: bool = False,
    more_prompts: bool = False,
) -> None:
    """The first 64 training pairs (`rule_pairs` of the first `answers` answers of each
    training prompt) and all held-out pairs of a rule, as JSONL for the CLI, and every
    held-out prompt (most have no pair) for the KL readout."""
    samples = read_jsonl(SAMPLES)
    splits = MORE_SPLITS if more_prompts else TRAIN_SPLITS
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (
        ("train.jsonl", rule_pairs(rule, samples, splits, answers, fresh)[:MAX_PAIRS]),
        ("heldout.jsonl", rule_pairs(rule, samples, HELDOUT_SPLITS)),
    ):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}: {len(rows)} pairs from {len({r['prompt'] for r in rows})} prompts")
    prompts = [{"prompt": e["prompt"]} for e in load_prompts()[1]]  # for --kl-prompts-from
    (out / "heldout_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    print(f"{out / 'heldout_prompts.jsonl'}: all {len(prompts)} held-out prompts")


def evaluate_adapter(adapter: Path | None, rules: list[str], samples: int = 1) -> dict[str, Any]:
    """Measure the base model, or an adapter on top of it, on the held-out prompts."""
    lm = load_model("embedded", device="cpu", adapter=str(adapter) if adapter else None)
    heldout = load_heldout_with(lm)
    result = measure(lm, lm.model, heldout, samples=samples)
    result.pop("answers")
    return {k: v for k, v in result.items() if "/" not in k or k.split("/")[0] in rules}


def load_heldout_with(lm: Any) -> Heldout:
    """`load_heldout` for a model that may carry an adapter (its base answers are scored by
    the base: the adapter is disabled)."""
    samples = read_jsonl(SAMPLES)
    if not hasattr(lm.model, "disable_adapter"):
        return load_heldout(lm, samples)
    with lm.model.disable_adapter():
        return load_heldout(lm, samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="sample answers (cached in bench/out/defaults)")
    sample.add_argument("--batch-size", type=int, default=32)
    sweep = sub.add_parser("sweep", help="train and measure the grid (cached per checkpoint)")
    sweep.add_argument("--only", help="run only grid points whose key contains this")
    sub.add_parser("table", help="print the markdown tables")
    pairs = sub.add_parser("pairs", help="write a rule's pairs as JSONL for the CLI")
    pairs.add_argument("--rule", choices=list(RULES), default="list")
    pairs.add_argument("--out", type=Path, required=True)
    pairs.add_argument(
        "--answers", type=int, default=FIRST_ROUND_ANSWERS, choices=range(2, TRAIN_ANSWERS + 1),
        metavar=f"2..{TRAIN_ANSWERS}", help="label the first N answers of each training prompt",
    )  # fmt: skip
    pairs.add_argument(
        "--fresh", action="store_true", help="pair answers 0-1, 2-3, ...: each judged once"
    )
    pairs.add_argument("--more-prompts", action="store_true", help=f"label {MORE_PROMPTS.name} too")
    evaluate = sub.add_parser("evaluate", help="measure an adapter (or the base) held out")
    evaluate.add_argument("--adapter", type=Path)
    evaluate.add_argument("--rule", choices=list(RULES), action="append")
    evaluate.add_argument(
        "--samples", type=int, default=1, help="answers per held-out prompt (4: half the noise)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "sample":
        sample_stage(load_model("embedded", device="cpu"), args.batch_size)
    elif args.command == "sweep":
        sweep_stage(load_model("embedded", device="cpu"), args.only)
    elif args.command == "table":
        results = read_jsonl(RESULTS)
        for rule in RULES:
            print(f"### rule `{rule}`\n\n{table(rule, results)}\n")
    elif args.command == "pairs":
        write_pairs(args.rule, args.out, args.answers, args.fresh, args.more_prompts)
    else:
        result = evaluate_adapter(args.adapter, args.rule or list(RULES), args.samples)
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
