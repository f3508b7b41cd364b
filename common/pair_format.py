"""The preference-pair format: one row of a pair file -> one checked `Pair`, one rule for all.

`python -m storage import-pairs` and `python -m dpo_core train` both read pairs with this
parser, so a file one accepts the other accepts, and a bad row gets the same message from both.

A row is TRL's *standard* format (`prompt`/`chosen`/`rejected` strings) or its *conversational*
one (lists of `{role, content}` messages; the prompt explicit, or implicit as the turns both
conversations start with, e.g. UltraFeedback binarized). A pair is single-turn: one user message,
then one assistant answer each side, because that is what a person labels and what the database
holds (prompt text, answer text). Every text must be non-empty and free of U+0000 (PostgreSQL
cannot store it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Turns = list[tuple[str, str]]  # (role, content)


class PairError(ValueError):
    """A row is not a usable preference pair; the message names the row and the problem."""


@dataclass(frozen=True)
class Pair:
    """One preference: `chosen` is the better answer to `prompt` than `rejected`."""

    prompt: str
    chosen: str
    rejected: str


def parse_pairs(rows: Iterable[Any], source: str) -> list[Pair]:
    """Every row as a `Pair`; PairError `"<source>: row <n>: <problem>"` at the first bad one."""
    pairs = []
    for n, row in enumerate(rows, 1):
        try:
            pairs.append(parse_pair(row))
        except PairError as err:
            raise PairError(f"{source}: row {n}: {err}") from None
    return pairs


def parse_pair(row: Any) -> Pair:
    """One row (standard or conversational) as a `Pair`; PairError saying what is wrong."""
    if not isinstance(row, Mapping):
        raise PairError(f"expected an object with prompt/chosen/rejected, got {row!r:.80}")
    missing = [f"'{k}'" for k in ("chosen", "rejected") if row.get(k) is None]
    if missing:
        raise PairError(f"missing {' and '.join(missing)}")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise PairError("the standard format needs a 'prompt' string")
        pair = Pair(prompt, chosen, rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        pair = _pair_from_messages(prompt, chosen, rejected)
    else:
        raise PairError(
            "'chosen' and 'rejected' must both be strings (standard format) or both lists of "
            f"messages (conversational format), got {_kind(chosen)} and {_kind(rejected)}"
        )
    for name in ("prompt", "chosen", "rejected"):
        _check_text(getattr(pair, name), f"'{name}'")
    return pair


def _check_text(text: str, what: str) -> None:
    if "\x00" in text:
        raise PairError(f"{what} contains a NUL character (U+0000), which cannot be stored")
    if not text.strip():
        raise PairError(f"{what} is empty")


def _pair_from_messages(prompt: Any, chosen: list[Any], rejected: list[Any]) -> Pair:
    chosen_turns, rejected_turns = _turns(chosen, "chosen"), _turns(rejected, "rejected")
    prompt_turns = _prompt_turns(prompt, chosen_turns, rejected_turns)
    # UltraFeedback-style rows repeat the prompt at the start of chosen and rejected.
    for turns in (chosen_turns, rejected_turns):
        if turns[: len(prompt_turns)] == prompt_turns:
            del turns[: len(prompt_turns)]
    roles = [role for role, _ in prompt_turns + chosen_turns[:1]]
    if roles != ["user", "assistant"] or len(chosen_turns) != 1 or len(rejected_turns) != 1:
        raise PairError(
            "only single-turn conversations are supported (one user message, then one "
            "assistant answer in 'chosen' and in 'rejected'); found roles "
            f"{[r for r, _ in prompt_turns]} + {[r for r, _ in chosen_turns]}"
        )
    if rejected_turns[0][0] != "assistant":
        raise PairError("'rejected' must end with an assistant answer")
    return Pair(prompt_turns[0][1], chosen_turns[0][1], rejected_turns[0][1])


def _prompt_turns(prompt: Any, chosen_turns: Turns, rejected_turns: Turns) -> Turns:
    if prompt is None:  # implicit prompt: the turns both conversations start with
        k = 0
        limit = min(len(chosen_turns), len(rejected_turns))
        while k < limit and chosen_turns[k] == rejected_turns[k]:
            k += 1
        return chosen_turns[:k]
    if isinstance(prompt, str):
        return [("user", prompt)]
    if isinstance(prompt, list):
        return _turns(prompt, "prompt")
    raise PairError(f"'prompt' must be text or a list of messages, got {_kind(prompt)}")


def _turns(messages: list[Any], column: str) -> Turns:
    turns = []
    for message in messages:
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise PairError(f"'{column}' holds something other than {{role, content}} messages")
        turns.append((message["role"], message["content"]))
    return turns


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
