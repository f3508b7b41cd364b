"""The markdown tables of `bench/loop.py` (docs/loop.md), from its results.jsonl."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench import defaults_sweep as ds
from bench.loop_base import KINDS, MODES

TABLE_HEAD = (
    "| condition | round | labels | screens | pairs trained | win vs base | follows rule "
    "| relevance | vs base | fluency | KL (nats/answer) | minutes | seeds |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def cell(rows: list[dict[str, Any]], key: str, within: str | None = None, digits: int = 2) -> str:
    """Mean over the seeds ± its standard error; with one seed, ± the run's own standard
    error (`within`) when there is one."""
    values = [float(r[key]) for r in rows]
    mean = statistics.fmean(values)
    if len(values) > 1:
        return f"{mean:.{digits}f} ± {stderr(values):.{digits}f}"
    if within is not None and within in rows[0]:
        return f"{mean:.{digits}f} ± {float(rows[0][within]):.{digits}f}"
    return f"{mean:.{digits}f}"


def table(rule: str, results: list[dict[str, Any]]) -> str:
    """One markdown table: the base, then every condition measured under `rule`, by round."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        # None: the base, measured once for every rule (a rule added later: not measured)
        if r["rule"] in (rule, None) and f"{rule}/win_rate" in r:
            groups.setdefault((r["condition"], r["round"]), []).append(r)
    keys = sorted(groups, key=lambda key: order(*key))
    return TABLE_HEAD + "\n".join(table_line(rule, *key, groups[key]) for key in keys)


def table_line(rule: str, name: str, round_no: int, rows: list[dict[str, Any]]) -> str:
    """A condition's round over its seeds (relevance also as a change from the base's
    answers, which the goal bounds: within 5%)."""
    change = statistics.fmean(
        r["relevance"] / r["base_relevance"] - 1 if r["base_relevance"] else math.nan for r in rows
    )
    vs_base = "" if math.isnan(change) else f"{change:+.1%}"  # blank: the base never names it
    return (
        f"| {name} | {round_no} | {cell(rows, 'labels', digits=0)} "
        f"| {cell(rows, 'screens', digits=0)} | {cell(rows, 'rows_trained', digits=0)} "
        f"| {cell(rows, rule + '/win_rate', rule + '/win_stderr')} "
        f"| {cell(rows, rule + '/share')} | {cell(rows, 'relevance')} | {vs_base} "
        f"| {cell(rows, 'fluency')} | {cell(rows, 'kl', 'kl_stderr', digits=1)} "
        f"| {cell(rows, 'minutes', digits=1)} | {len(rows)} |"
    )


def order(name: str, round_no: int) -> tuple[int | str, ...]:
    """The base first, then the conditions in the order of `KINDS`, rounds, `MODES`, round
    (`self`: then by self-labels per label and scorer)."""
    if name == "base":
        return (-1,)
    kind, schedule, mode, *rest = name.split(":")
    ceiling = float(rest.pop()[2:]) if rest and rest[-1].startswith("kl") else 0.0
    rounds, per_round = (int(n) for n in schedule.split("x"))
    times, scorer = (int(rest[0][:-1]), rest[1]) if rest else (0, "")
    return (
        KINDS.index(kind),
        rounds,
        per_round,
        MODES.index(mode),
        times,
        scorer,
        ceiling,
        round_no,
    )


def stderr(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def print_tables(out: Path, rules: list[str]) -> None:
    results = ds.read_jsonl(out / "results.jsonl")
    for rule in rules:
        print(f"### rule `{rule}`\n\n{table(rule, results)}\n")
