"""Preference pairs -> token batches.

Pipeline: `normalise_pairs` (checked once, at the edge) -> `tokenize_pairs` (chat template,
truncation, drops with a count in the log) -> `step_batches` (length-grouped) -> `collate`
(one right-padded `[chosen; rejected]` batch) or `collate_shared_prompt` (the same sequences,
the prompt computed once per pair).

KTO examples (one answer with a verdict) take the same path: `normalise_kto` turns each into a
pair whose "chosen" is its answer and whose "rejected" is its KL completion, so collation, the
reference pass and micro-batching serve both. Every pair or example carries its `weight`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from common.pair_format import Pair, PairError, Unpaired, parse_kto_rows, parse_pairs

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
# {"prompt", "chosen", "rejected": Messages, "weight": float[, "desirable": bool (KTO)]}
Normalised = dict[str, Any]


def normalise_pairs(pairs: list[Any], source: str = "pairs") -> list[Normalised]:
    """Check raw pairs and return them as `{prompt, chosen, rejected}` chat messages, plus
    each pair's `weight` (1.0 unless the row says otherwise).

    Each pair is a row of TRL's standard or conversational format, checked by
    `common.pair_format` (the rule `python -m storage import-pairs` applies too: single-turn,
    non-empty texts). Raises PairError `"<source>: row <n>: ..."` naming the first bad pair;
    an empty list raises too.
    """
    if not pairs:
        raise PairError("no preference pairs: label or import at least one pair")
    return [_as_chat(pair) for pair in parse_pairs(pairs, source)]


def _as_chat(pair: Pair) -> Normalised:
    return {
        "prompt": [{"role": "user", "content": pair.prompt}],
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
        "weight": pair.weight,
    }


def normalise_kto(rows: list[Any], source: str = "examples") -> list[Normalised]:
    """KTO examples (unpaired `{prompt, completion, label}` rows, or pairs, which give two:
    `common.pair_format.parse_kto_rows`) as pairs: `chosen` is the example's answer,
    `rejected` its KL completion (`kl_partners`), `desirable` its label, plus its `weight`."""
    if not rows:
        raise PairError("no examples: label at least one answer or pair")
    examples = parse_kto_rows(rows, source)
    partners = kl_partners([e.prompt for e in examples])
    return [_kto_as_chat(e, examples[j]) for e, j in zip(examples, partners, strict=True)]


def kl_partners(prompts: list[str], seed: int = 0) -> list[int]:
    """For each example, the example whose answer is its KL completion.

    The examples are put in one seeded random cycle and each takes the answer of the next one
    in it with a different prompt: so the KL completions are (nearly) the whole set of answers
    once each, in random order, whatever the order of the rows (TRL rotates the answers of each
    batch by one, on rows it does not shuffle). With a single prompt an example takes the next
    answer in the cycle; with a single example, its own."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    following = _next_other([prompts[i] for i in order])
    partners = [0] * len(prompts)
    for position, i in enumerate(order):
        partners[i] = order[following[position]]
    return partners


def _next_other(values: list[str]) -> list[int]:
    """Per position of a cycle, the next position holding another value (the next position
    when every value is the same)."""
    n = len(values)
    found: list[int | None] = [None] * n
    for k in range(2 * n - 1, -1, -1):  # two laps backwards: the second sees the whole cycle
        i, j = k % n, (k + 1) % n
        found[i] = j if values[j] != values[i] else found[j]
    return [(i + 1) % n if f is None else f for i, f in enumerate(found)]


def _kto_as_chat(example: Unpaired, partner: Unpaired) -> Normalised:
    return {
        "prompt": [{"role": "user", "content": example.prompt}],
        "chosen": [{"role": "assistant", "content": example.completion}],
        "rejected": [{"role": "assistant", "content": partner.completion}],
        "weight": example.weight,
        "desirable": example.desirable,
    }


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair; the completions start right after `prompt_ids`.

    For a KTO example `desirable` is its label, `chosen_ids` its answer and `rejected_ids` its
    KL completion; for a pair it is None. `weight` scales its loss."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0
    desirable: bool | None = None

    def cost(self, share_prompt: bool) -> int:
        """Tokens per row: prompt + chosen + rejected in the shared-prompt layout, else the
        longer of the two sequences (used to group pairs of similar length)."""
        n, c, r = len(self.prompt_ids), len(self.chosen_ids), len(self.rejected_ids)
        return n + c + r if share_prompt else n + max(c, r)


@dataclass
class TokenizedPairs:
    pairs: list[TokenizedPair]
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> count
    truncated: int = 0


def tokenize_pair(tokenizer: Any, pair: Normalised) -> TokenizedPair:
    """Render a normalised pair with the chat template and split off the completions.

    The prompt is rendered with the generation prompt; each completion is what the full
    conversation adds after the longest shared prefix (some templates render a prompt alone
    differently from a prompt followed by an answer; the shared prefix is then the prompt).
    """
    prompt = _render(tokenizer, pair["prompt"], add_generation_prompt=True)
    chosen = _render(tokenizer, pair["prompt"] + pair["chosen"])
    rejected = _render(tokenizer, pair["prompt"] + pair["rejected"])
    n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    weight, desirable = pair.get("weight", 1.0), pair.get("desirable")
    return TokenizedPair(prompt[:n], chosen[n:], rejected[n:], weight, desirable)


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def truncate_pair(pair: TokenizedPair, max_length: int, max_prompt_length: int) -> TokenizedPair:
    """Keep the end of the prompt (at most `max_prompt_length` tokens), then the start of
    each completion so that prompt + completion fits in `max_length`."""
    prompt = pair.prompt_ids[-max_prompt_length:]
    budget = max_length - len(prompt)
    return replace(
        pair,
        prompt_ids=prompt,
        chosen_ids=pair.chosen_ids[:budget],
        rejected_ids=pair.rejected_ids[:budget],
    )


def tokenize_pairs(
    tokenizer: Any, pairs: list[Normalised], max_length: int, max_prompt_length: int
) -> TokenizedPairs:
    """Tokenize and truncate normalised pairs; drop those left without a preference signal."""
    out = TokenizedPairs(pairs=[])
    for pair in pairs:
        full = tokenize_pair(tokenizer, pair)
        cut = truncate_pair(full, max_length, max_prompt_length)
        reason = _drop_reason(cut)
        if reason:
            out.dropped[reason] += 1
            continue
        out.truncated += cut != full
        out.pairs.append(cut)
    if out.dropped:
        logger.warning(
            "dropped %d of %d pairs: %s",
            sum(out.dropped.values()),
            len(pairs),
            ", ".join(f"{n} {why}" for why, n in out.dropped.items()),
        )
    if out.truncated:
        logger.info(
            "truncated %d pairs to max_length=%d / max_prompt_length=%d",
            out.truncated,
            max_length,
            max_prompt_length,
        )
    return out


def _drop_reason(pair: TokenizedPair) -> str | None:
    if not pair.chosen_ids or not pair.rejected_ids:
        return "with an empty completion"
    # (a KTO example's KL completion may equal its answer: that is no loss of signal)
    if pair.desirable is None and pair.chosen_ids == pair.rejected_ids:
        return "with chosen identical to rejected (after truncation)"
    return None


def step_batches(
    lengths: list[int], step_size: int, micro_size: int, *, seed: int, shuffle: bool = True
) -> list[list[list[int]]]:
    """Group pair indices into optimiser steps of `step_size` pairs, each split into
    micro-batches of `micro_size`, so that pairs of similar length share a batch.

    Returns steps -> micro-batches -> indices. Indices are shuffled (seeded), sorted by length
    within windows of 64 steps, and the steps are shuffled again: little padding, yet a
    different order every epoch. A step is always the same set of pairs whatever
    `micro_size`, so gradient accumulation reproduces a large batch exactly.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    window = step_size * 64
    grouped = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start : start + window], key=lambda i: -lengths[i])
    steps = [grouped[i : i + step_size] for i in range(0, len(grouped), step_size)]
    if shuffle:
        rng.shuffle(steps)
    return [[step[i : i + micro_size] for i in range(0, len(step), micro_size)] for step in steps]


def split_by_tokens(
    indices: list[int], costs: list[int], rows_per_pair: int, max_tokens: int
) -> list[list[int]]:
    """Split a micro-batch into consecutive chunks whose padded size (rows x longest row)
    stays within `max_tokens`; a pair larger than that goes alone. Bounds activation memory
    whatever the batch size: the gradient of the step is the same, only accumulated."""
    chunks: list[list[int]] = []
    for i in indices:
        chunk = chunks[-1] if chunks else []
        width = max([costs[j] for j in chunk] + [costs[i]])
        if chunk and (len(chunk) + 1) * rows_per_pair * width <= max_tokens:
            chunk.append(i)
        else:
            chunks.append([i])
    return chunks


@dataclass
class PairBatch:
    """B pairs ready for one forward pass, plus where each completion token is scored.

    The model sees `input_ids` (R, L) with `attention_mask` and `position_ids`; the token with
    label `score_labels[k]` is predicted by the hidden state at (`score_rows[k]`,
    `score_cols[k]`) and counts towards sequence `score_seqs[k]`. Sequences are numbered in
    the `[chosen; rejected]` layout: pair i's chosen is sequence i, its rejected B + i, so
    per-sequence results (2B,) split into chosen and rejected with `.chunk(2)`.
    """

    input_ids: Tensor  # (R, L)
    attention_mask: Tensor  # (R, L) padding mask, or (R, 1, L, L) bool
    position_ids: Tensor  # (R, L)
    score_rows: Tensor  # (M,)
    score_cols: Tensor  # (M,)
    score_labels: Tensor  # (M,)
    score_seqs: Tensor  # (M,) in [0, 2B)
    indices: list[int]  # dataset index of each pair

    def to(self, device: torch.device) -> PairBatch:
        tensors = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)}
        return PairBatch(**tensors, indices=self.indices)

    @property
    def num_sequences(self) -> int:
        return 2 * len(self.indices)


class _Scores:
    """Accumulates the scoring index of a batch."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.labels: list[int] = []
        self.seqs: list[int] = []

    def add(self, row: int, cols: list[int], labels: list[int], seq: int) -> None:
        self.rows += [row] * len(labels)
        self.cols += cols
        self.labels += labels
        self.seqs += [seq] * len(labels)

    def tensors(self) -> dict[str, Tensor]:
        return {
            "score_rows": torch.tensor(self.rows),
            "score_cols": torch.tensor(self.cols),
            "score_labels": torch.tensor(self.labels),
            "score_seqs": torch.tensor(self.seqs),
        }


def collate(pairs: list[TokenizedPair], indices: list[int], pad_token_id: int) -> PairBatch:
    """The `[chosen; rejected]` layout: 2B right-padded rows (B = 2, prompt p, chosen c,
    rejected r, padding 0):

        input_ids       [[p p c c c], [p c c 0 0], [p p r 0 0], [p r r r 0]]   (2B, T)
        attention_mask  [[1 1 1 1 1], [1 1 1 0 0], [1 1 1 0 0], [1 1 1 1 0]]
        completion      [[0 0 1 1 1], [0 1 1 0 0], [0 0 1 0 0], [0 1 1 1 0]]

    Rows [:B] hold the chosen sequences, rows [B:] the rejected ones.
    """
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    rows += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    scores = _Scores()
    for i, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(completion)
        input_ids[i, : n + m] = torch.tensor(prompt + completion)
        attention_mask[i, : n + m] = 1
        scores.add(i, list(range(n - 1, n + m - 1)), completion, seq=i)
    positions = torch.arange(width).expand(len(rows), width)
    return PairBatch(input_ids, attention_mask, positions, **scores.tensors(), indices=indices)


PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


def collate_shared_prompt(
    pairs: list[TokenizedPair], indices: list[int], pad_token_id: int
) -> PairBatch:
    """The shared-prompt layout: one row per pair, `prompt + chosen + rejected`, so the prompt
    is computed once. A tree-shaped mask keeps the branches apart and position ids restart
    the rejected branch where the chosen one started, which gives every completion token
    exactly the context it has in the `[chosen; rejected]` layout:

        input_ids     p p c c c r r 0        a rejected token attends to the prompt
        position_ids  0 1 2 3 4 2 3 0        and to earlier rejected tokens only
        branch        P P C C C R R pad

    The first chosen and first rejected tokens are both scored from the last prompt position.
    attention_mask is (B, 1, L, L) bool, True where a query may attend to a key.
    """
    width = max(p.cost(share_prompt=True) for p in pairs)
    b = len(pairs)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    branch = torch.full((b, width), PAD, dtype=torch.long)
    scores = _Scores()
    for i, p in enumerate(pairs):
        n, c, r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        input_ids[i, : n + c + r] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
        positions[i, : n + c] = torch.arange(n + c)
        positions[i, n + c : n + c + r] = torch.arange(n, n + r)
        branch[i, :n], branch[i, n : n + c], branch[i, n + c : n + c + r] = PROMPT, CHOSEN, REJECTED
        scores.add(i, [n - 1, *range(n, n + c - 1)], p.chosen_ids, seq=i)
        scores.add(i, [n - 1, *range(n + c, n + c + r - 1)], p.rejected_ids, seq=b + i)
    query, key = branch[:, :, None], branch[:, None, :]  # (B, L, 1), (B, 1, L)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & ((key == PROMPT) | (key == query))  # (B, L, L)
    return PairBatch(input_ids, mask[:, None], positions, **scores.tensors(), indices=indices)
