"""Which votes train: the rule for a pair of answers judged by several annotators.

A *unit* is one pair of stored answers (votes are stored with response_a_id < response_b_id, so
every annotator's vote on the same two answers has the same key and the same meaning of `a`).

- `every`: each vote is its own training pair (one vote, one pair, as before overlap existed).
- `majority` (default): the unit's outcome is the choice of more than half of its votes; ties
  and both-bad votes are votes too, so they can block a majority. No majority: nothing trains.
- `unanimous`: every vote on the unit made the same choice.

How a rewrite counts (a rewrite is the annotator's own better answer): under `majority` and
`unanimous` the agreement decides *which votes* train, namely those that voted the agreed
outcome; each of those then trains as under `every` (its rewrite, if any, is chosen against
the answer it rejected), and identical pairs from several agreeing votes train once. So the
rejected side of every pair is backed by the agreement, the chosen side is either the answer
the agreement preferred or a rewrite by someone who agreed; a rewrite by someone outvoted does
not train, since the others rejected the judgement it rests on. With one vote per unit the
three modes give the same pairs.

Votes by AI judges (annotators named `judge:<name>`) are read only when `include_judges` is
set, and a version's labels of its own answers (`self:<version>`, storage/self_labels.py) only
when `include_self` is; then they count as votes like any other. A person's vote overrides a
version's own label: on a pair of answers with a vote by a person whose votes are read, the
`self:` votes are not read at all, under every votes mode (counted as `overridden`).
`leave_out` names annotators whose votes are not read at all (e.g. those the agreement panel
flags for position bias); a left-out person's vote overrides nothing.

Rounds (storage/rounds.py): `train_on` picks pairs by the model version whose answers they
compare. `all` (default): every pair; `parent`: only the pairs on the answers of `parent_id`,
the version a continued run starts from; `newest`: every pair, weighted toward the newest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from storage.annotators import is_judge, is_person, is_self

VOTE_MODES = ("majority", "unanimous", "every")
DEFAULT_VOTES = "majority"
TRAIN_ON = ("parent", "all", "newest")  # what a continued run trains on (storage/rounds.py)
DEFAULT_TRAIN_ON = "all"


@dataclass(frozen=True)
class VoteSelection:
    """Which votes make training pairs (see the module docstring)."""

    votes: str = DEFAULT_VOTES  # one of VOTE_MODES
    leave_out: tuple[str, ...] = ()  # annotators whose votes are ignored
    include_judges: bool = False  # read `judge:` annotators' votes too
    include_self: bool = False  # read versions' labels of their own answers (`self:`) too
    train_on: str = DEFAULT_TRAIN_ON  # one of TRAIN_ON: pairs by the version of their answers
    parent_id: int | None = None  # the version `parent` and `newest` count from (its id)

    def __post_init__(self) -> None:
        if self.votes not in VOTE_MODES:
            raise ValueError(f"votes must be one of {', '.join(VOTE_MODES)}, got {self.votes!r}")
        if self.train_on not in TRAIN_ON:
            raise ValueError(
                f"train on must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}"
            )
        names = (self.leave_out,) if isinstance(self.leave_out, str) else self.leave_out
        cleaned = sorted({str(n).strip() for n in names} - {""})
        object.__setattr__(self, "leave_out", tuple(cleaned))

    def reads(self, annotator: str) -> bool:
        """Whether this annotator's votes are read."""
        if annotator in self.leave_out:
            return False
        if is_judge(annotator):
            return self.include_judges
        return self.include_self or not is_self(annotator)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as a run's config records it (`from_dict` inverts it). The round keys
        only when the run chose other than all pairs: a default run's record reads as before."""
        out: dict[str, Any] = {
            "votes": self.votes,
            "leave_out": list(self.leave_out),
            "include_judges": self.include_judges,
        }
        if self.include_self:  # only when chosen, as the round keys
            out["include_self"] = True
        if self.train_on != DEFAULT_TRAIN_ON or self.parent_id is not None:
            out.update(train_on=self.train_on, parent_id=self.parent_id)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> VoteSelection:
        """From `to_dict`'s output; None or {} (a run from before this setting): the default."""
        values = values or {}
        return cls(
            votes=values.get("votes", DEFAULT_VOTES),
            leave_out=tuple(values.get("leave_out", ())),
            include_judges=bool(values.get("include_judges", False)),
            include_self=bool(values.get("include_self", False)),
            train_on=values.get("train_on", DEFAULT_TRAIN_ON),
            parent_id=values.get("parent_id"),
        )


def agreed_outcome(choices: Sequence[str], mode: str) -> str | None:
    """The unit's outcome (`a`, `b`, `tie` or `both_bad`) from its votes' choices, or None when
    they do not agree enough: more than half of them (`majority`), all of them (`unanimous`).
    Not for `every`, which has no outcome per unit."""
    if not choices:
        return None
    choice, count = Counter(choices).most_common(1)[0]
    if mode == "majority":
        return choice if 2 * count > len(choices) else None
    if mode == "unanimous":
        return choice if count == len(choices) else None
    raise ValueError(f"no agreed outcome for votes mode {mode!r}")


class UnitVote(Protocol):
    """A vote on one pair of answers (stored order: response_a_id < response_b_id)."""

    annotator: str
    response_a_id: int
    response_b_id: int


V = TypeVar("V", bound=UnitVote)


@dataclass(frozen=True)
class ReadVotes(Generic[V]):
    """The votes a selection reads, and how many it does not."""

    read: list[V]
    left_out: int  # left-out annotators, and models' votes not chosen
    overridden: int  # `self:` votes on a pair of answers a person voted on


def read_votes(votes: Sequence[V], selection: VoteSelection) -> ReadVotes[V]:
    """The votes `selection` reads, in their order; a `self:` vote on a pair of answers that
    has a read vote by a person is not read (the person overrides the model)."""
    read = [v for v in votes if selection.reads(v.annotator)]
    people = {(v.response_a_id, v.response_b_id) for v in read if is_person(v.annotator)}
    kept = [
        v
        for v in read
        if not (is_self(v.annotator) and (v.response_a_id, v.response_b_id) in people)
    ]
    return ReadVotes(kept, len(votes) - len(read), len(read) - len(kept))
