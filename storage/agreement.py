"""How much annotators agree, and how each one votes: the numbers a lead reads before training.

A *unit* is one pair of answers (two responses to one prompt), whoever saw it and on which side.
A vote is expressed per answer, not per screen side: `first` (the answer with the lower response
id is better), `second`, `tie` or `both_bad`. So two people who preferred the same answer agree
even when it was on the left for one and on the right for the other.

- Krippendorff's alpha (nominal) comes from the `krippendorff` package (Krippendorff 2011,
  "Computing Krippendorff's Alpha-Reliability").
- Gwet's AC1 (Gwet 2008; 2014, ch. 4) is written out below: it stays meaningful when one answer
  is usually preferred, where alpha and kappa collapse ("the kappa paradox"). Units with one
  vote count towards the category shares, not towards observed agreement, as in Gwet's book.
- Position bias: sides are shown in random order, so an annotator's share of "A (left) is
  better" should be near 50%; `scipy.stats.binomtest` says when it is too far to be chance.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import krippendorff
import numpy as np
from scipy.stats import binomtest
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from storage.annotators import person_filter
from storage.models import LABEL_EVENTS, LabelEvent, Preference

VALUES = ("first", "second", "tie", "both_bad")  # a vote per answer, not per side
BIAS_P_VALUE = 0.01  # flag a side preference when a fair coin gives it less often than this


@dataclass(frozen=True)
class Judgement:
    """One annotator's vote on one unit (pair of answers), expressed per answer."""

    unit: tuple[int, int]  # (lower response id, higher response id)
    annotator: str
    value: str  # one of VALUES
    chose_left: bool | None  # True: "A" (left side) won; None: a tie, both bad, or not known
    seconds: float | None


@dataclass(frozen=True)
class AnnotatorQuality:
    annotator: str
    votes: int
    agreement_with_majority: float | None  # share of units where they matched the others
    compared_units: int  # units with a strict majority among the others
    median_seconds: float | None
    share_left: float | None  # share of decisive votes for the left answer
    side_p_value: float | None  # two-sided binomial test of share_left against 0.5
    side_biased: bool
    skips: int = 0  # distinct prompts skipped
    regenerations: int = 0  # times new answers were asked for


@dataclass(frozen=True)
class UnitVotes:
    unit: tuple[int, int]
    counts: dict[str, int]  # value -> votes
    votes: int
    agree: bool
    disagreement: float  # 1 - the largest value's share


@dataclass(frozen=True)
class AgreementReport:
    alpha: float | None  # None: fewer than two units with two votes, or no variation
    ac1: float | None
    units_with_overlap: int  # units with two or more votes
    annotators: list[AnnotatorQuality]
    contested: list[UnitVotes]  # most disagreement first


def as_judgement(pref: Preference) -> Judgement:
    """A stored vote expressed per answer: which of the two responses won, not which side."""
    lo, hi = sorted((pref.response_a_id, pref.response_b_id))
    value, left = pref.choice, None
    if pref.choice in ("a", "b"):
        winner = pref.response_a_id if pref.choice == "a" else pref.response_b_id
        value = "first" if winner == lo else "second"
        if pref.left_response_id is not None:  # unknown for imported votes
            left = winner == pref.left_response_id
    return Judgement((lo, hi), pref.annotator, value, left, pref.seconds_spent)


def record_label_event(session: Session, annotator: str, prompt_id: int, kind: str) -> None:
    """Note a skip (once per annotator and prompt) or a regeneration (every time)."""
    if kind not in LABEL_EVENTS:
        raise ValueError(f"unknown label event {kind!r}; use one of {', '.join(LABEL_EVENTS)}")
    row = {"annotator": annotator.strip(), "prompt_id": prompt_id, "kind": kind}
    if kind == "skip" and session.scalar(select(LabelEvent.id).filter_by(**row).limit(1)):
        return
    session.add(LabelEvent(**row))
    session.flush()


def label_event_counts(session: Session) -> dict[str, dict[str, int]]:
    """annotator -> {kind: count}."""
    rows = session.execute(
        select(LabelEvent.annotator, LabelEvent.kind, func.count()).group_by(
            LabelEvent.annotator, LabelEvent.kind
        )
    )
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for annotator, kind, n in rows:
        counts[annotator][kind] = n
    return dict(counts)


def load_judgements(session: Session, *, people_only: bool = True) -> list[Judgement]:
    """Every stored vote as a Judgement, oldest first. `people_only` (default): people's votes
    alone, as agreement statistics take them (models' votes: storage/annotators.py)."""
    query = select(Preference).order_by(Preference.id)
    if people_only:
        query = query.where(person_filter(Preference.annotator))
    return [as_judgement(p) for p in session.scalars(query)]


def by_unit(judgements: list[Judgement]) -> dict[tuple[int, int], list[Judgement]]:
    units: dict[tuple[int, int], list[Judgement]] = defaultdict(list)
    for j in judgements:
        units[j.unit].append(j)
    return dict(units)


def krippendorff_alpha(judgements: list[Judgement]) -> float | None:
    """Nominal alpha over units with two or more votes; None when it is undefined."""
    units = [votes for votes in by_unit(judgements).values() if len(votes) >= 2]
    if not units:
        return None
    raters = sorted({j.annotator for votes in units for j in votes})
    values = sorted({j.value for votes in units for j in votes})
    if len(values) < 2:
        return None  # every vote the same value: alpha is 0/0
    row = {name: i for i, name in enumerate(raters)}
    data = np.full((len(raters), len(units)), np.nan)  # (raters, units), NaN = no vote
    for u, votes in enumerate(units):
        for j in votes:  # a unit seen twice by one person (sides swapped): the later vote counts
            data[row[j.annotator], u] = values.index(j.value)
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))


def gwet_ac1(counts_per_unit: list[list[int]]) -> float | None:
    """Gwet's AC1 from per-unit category counts, shape (units, categories).

    p_a = mean over units with r_i >= 2 of sum_k r_ik (r_ik - 1) / (r_i (r_i - 1));
    pi_k = mean over units with r_i >= 1 of r_ik / r_i;  p_e = sum_k pi_k (1 - pi_k) / (q - 1);
    AC1 = (p_a - p_e) / (1 - p_e)   (Gwet 2014, eq. 4.5 with missing ratings).
    """
    counts = np.asarray(counts_per_unit, dtype=float)
    if counts.ndim != 2 or counts.shape[1] < 2:
        return None
    r = counts.sum(axis=1)
    rated, multi = counts[r >= 1], counts[r >= 2]
    if len(multi) == 0:
        return None
    rm = multi.sum(axis=1)
    p_a = float(np.mean((multi * (multi - 1)).sum(axis=1) / (rm * (rm - 1))))
    pi = (rated / rated.sum(axis=1, keepdims=True)).mean(axis=0)
    p_e = float((pi * (1 - pi)).sum() / (counts.shape[1] - 1))
    return (p_a - p_e) / (1 - p_e)


def unit_votes(unit: tuple[int, int], votes: list[Judgement]) -> UnitVotes:
    counts = Counter(j.value for j in votes)
    top = max(counts.values())
    return UnitVotes(unit, dict(counts), len(votes), len(counts) == 1, 1 - top / len(votes))


def others_majority(votes: list[Judgement], annotator: str) -> str | None:
    """The value most of the *other* annotators gave a unit; None without a strict majority."""
    ranked = Counter(j.value for j in votes if j.annotator != annotator).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def annotator_quality(name: str, units: dict, mine: list[Judgement]) -> AnnotatorQuality:
    matched = compared = 0
    for j in mine:
        majority = others_majority(units[j.unit], name)
        if majority is not None:
            compared += 1
            matched += j.value == majority
    seconds = [j.seconds for j in mine if j.seconds is not None]
    sides = [j.chose_left for j in mine if j.chose_left is not None]
    left = sum(sides)
    p_value = binomtest(left, len(sides), 0.5).pvalue if sides else None
    return AnnotatorQuality(
        annotator=name,
        votes=len(mine),
        agreement_with_majority=matched / compared if compared else None,
        compared_units=compared,
        median_seconds=statistics.median(seconds) if seconds else None,
        share_left=left / len(sides) if sides else None,
        side_p_value=p_value,
        side_biased=p_value is not None and p_value < BIAS_P_VALUE,
    )


def agreement_report(
    judgements: list[Judgement],
    contested: int = 10,
    events: dict[str, dict[str, int]] | None = None,
) -> AgreementReport:
    """Everything the Data tab, `python -m storage stats` and the export say about agreement."""
    units = by_unit(judgements)
    per_annotator: dict[str, list[Judgement]] = defaultdict(list)
    for j in judgements:
        per_annotator[j.annotator].append(j)
    overlap = [unit_votes(u, v) for u, v in units.items() if len(v) >= 2]
    counts = [[Counter(j.value for j in v)[k] for k in VALUES] for v in units.values()]
    return AgreementReport(
        alpha=krippendorff_alpha(judgements),
        ac1=gwet_ac1(counts) if overlap else None,
        units_with_overlap=len(overlap),
        annotators=[
            replace(
                annotator_quality(n, units, v),
                skips=(events or {}).get(n, {}).get("skip", 0),
                regenerations=(events or {}).get(n, {}).get("regenerate", 0),
            )
            for n, v in sorted(per_annotator.items())
        ],
        contested=sorted(overlap, key=lambda u: (-u.disagreement, -u.votes))[:contested],
    )


@dataclass(frozen=True)
class JudgeFollowed:
    """How often people picked what an AI judge suggested (ties of the judge included)."""

    judge: str
    shown: int  # votes cast with this judge's suggestion on the page
    followed: int

    @property
    def rate(self) -> float | None:
        return self.followed / self.shown if self.shown else None


def judge_followed(session: Session) -> list[JudgeFollowed]:
    """Per judge: people's votes cast with its suggestion shown, and how many followed it."""
    followed = func.sum(case((Preference.choice == Preference.suggested_choice, 1), else_=0))
    rows = session.execute(
        select(Preference.suggested_by, func.count(), followed)
        .where(Preference.suggested_choice.is_not(None))
        .where(person_filter(Preference.annotator))  # not the judges' own votes
        .group_by(Preference.suggested_by)
        .order_by(Preference.suggested_by)
    )
    return [JudgeFollowed(judge or "?", shown, int(n or 0)) for judge, shown, n in rows]
