"""The held-out split: stable per prompt, honours the `heldout` split, never empties training."""

from __future__ import annotations

import pytest

from dpo_core.heldout import prompt_bucket, split_pairs


def _pairs(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"question {i}", "chosen": "a", "rejected": "b"} for i in range(n)]


def test_split_is_stable_and_close_to_the_fraction():
    pairs = _pairs(1000)
    train, heldout = split_pairs(pairs, 0.2)
    assert len(train) + len(heldout) == 1000
    assert 150 < len(heldout) < 250
    # Same prompts held out on every call, and in any order.
    assert split_pairs(list(reversed(pairs)), 0.2)[1] == list(reversed(heldout))
    assert all(prompt_bucket(p["prompt"]) < 0.2 for p in heldout)


def test_larger_fraction_holds_out_a_superset():
    pairs = _pairs(300)
    small = {p["prompt"] for p in split_pairs(pairs, 0.1)[1]}
    large = {p["prompt"] for p in split_pairs(pairs, 0.3)[1]}
    assert small < large


def test_heldout_split_pairs_are_always_held_out():
    pairs = [*_pairs(5), {"prompt": "x", "chosen": "a", "rejected": "b", "split": "heldout"}]
    train, heldout = split_pairs(pairs, 0.0)
    assert len(train) == 5 and heldout == [pairs[-1]]


def test_training_never_left_empty():
    pairs = _pairs(1)
    assert split_pairs(pairs, 0.5) == (pairs, [])


def test_too_few_hashed_pairs_are_all_kept_for_training():
    pairs = _pairs(40)
    _, heldout = split_pairs(pairs, 0.2)
    assert 0 < len(heldout) < 40
    assert split_pairs(pairs, 0.2, min_heldout=len(heldout)) == split_pairs(pairs, 0.2)
    assert split_pairs(pairs, 0.2, min_heldout=len(heldout) + 1) == (pairs, [])


def test_a_malformed_pair_stays_in_training():
    """The trainer's pair check gives a malformed pair its error message, so the split keeps it."""
    pairs = [*_pairs(40), {"prompt": None, "chosen": "a", "rejected": "b"}]
    train, _ = split_pairs(pairs, 0.5)
    assert pairs[-1] in train


def test_conversational_prompts_are_hashed_by_their_text():
    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    assert split_pairs([pair], 0.0) == ([pair], [])


def test_fraction_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="held-out fraction"):
        split_pairs(_pairs(3), 0.9)
