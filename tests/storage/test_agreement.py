"""Agreement statistics against published examples, and votes expressed per answer."""

from __future__ import annotations

import math

import pytest
from sqlalchemy.orm import Session

from common.pair_format import Pair
from storage.agreement import (
    Judgement,
    agreement_report,
    as_judgement,
    gwet_ac1,
    krippendorff_alpha,
    load_judgements,
)
from storage.repo import add_imported_pairs, record_preference
from tests.storage.test_repo import answers

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", example C: four observers,
# twelve units, values 1-5, missing entries None. Gwet (2014, table 4.7) uses the same data.
OBSERVERS = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, None],
    "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, 3],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
}


def published_judgements() -> list[Judgement]:
    return [
        Judgement((u, u + 100), who, str(v), None, None)
        for who, values in OBSERVERS.items()
        for u, v in enumerate(values)
        if v is not None
    ]


def test_nominal_alpha_equals_krippendorffs_published_value():
    assert krippendorff_alpha(published_judgements()) == pytest.approx(0.743, abs=5e-4)


def test_gwet_ac1_equals_the_published_value():
    """Gwet's 4-rater, 12-unit example: AC1 0.77544 (irrCAC's documented value)."""
    counts = [[sum(v[u] == k for v in OBSERVERS.values()) for k in range(1, 6)] for u in range(12)]
    assert gwet_ac1(counts) == pytest.approx(0.77544, abs=5e-5)


def test_ac1_stays_high_when_one_answer_is_usually_preferred():
    """The kappa paradox: 19 of 20 units both pick 'first', one disagrees. Alpha collapses to
    about zero; AC1 by hand: p_a = 19/20, pi = (0.975, 0.025, 0, 0), p_e = 2 * 0.975 * 0.025 / 3
    = 0.01625, AC1 = (0.95 - 0.01625) / (1 - 0.01625) = 0.94917."""
    judgements = []
    for u in range(20):
        judgements.append(Judgement((u, u + 1), "x", "first", True, None))
        judgements.append(Judgement((u, u + 1), "y", "second" if u == 0 else "first", True, None))
    report = agreement_report(judgements)
    assert report.alpha is not None and report.alpha < 0.05
    assert report.ac1 == pytest.approx(0.94917, abs=1e-5)


def vote(session: Session, shown: tuple[int, int], choice: str, who: str) -> Judgement:
    """Record a vote through the repository (left answer first) and read it back."""
    pref, _ = record_preference(
        session, response_a_id=shown[0], response_b_id=shown[1], choice=choice, annotator=who
    )
    return as_judgement(pref)


def test_a_vote_is_expressed_per_answer_not_per_side(session: Session):
    """The same answer preferred from the left and from the right side is the same value."""
    x, y = answers(session, "Name a planet.", "Mars.", "A banana.")
    left, right = vote(session, (x, y), "a", "p"), vote(session, (y, x), "b", "q")
    assert left.unit == right.unit == (x, y)
    assert left.value == right.value == "first"
    assert (left.chose_left, right.chose_left) == (True, False)
    assert vote(session, (y, x), "tie", "r").value == "tie"


def test_side_randomisation_does_not_bias_agreement(session: Session):
    """Two annotators who always prefer the same answer agree perfectly, whichever side it
    was shown on; an annotator who always presses A is flagged for position bias."""
    judgements = []
    for u in range(30):
        better, worse = answers(session, f"Question {u}?", f"Good {u}.", f"Bad {u}.")
        for who, flip in (("careful", u % 2), ("also careful", u % 3 == 0)):
            shown = (worse, better) if flip else (better, worse)
            judgements.append(vote(session, shown, "b" if flip else "a", who))
        shown = (better, worse) if u % 2 else (worse, better)
        judgements.append(vote(session, shown, "a", "presses A"))
    report = agreement_report(judgements)
    quality = {q.annotator: q for q in report.annotators}
    # where the other two agree, they agree on the better answer: so does "careful"
    assert quality["careful"].agreement_with_majority == 1.0
    assert not quality["careful"].side_biased and not quality["also careful"].side_biased
    assert quality["presses A"].side_biased and quality["presses A"].share_left == 1.0
    assert report.units_with_overlap == 30
    assert report.contested[0].disagreement == pytest.approx(1 / 3)


def test_imported_votes_have_no_side(session: Session):
    add_imported_pairs(session, [Pair("p", "x", "y")], annotator="i")
    [judgement] = load_judgements(session)
    assert judgement.chose_left is None and judgement.value in ("first", "second")


def test_agreement_with_the_others_majority():
    units = [((u, u + 1), v) for u, v in enumerate(["first", "first", "second", "tie"])]
    judgements = [Judgement(unit, w, v, None, 2.0) for unit, v in units for w in ("p", "q")]
    judgements += [Judgement(unit, "r", "first", None, 4.0) for unit, _ in units]
    r = next(q for q in agreement_report(judgements).annotators if q.annotator == "r")
    assert (r.agreement_with_majority, r.compared_units) == (0.5, 4)
    assert r.median_seconds == 4.0 and r.share_left is None


def test_no_overlap_means_no_coefficients():
    report = agreement_report([Judgement((1, 2), "x", "first", True, None)])
    assert report.alpha is None and report.ac1 is None and report.units_with_overlap == 0
    assert not math.isnan(report.annotators[0].share_left or 0.0)


def test_how_often_people_follow_the_judge(session: Session):
    from storage.agreement import judge_followed
    from storage.repo import Suggested

    for i, (shown, picked) in enumerate([("a", "a"), ("b", "b"), ("a", "b"), (None, "a")]):
        x, y = answers(session, f"Q{i}?", "x", "y")
        record_preference(  # shown in reverse id order: the stored choices flip, consistently
            session,
            response_a_id=y,
            response_b_id=x,
            choice=picked,
            annotator="ann",
            suggestion=Suggested(shown, "judge:embedded") if shown else None,
        )
    [row] = judge_followed(session)
    assert (row.judge, row.shown, row.followed, row.rate) == ("judge:embedded", 3, 2, 2 / 3)
