"""The preference-pair format: one row of a pair file -> one checked `Pair`, one rule for all.

`python -m storage import-pairs` and `python -m dpo_core train` both read pairs with this
parser, so a file one accepts the other accepts, and a bad row gets the same message from both.

A row is TRL's *standard* format (`prompt`/`chosen`/`rejected` strings) or its *conversational*
one (lists of `{role, content}` messages; the prompt explicit, or implicit as the turns both
conversations start with, e.g. UltraFeedback binarized). A pair is single-turn: one user message,
then one assistant answer each side, because that is what a person labels and what the database
holds (prompt text, answer text). Every text must be non-empty and free of U+0000 (PostgreSQL
cannot store it).

KTO also reads TRL's *unpaired preference* rows, one answer with a verdict:
`{"prompt", "completion", "label": true|false}` (strings, or messages as above), parsed into
an `Unpaired` by `parse_unpaired`; `parse_kto_rows` accepts those and pairs alike (a pair gives
its chosen answer labelled true, then its rejected one labelled false, as TRL's
`unpair_preference_dataset`).

Any row may carry `"weight"`: a number >= 0 (default 1) that scales its loss in training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Turns = list[tuple[str, str]]  # (role, content)


class PairError(ValueError):
    """A row is not a usable preference pair; the message names the row and the problem."""


@dataclass(frozen=True)
class Pair:
    """One preference: `chosen` is the better answer to `prompt` than `rejected`; `weight`
    scales its loss (1: as any pair, 0: no effect)."""

    prompt: str
    chosen: str
    rejected: str
    weight: float = 1.0


@dataclass(frozen=True)
class Unpaired:
    """One answer with a verdict (KTO): `desirable` True for a thumbs up, False for down."""

    prompt: str
    completion: str
    desirable: bool
    weight: float = 1.0


def parse_pairs(rows: Iterable[Any], source: str) -> list[Pair]:
    """Every row as a `Pair`; PairError `"<source>: row <n>: <problem>"` at the first bad one."""
    pairs = []
    for n, row in enumerate(rows, 1):
        try:
            pairs.append(parse_pair(row))
        except PairError as err:
            raise PairError(f"{source}: row {n}: {err}") from None
    return pairs


def is_unpaired_row(row: Any) -> bool:
    """Whether a row is in the unpaired format (a `completion` or `label`, no `chosen`)."""
    return (
        isinstance(row, Mapping)
        and ("completion" in row or "label" in row)
        and "chosen" not in row
        and "rejected" not in row
    )


def parse_pair(row: Any) -> Pair:
    """One row (standard or conversational) as a `Pair`; PairError saying what is wrong."""
    if not isinstance(row, Mapping):
        raise PairError(f"expected an object with prompt/chosen/rejected, got {row!r:.80}")
    if is_unpaired_row(row):
        raise PairError("these rows are single answers with a label: use --loss-type kto")
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
    return Pair(pair.prompt, pair.chosen, pair.rejected, parse_weight(row))


def parse_weight(row: Mapping[str, Any]) -> float:
    """The row's `weight` (1.0 when absent); PairError unless a finite number >= 0."""
    weight = row.get("weight", 1.0)
    value = math.nan
    if isinstance(weight, int | float) and not isinstance(weight, bool):
        value = float(weight) if abs(weight) < 1e308 else math.inf  # a huge int: no float
    if not (math.isfinite(value) and value >= 0):
        raise PairError(f"'weight' must be a finite number >= 0, got {weight!r:.40}")
    return value


def parse_unpaired(row: Any) -> Unpaired:
    """One unpaired row `{prompt, completion, label}` (strings, or messages with the prompt
    explicit or implicit as all turns before the last) as an `Unpaired`."""
    if not isinstance(row, Mapping):
        raise PairError(f"expected an object with prompt/completion/label, got {row!r:.80}")
    label = row.get("label")
    if not isinstance(label, bool):
        raise PairError(
            "'label' must be true (a desirable answer) or false (an undesirable one), "
            f"got {'nothing' if label is None else repr(label)[:40]}"
        )
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(completion, str):
        if not isinstance(prompt, str):
            raise PairError("the standard format needs a 'prompt' string")
        text_prompt, text = prompt, completion
    elif isinstance(completion, list):
        if prompt is None:  # implicit: every turn before the answer
            prompt = completion[:-1]
        pair = _pair_from_messages(prompt, completion, completion)
        text_prompt, text = pair.prompt, pair.chosen
    else:
        raise PairError(f"'completion' must be text or a list of messages, got {_kind(completion)}")
    _check_text(text_prompt, "'prompt'")
    _check_text(text, "'completion'")
    return Unpaired(text_prompt, text, label, parse_weight(row))


def parse_kto_rows(rows: Iterable[Any], source: str) -> list[Unpaired]:
    """Unpaired rows and pairs alike as `Unpaired` answers, in row order (a pair gives two:
    chosen labelled desirable, then rejected undesirable, each with the pair's weight);
    PairError `"<source>: row <n>: <problem>"` at the first bad row."""
    out: list[Unpaired] = []
    for n, row in enumerate(rows, 1):
        try:
            if isinstance(row, Mapping) and ("chosen" in row or "rejected" in row):
                pair = parse_pair(row)
                out.append(Unpaired(pair.prompt, pair.chosen, True, pair.weight))
                out.append(Unpaired(pair.prompt, pair.rejected, False, pair.weight))
            else:
                out.append(parse_unpaired(row))
        except PairError as err:
            raise PairError(f"{source}: row {n}: {err}") from None
    return out


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
