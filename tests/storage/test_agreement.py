"""Agreement statistics against published examples, and votes expressed per answer."""

from __future__ import annotations

import math

import pytest

from storage.agreement import (
    Judgement,
    agreement_report,
    as_judgement,
    gwet_ac1,
    krippendorff_alpha,
)
from storage.models import Preference

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


def _pref(a: int, b: int, choice: str, who: str = "ann") -> Preference:
    return Preference(response_a_id=a, response_b_id=b, choice=choice, annotator=who)


def test_a_vote_is_expressed_per_answer_not_per_side():
    """The same answer preferred from the left and from the right side is the same value."""
    left = as_judgement(_pref(7, 9, "a", "x"))
    right = as_judgement(_pref(9, 7, "b", "y"))
    assert left.unit == right.unit == (7, 9)
    assert left.value == right.value == "first"
    assert (left.chose_left, right.chose_left) == (True, False)
    assert as_judgement(_pref(9, 7, "tie")).value == "tie"


def test_side_randomisation_does_not_bias_agreement():
    """Two annotators who always prefer the same answer agree perfectly, whichever side it
    was shown on; an annotator who always presses A is flagged for position bias."""
    prefs = []
    for u in range(30):
        better, worse = 2 * u, 2 * u + 1
        first = (better, worse) if u % 2 else (worse, better)
        prefs.append(_pref(*first, "a" if first[0] == better else "b", "careful"))
        second = (worse, better) if u % 3 else (better, worse)
        prefs.append(_pref(*second, "a" if second[0] == better else "b", "also careful"))
        prefs.append(_pref(*first, "a", "presses A"))
    report = agreement_report([as_judgement(p) for p in prefs])
    quality = {q.annotator: q for q in report.annotators}
    # where the other two agree, they agree on the better answer: so does "careful"
    assert quality["careful"].agreement_with_majority == 1.0
    assert not quality["careful"].side_biased and not quality["also careful"].side_biased
    assert quality["presses A"].side_biased and quality["presses A"].share_left == 1.0
    assert report.units_with_overlap == 30
    assert report.contested[0].disagreement == pytest.approx(1 / 3)


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
