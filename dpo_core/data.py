"""Preference pairs -> token batches.

Pipeline: `normalise_pairs` (checked once, at the edge) -> `tokenize_pairs` (chat template,
truncation, drops with a count in the log) -> `step_batches` (length-grouped) -> `collate`
(one right-padded `[chosen; rejected]` batch).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class PairError(ValueError):
    """A preference pair is malformed; the message names the pair and the problem."""


def normalise_pairs(pairs: list[dict[str, Any]]) -> list[dict[str, Messages]]:
    """Check raw pairs and return them as `{prompt, chosen, rejected}` chat messages.

    Accepted shapes for each pair:
    - strings: `{"prompt": str, "chosen": str, "rejected": str}`;
    - messages: `prompt` a list of `{"role", "content"}` ending with a user turn (a system
      turn and earlier turns allowed), `chosen` / `rejected` an assistant message list or str;
    - implicit prompt (TRL style): `chosen` and `rejected` full conversations whose shared
      leading turns are the prompt.

    Raises PairError naming the first bad pair; an empty list raises too.
    """
    if not pairs:
        raise PairError("no preference pairs: label or import at least one pair")
    return [_normalise_pair(pair, i) for i, pair in enumerate(pairs)]


def _normalise_pair(pair: Any, index: int) -> dict[str, Messages]:
    where = f"pair {index + 1}"
    if not isinstance(pair, dict):
        raise PairError(
            f"{where}: expected an object with prompt/chosen/rejected, got {pair!r:.80}"
        )
    missing = [k for k in ("chosen", "rejected") if k not in pair]
    if missing:
        raise PairError(f"{where}: missing {' and '.join(missing)}")
    if "prompt" not in pair:
        prompt, chosen, rejected = _split_implicit_prompt(pair["chosen"], pair["rejected"], where)
    else:
        prompt = _as_messages(pair["prompt"], "user", f"{where} prompt")
        chosen = _as_messages(pair["chosen"], "assistant", f"{where} chosen")
        rejected = _as_messages(pair["rejected"], "assistant", f"{where} rejected")
    if prompt[-1]["role"] != "user":
        raise PairError(f"{where}: the prompt must end with a user turn")
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if completion[0]["role"] != "assistant":
            raise PairError(f"{where}: {name} must start with an assistant turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _as_messages(value: Any, role: str, where: str) -> Messages:
    if isinstance(value, str):
        if not value.strip():
            raise PairError(f"{where} is empty")
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise PairError(f"{where} must be a non-empty string or list of messages")
    messages = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise PairError(f"{where}: each message needs a role and a content string")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise PairError(f"{where}: a {m['role']} message has empty or non-text content")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _split_implicit_prompt(chosen: Any, rejected: Any, where: str) -> tuple[Messages, ...]:
    chosen = _as_messages(chosen, "assistant", f"{where} chosen")
    rejected = _as_messages(rejected, "assistant", f"{where} rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise PairError(f"{where}: no prompt, and chosen/rejected share no leading turns")
    return chosen[:n], chosen[n:], rejected[n:]


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair; the completions start right after `prompt_ids`."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def length(self) -> int:
        """Length of the longer of the two sequences (what the pair costs in a batch)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class TokenizedPairs:
    pairs: list[TokenizedPair]
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> count
    truncated: int = 0


def tokenize_pair(tokenizer: Any, pair: dict[str, Messages]) -> TokenizedPair:
    """Render a normalised pair with the chat template and split off the completions.

    The prompt is rendered with the generation prompt; each completion is what the full
    conversation adds after the longest shared prefix (some templates render a prompt alone
    differently from a prompt followed by an answer; the shared prefix is then the prompt).
    """
    prompt = _render(tokenizer, pair["prompt"], add_generation_prompt=True)
    chosen = _render(tokenizer, pair["prompt"] + pair["chosen"])
    rejected = _render(tokenizer, pair["prompt"] + pair["rejected"])
    n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    return TokenizedPair(prompt[:n], chosen[n:], rejected[n:])


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
    return TokenizedPair(prompt, pair.chosen_ids[:budget], pair.rejected_ids[:budget])


def tokenize_pairs(
    tokenizer: Any, pairs: list[dict[str, Messages]], max_length: int, max_prompt_length: int
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
    if pair.chosen_ids == pair.rejected_ids:
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


@dataclass
class PairBatch:
    """One `[chosen; rejected]` batch of B pairs, right-padded to the longest sequence T.

    Layout (B = 2 pairs, prompt p, chosen c, rejected r, padding 0):
        input_ids       [[p p c c c], [p c c 0 0], [p p r 0 0], [p r r r 0]]   (2B, T)
        attention_mask  [[1 1 1 1 1], [1 1 1 0 0], [1 1 1 0 0], [1 1 1 1 0]]
        completion_mask [[0 0 1 1 1], [0 1 1 0 0], [0 0 1 0 0], [0 1 1 1 0]]
    Rows [:B] are the chosen sequences, rows [B:] the rejected ones (split with `.chunk(2)`).
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    indices: list[int]  # dataset index of each pair

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.indices,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(pairs: list[TokenizedPair], indices: list[int], pad_token_id: int) -> PairBatch:
    """Stack chosen then rejected sequences, right-padded with `pad_token_id`."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
        (p.prompt_ids, p.rejected_ids) for p in pairs
    ]
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(completion)
        input_ids[i, : n + m] = torch.tensor(prompt + completion)
        attention_mask[i, : n + m] = 1
        completion_mask[i, n : n + m] = 1
    return PairBatch(input_ids, attention_mask, completion_mask, list(indices))
