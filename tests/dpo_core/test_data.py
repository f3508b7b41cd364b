"""Pairs -> tokens -> batches: normalisation, chat-template split, truncation, grouping, layouts."""

from __future__ import annotations

import re

import pytest
import torch

from dpo_core import data
from dpo_core.data import PairError, TokenizedPair


def test_strings_become_chat_messages():
    (pair,) = data.normalise_pairs([{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away"}])
    assert pair == {
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away"}],
        "weight": 1.0,
    }


def test_messages_and_implicit_prompts_are_accepted():
    user = {"role": "user", "content": "Hi?"}
    good, bad = {"role": "assistant", "content": "Hello!"}, {"role": "assistant", "content": "No"}
    explicit, implicit = data.normalise_pairs(
        [
            {"prompt": [user], "chosen": [good], "rejected": [bad]},
            {"chosen": [user, good], "rejected": [user, bad]},
        ]
    )
    expected = {"prompt": [user], "chosen": [good], "rejected": [bad], "weight": 1.0}
    assert explicit == implicit == expected


BAD_PAIRS = [
    ([], "no preference pairs"),
    (["text"], "pairs: row 1: expected an object"),
    ([{"prompt": "a", "chosen": "b"}], "pairs: row 1: missing 'rejected'"),
    ([{"prompt": "  ", "chosen": "b", "rejected": "c"}], "row 1: 'prompt' is empty"),
    ([{"prompt": "a", "chosen": "", "rejected": "c"}], "row 1: 'chosen' is empty"),
    ([{"prompt": "a", "chosen": 3, "rejected": "c"}], "must both be strings"),
    ([{"prompt": [{"role": "user"}], "chosen": [], "rejected": []}], "other than {role, content}"),
    ([{"chosen": "b", "rejected": "c"}], "needs a 'prompt' string"),
    ([{"prompt": "ok", "chosen": "b", "rejected": "c"}, {"prompt": "x"}], "row 2: missing"),
]


@pytest.mark.parametrize(("pairs", "message"), BAD_PAIRS)
def test_bad_pairs_are_named_in_the_error(pairs, message):
    with pytest.raises(PairError, match=re.escape(message)):
        data.normalise_pairs(pairs)


@pytest.mark.parametrize(
    "prompt",
    [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        [
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "And?"},
        ],
    ],
    ids=["system turn", "two user turns"],
)
def test_multi_turn_pairs_are_refused_as_storage_refuses_them(prompt):
    """One rule with `python -m storage import-pairs` (common.pair_format): single-turn."""
    answer = [{"role": "assistant", "content": "Yes."}]
    row = {"prompt": prompt, "chosen": answer, "rejected": [{"role": "assistant", "content": "No"}]}
    with pytest.raises(PairError, match="row 1: only single-turn conversations are supported"):
        data.normalise_pairs([row])


def test_completion_is_what_the_template_adds_after_the_prompt(tiny_tokenizer):
    (pair,) = data.normalise_pairs([{"prompt": "Hi?", "chosen": "Yes.", "rejected": "No!"}])
    tok = data.tokenize_pair(tiny_tokenizer, pair)
    decode = tiny_tokenizer.decode
    assert decode(tok.prompt_ids) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(tok.chosen_ids) == "Yes.<|im_end|>\n"
    assert decode(tok.rejected_ids) == "No!<|im_end|>\n"


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_completions():
    pair = TokenizedPair(list(range(10)), [20, 21, 22, 23, 24], [30, 31])
    cut = data.truncate_pair(pair, max_length=8, max_prompt_length=4)
    assert cut == TokenizedPair([6, 7, 8, 9], [20, 21, 22, 23], [30, 31])


def test_pairs_without_a_signal_after_truncation_are_dropped_and_counted(tiny_tokenizer, caplog):
    pairs = data.normalise_pairs(
        [
            {"prompt": "p", "chosen": "same start, then good", "rejected": "same start, then bad"},
            {"prompt": "p", "chosen": "fine", "rejected": "also fine"},
            {"prompt": "p", "chosen": "twin", "rejected": "twin"},
        ]
    )
    prompt_len = len(data.tokenize_pair(tiny_tokenizer, pairs[0]).prompt_ids)
    out = data.tokenize_pairs(tiny_tokenizer, pairs, prompt_len + 6, prompt_len)
    assert len(out.pairs) == 1
    assert out.dropped == {"with chosen identical to rejected (after truncation)": 2}
    assert "dropped 2 of 3 pairs" in caplog.text


def _flat(step: list[list[int]]) -> list[int]:
    return [i for micro in step for i in micro]


def test_step_batches_cover_every_pair_once_and_group_by_length():
    lengths = [5, 100, 7, 98, 6, 99, 101, 8, 50, 52]
    steps = data.step_batches(lengths, step_size=4, micro_size=2, seed=3)
    assert sorted(i for step in steps for i in _flat(step)) == list(range(10))
    assert all(len(micro) <= 2 for step in steps for micro in step)
    groups = sorted(sorted(_flat(step)) for step in steps)
    assert groups == [[0, 4], [1, 3, 5, 6], [2, 7, 8, 9]]  # the 4 longest share a step, ...
    again = data.step_batches(lengths, step_size=4, micro_size=4, seed=3)
    assert [sorted(_flat(s)) for s in again] == [sorted(_flat(s)) for s in steps]
    other_epoch = data.step_batches(lengths, step_size=4, micro_size=4, seed=4)
    assert [_flat(s) for s in other_epoch] != [_flat(s) for s in again]


def test_padded_layout_matches_its_docstring():
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6]), TokenizedPair([7], [8, 9], [10, 11, 12])]
    batch = data.collate(pairs, [0, 1], pad_token_id=0)
    assert batch.input_ids.tolist() == [
        [1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 6, 0, 0], [7, 10, 11, 12, 0],
    ]  # fmt: skip
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
    ]  # fmt: skip
    # chosen of pair 0 is scored from columns 1..3 of row 0, rejected of pair 1 from row 3
    columns = (batch.score_rows, batch.score_cols, batch.score_labels, batch.score_seqs)
    scored = list(zip(*(c.tolist() for c in columns), strict=True))
    assert scored[:3] == [(0, 1, 3, 0), (0, 2, 4, 0), (0, 3, 5, 0)]
    assert scored[-3:] == [(3, 0, 10, 3), (3, 1, 11, 3), (3, 2, 12, 3)]


def test_shared_prompt_layout_matches_its_docstring():
    pair = TokenizedPair([1, 2], [3, 4, 5], [6, 7])
    batch = data.collate_shared_prompt([pair, TokenizedPair([1], [2], [3])], [0, 1], 0)
    assert batch.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    mask = batch.attention_mask[0, 0].int().tolist()
    assert mask[5] == [1, 1, 0, 0, 0, 1, 0]  # first rejected token: prompt + itself
    assert mask[6] == [1, 1, 0, 0, 0, 1, 1]
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0]  # last chosen token never sees rejected ones
    rejected = batch.score_seqs == 2  # pair 0's rejected is sequence B + 0 = 2
    assert batch.score_cols[rejected].tolist() == [1, 5]  # from the last prompt token, then r
    assert batch.score_labels[rejected].tolist() == [6, 7]
    assert batch.input_ids[1].tolist() == [1, 2, 3, 0, 0, 0, 0]


def test_split_by_tokens_bounds_each_forward():
    costs = [100, 90, 80, 30, 20]
    assert data.split_by_tokens([0, 1, 2, 3, 4], costs, 1, 200) == [[0, 1], [2, 3], [4]]
    assert data.split_by_tokens([0, 1], costs, 2, 50) == [[0], [1]]  # too big: alone


def test_batch_moves_to_a_device():
    batch = data.collate_shared_prompt([TokenizedPair([1], [2], [3])], [7], 0)
    moved = batch.to(torch.device("cpu"))
    assert moved.indices == [7] and moved.attention_mask.dtype == torch.bool
