"""The Label tab's modes: how many answers a person judges at once, and with which buttons.

One screen serves them all (`app.label.screen`); a mode only chooses k, the buttons shown under
the answers and what a verdict records (`app.label.record`):

- 1 answer: 👍 Good (key U) or 👎 Bad (key D), a KTO verdict (`app.label.single`);
- 2 answers: A is better, B is better, Tie, Both bad (keys 1-4), a vote (`app.label.service`);
- 3 or 4 answers: their letters best first (keys A-D, Backspace undoes), a ranking
  (`app.label.ranking`), recorded once k-1 letters are placed;
- "Check the model's labels": the pair screen on pairs a version labeled itself (self-labels)
  that no person has judged, sides shuffled and the model's choice hidden; the vote is a
  normal vote and overrides the model's label (`LabelService.generate(check=True)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.label.ranking import LETTERS
from app.label.service import CHOICES

SINGLE, PAIR, RANK = "single", "pair", "rank"  # the kinds of button row
VOTE_KEYS = {"a": "1", "b": "2", "tie": "3", "both_bad": "4"}
VERDICT_KEYS = {"up": "U", "down": "D"}


@dataclass(frozen=True)
class Mode:
    """One choice of "Answers to judge"."""

    value: str  # the radio's value (scripts and tests choose by it)
    label: str
    k: int  # answers per prompt
    check: bool = False  # pairs the model labeled itself, not new answers (k = 2)

    @property
    def buttons(self) -> str:
        """Which button row the mode shows: SINGLE, PAIR or RANK."""
        return SINGLE if self.k == 1 else PAIR if self.k == 2 else RANK

    @property
    def keys(self) -> tuple[str, ...]:
        """Its buttons' keys (a choice, a verdict, a letter), in the order shown."""
        if self.buttons == SINGLE:
            return tuple(VERDICT_KEYS)
        if self.buttons == PAIR:
            return tuple(CHOICES)
        return tuple(LETTERS[: self.k])

    @property
    def next_up(self) -> str:
        """What the status line says comes next, after a verdict."""
        return {SINGLE: "answer", PAIR: "pair", RANK: "answers"}[self.buttons]


MODES = (
    Mode("1", "1 (thumbs up/down)", 1),
    Mode("2", "2 (pick the better)", 2),
    Mode("3 (rank)", "3 (rank)", 3),
    Mode("4 (rank)", "4 (rank)", 4),
    Mode("check", "Check the model's labels", 2, check=True),
)
DEFAULT_MODE = MODES[1]  # the pair screen
BY_VALUE = {mode.value: mode for mode in MODES}
BY_K = {mode.k: mode for mode in MODES if not mode.check}  # what k answers on screen record


def mode_of(value: str | None) -> Mode:
    """The mode a radio value names; ValueError for one it does not know."""
    if value is None:
        return DEFAULT_MODE
    if value not in BY_VALUE:
        raise ValueError(f"unknown number of answers {value!r}; choose {', '.join(BY_VALUE)}")
    return BY_VALUE[value]
