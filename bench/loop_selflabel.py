"""Self-labels in the loop (issue 27; write-up: docs/loop.md): how well each scorer judges a
version's *own* answers, and the `self` arm that adds the trusted ones to a round's training.

- The scorer check (`bench/loop.py check`): after round 1's version v1, round 2's screens are
  v1's own answers judged by the simulated annotator's rule. Each scorer of
  `dpo_core.self_label` signs its margin on every decisive pair (> 0: it agrees with the
  rule); its accuracy is reported on all of them, and, with the threshold `calibrate` picks
  from the first `CALIBRATION` of them (what people would have labelled first), on the rest.
  The reward-model head is fitted on round 1's pairs (the base model's answers).
- The `self` arm (`self:RxN:MODE:Tx[:SCORER]`): from round 2 on, the version samples two
  answers to training prompts that people do not label this round, and the scorer labels
  them; pairs at or above the calibrated threshold are kept, surest first, at most T per
  human label of the round. None when the scorer earns no trust: the arm is then `rounds`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from bench import defaults_sweep as ds
from bench.loop_base import (
    LOOP_RULES,
    Arm,
    Bench,
    Lineage,
    Screen,
    sample_answers,
    usable,
    version,
)
from dpo_core.modeling import LoadedModel
from dpo_core.self_label import (
    REWARD_MODEL,
    SCORERS,
    AnswerPair,
    RewardHead,
    SelfLabel,
    calibrate,
    fit_reward_model,
    keep_labels,
    signed_margins,
)

CALIBRATION = 16  # people's first labels of the version's own answers that set the threshold
SELF_WEIGHT = 1.0  # a self-label's training weight (a person's pair weighs 1)
SELF_PASSES = 4  # at most this many pairs of fresh answers per unused prompt

logger = logging.getLogger("loop")


@dataclass(frozen=True)
class ScorerCheck:
    """One scorer on a version's own answers, against the rule (the simulated people)."""

    scorer: str
    pairs: int  # decisive pairs of the round
    accuracy: float  # share where the scorer prefers the rule's chosen answer
    calibration: int  # the first pairs that set the threshold
    threshold: float | None
    reason: str
    rest: int  # pairs after the calibration ones
    above: int  # of `rest`, at or above the threshold
    above_accuracy: float | None


def people_pairs(screens: list[Screen], rule: str) -> list[AnswerPair]:
    """The decisive verdicts as pairs, the rule's chosen answer first, in the order shown."""
    return [
        AnswerPair(p["prompt"], p["chosen"], p["rejected"]) for s in screens for p in s.pairs(rule)
    ]


def check_scorer(scorer: str, agreeing: list[float]) -> ScorerCheck:
    """Accuracy on all pairs, and above the threshold set by the first CALIBRATION of them."""
    n = len(agreeing)
    threshold = calibrate(agreeing[:CALIBRATION])
    rest = agreeing[CALIBRATION:]
    above = [m for m in rest if threshold.value is not None and abs(m) >= threshold.value]
    return ScorerCheck(
        scorer=scorer,
        pairs=n,
        accuracy=sum(m > 0 for m in agreeing) / n if n else float("nan"),
        calibration=min(n, CALIBRATION),
        threshold=threshold.value,
        reason=threshold.reason,
        rest=len(rest),
        above=len(above),
        above_accuracy=sum(m > 0 for m in above) / len(above) if above else None,
    )


@dataclass(frozen=True)
class VersionScorer:
    """A scorer of one version: its `LoadedModel` (adapter on) and, for the reward model, the
    head fitted on people's pairs."""

    lm: LoadedModel
    scorer: str
    head: RewardHead | None

    @classmethod
    def fit(cls, bench: Bench, model: Any, scorer: str, people: list[AnswerPair]) -> VersionScorer:
        lm = dataclasses.replace(bench.lm, model=model)
        return cls(lm, scorer, fit_reward_model(lm, people) if scorer == REWARD_MODEL else None)

    def margins(self, pairs: list[AnswerPair]) -> Tensor:
        return signed_margins(self.lm, pairs, self.scorer, self.head)


def run_check(bench: Bench, arm: Arm, round_no: int = 2) -> list[ScorerCheck]:
    """Every scorer on round `round_no`'s screens of `arm` (cached: the round must be run),
    the version being the one those screens show; written to scorer_check.json there."""
    folder = arm.folder(bench.out, round_no)
    cached = folder / "scorer_check.json"
    if cached.exists():
        return [ScorerCheck(**row) for row in json.loads(cached.read_text())]
    if not (folder / "record.json").exists():
        raise FileNotFoundError(f"{arm.name}: round {round_no} is not run yet ({folder})")
    earlier = [arm.folder(bench.out, r) for r in range(1, round_no)]
    fit = [pair for f in earlier for pair in people_pairs(read_screens(f), arm.rule)]
    own = people_pairs(read_screens(folder), arm.rule)
    record = json.loads((earlier[-1] / "record.json").read_text())
    adapter = bench.out / record["adapter"] if record["adapter"] else None
    checks = []
    with version(bench.lm, adapter) as model:
        for scorer in SCORERS:
            margins = VersionScorer.fit(bench, model, scorer, fit).margins(own).tolist()
            checks.append(check_scorer(scorer, margins))
    cached.write_text(json.dumps([dataclasses.asdict(c) for c in checks]))
    return checks


def read_screens(folder: Path) -> list[Screen]:
    return [Screen(**row) for row in ds.read_jsonl(folder / "screens.jsonl")]


def check_table(arm: Arm, checks: list[ScorerCheck]) -> str:
    """The check as a markdown table."""
    head = (
        f"scorers on v1's own answers, {arm.name} "
        f"(threshold from the first {CALIBRATION} pairs, accuracy above it on the rest)\n\n"
        "| scorer | pairs | accuracy | threshold | above / rest | accuracy above | why |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for c in checks:
        threshold = "none" if c.threshold is None else f"{c.threshold:.3g}"
        above = "" if c.above_accuracy is None else f"{c.above_accuracy:.2f}"
        lines.append(
            f"| {c.scorer} | {c.pairs} | {c.accuracy:.2f} | {threshold} "
            f"| {c.above} / {c.rest} | {above} | {c.reason} |"
        )
    return head + "\n".join(lines)


# --- the `self` arm -------------------------------------------------------------------------


@dataclass
class SelfLabels:
    """A round's self-labels as training rows, and what the round record says of them."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


def self_labels(
    bench: Bench, arm: Arm, state: Lineage, new: list[Screen], round_no: int
) -> SelfLabels:
    """The current version's labels of its own answers to prompts people do not label this
    round, kept above the threshold its first CALIBRATION human pairs of the round set."""
    t0 = time.perf_counter()
    scorer, wanted = arm.cond.scorer, arm.cond.times * arm.cond.per_round
    fit = people_pairs(state.screens, arm.rule)
    shown = {s.prompt for s in new}
    pool = [p for p in bench.train_prompts if p not in shown]
    with version(bench.lm, state.adapter) as model:
        judge = VersionScorer.fit(bench, model, scorer, fit)
        threshold = calibrate(judge.margins(people_pairs(new, arm.rule)[:CALIBRATION]).tolist())
        logger.info("%s round %d, %s: %s", arm.name, round_no, scorer, threshold.reason)
        kept = []
        if threshold.value is not None:
            kept = candidates(bench, arm, round_no, pool, (model, judge, threshold.value))
    kept = sorted(kept, key=lambda label: -label.margin)[:wanted]
    rows = [k.row(scorer, f"v{round_no - 1}") for k in kept]
    right = [ds.rule_score(arm.rule, k.chosen, LOOP_RULES) for k in kept]
    wrong = [ds.rule_score(arm.rule, k.rejected, LOOP_RULES) for k in kept]
    record = {
        "self_labels": len(rows),
        "self_reason": threshold.reason,
        "self_threshold": threshold.value,
        "self_rule_agree": sum(a > b for a, b in zip(right, wrong, strict=True)),
        "self_rule_ties": sum(a == b for a, b in zip(right, wrong, strict=True)),
        "self_minutes": (time.perf_counter() - t0) / 60,
    }
    return SelfLabels(rows, record)


def candidates(
    bench: Bench,
    arm: Arm,
    round_no: int,
    pool: list[str],
    judging: tuple[Any, VersionScorer, float],
) -> list[SelfLabel]:
    """Pairs of the version's fresh answers to `pool`, a pass at a time (at most
    SELF_PASSES), labelled by the scorer and kept at or above the threshold, until enough."""
    model, judge, threshold = judging
    wanted, kept = arm.cond.times * arm.cond.per_round, []
    for visit in range(SELF_PASSES):
        seed = 1_000_000 * arm.seed + 10_000 * round_no + 5_000 + 100 * visit
        answers = sample_answers(bench, model, pool, 2, seed)
        pairs = [AnswerPair(p, a, b) for p, (a, b) in zip(pool, answers, strict=True)]
        pairs = [p for p in pairs if usable_pair(p)]
        kept += keep_labels(pairs, judge.margins(pairs), threshold, SELF_WEIGHT)
        logger.info(
            "self-labels: pass %d, %d kept of %d pairs so far",
            visit + 1,
            len(kept),
            (visit + 1) * len(pool),
        )
        if len(kept) >= wanted:
            break
    return kept


def usable_pair(pair: AnswerPair) -> bool:
    """Both answers trainable (`loop_base.usable`) and different."""
    return usable(pair.first) and usable(pair.second) and pair.first != pair.second
