"""bench/loop*.py's pure parts: the rules, the condition names, the scorer check's arithmetic."""

from __future__ import annotations

import pytest

from bench.loop_base import LOOP_RULES, brief_score, parse_condition, polite_score
from bench.loop_selflabel import CALIBRATION, check_scorer
from bench.loop_tables import order


def test_the_polite_rule_counts_distinct_courtesy_formulas():
    assert polite_score("Paris is the capital of France.") == 0
    assert polite_score("Hello! Thank you for asking. Thank you again.") == 2  # hello, thank you
    assert polite_score("Great question, glad to help. Hope this helps, please ask more!") == 4
    assert polite_score("The hidden chip is this") == 0  # words, not parts of words
    assert LOOP_RULES["polite"] is polite_score


def test_the_brief_rule_prefers_the_shorter_finished_answer():
    assert brief_score("Paris is the capital of France.") == pytest.approx(100 / 6)
    assert brief_score('He said "yes."') == pytest.approx(100 / 3)  # closing quote after it
    assert brief_score("Paris is the capital of France, and it") == 0  # cut off
    assert brief_score("") == 0 and brief_score("   ") == 0
    assert brief_score("Yes, it is.") > brief_score("Yes, it is, and here is why.")
    assert LOOP_RULES["brief"] is brief_score


def test_rpo_and_self_conditions_parse_and_name_their_cache():
    rpo = parse_condition("rpo:2x32:all", 64)
    assert (rpo.name, rpo.lineage(1), rpo.lineage(2)) == (
        "rpo:2x32:all",
        "rpo-2x32",
        "rpo-2x32-all",
    )
    own = parse_condition("self:2x32:all:4x", 64)
    assert own.name == "self:2x32:all:4x:reward-model" and (own.times, own.per_round) == (4, 32)
    assert own.lineage(1) == "rounds-2x32"  # round 1 is `rounds`' round 1: the same v1
    assert own.lineage(2) == "self-2x32-all-4x-reward-model"
    assert parse_condition("self:2:all:8x:centered", 64).scorer == "centered"
    for bad in ("self:2x32:all", "self:2x32:all:4", "self:2x32:all:4x:vibes"):
        with pytest.raises(ValueError, match="self:RxN:MODE:Tx"):
            parse_condition(bad, 64)
    names = ["base", "self:2x32:all:4x:reward-model", "rounds:2x32:all", "rpo:2x32:all"]
    ranked = sorted(((n, 2) for n in names), key=lambda key: order(*key))
    assert [n for n, _ in ranked] == ["base", "rounds:2x32:all", "rpo:2x32:all", names[1]]


def test_a_kl_ceiling_suffix_sets_the_guard_and_its_own_cache():
    arm = parse_condition("rpo:2x32:all:kl2.5", 64)
    assert (arm.kind, arm.kl_ceiling, arm.name) == ("rpo", 2.5, "rpo:2x32:all:kl2.5")
    assert (arm.lineage(1), arm.lineage(2)) == ("rpo-2x32-kl2.5", "rpo-2x32-all-kl2.5")
    own = parse_condition("self:2x32:all:4x:kl3", 64)
    assert (own.scorer, own.kl_ceiling, own.lineage(1)) == ("reward-model", 3.0, "rounds-2x32-kl3")
    assert parse_condition("rounds:2:all", 64).kl_ceiling is None
    with pytest.raises(ValueError, match="above 0 nats"):
        parse_condition("rounds:2x32:all:kl0", 64)
    names = ["rounds:2x32:all:kl3", "rounds:2x32:all", "rounds:2x32:all:kl2.5"]
    ranked = sorted(((n, 2) for n in names), key=lambda key: order(*key))
    assert [n for n, _ in ranked] == ["rounds:2x32:all", names[2], names[0]]


def test_the_scorer_check_calibrates_on_the_first_pairs_and_scores_the_rest():
    sure_and_right = [5.0 - 0.1 * i for i in range(CALIBRATION)]  # the threshold: 3.5
    rest = [4.0, -3.9, 3.6, 1.0, -0.5]  # above 3.5: 4.0 (right), -3.9 (wrong), 3.6 (right)
    check = check_scorer("margin", sure_and_right + rest)
    assert check.threshold == pytest.approx(5.0 - 0.1 * (CALIBRATION - 1))
    assert (check.pairs, check.calibration, check.rest, check.above) == (21, 16, 5, 3)
    assert check.above_accuracy == pytest.approx(2 / 3)
    assert check.accuracy == pytest.approx(19 / 21)
    unsure = check_scorer("margin", [1.0, -1.0] * 10)
    assert unsure.threshold is None and unsure.above == 0 and unsure.above_accuracy is None
