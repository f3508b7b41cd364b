"""Rounds: label the active version's answers, train, label the new version's answers, train again.

Every vote compares two stored answers, and each answer knows the model version that wrote it
(`Response.model_version_id`; none for an imported answer). A pair is *on vK's answers* when
the vote it comes from compared answers written by vK. The vote's two answers decide, so a
pair whose chosen side is the annotator's rewrite is on the version of the answers it was
written against. A *mixed* vote, on answers of two versions (one answer fetched before a
version switch, one after), counts as on the newer (the later registered) of the two: it holds
an answer of that version, and only one version is credited with it, so per-version counts add
up to the number of pairs. A vote on imported answers only is on no version's answers
(`IMPORTED` in the counts).

What a continued run trains on (`VoteSelection.train_on`; the parent is the version the run
continues from, `VoteSelection.parent_id`):
- `all` (the default): every pair, weight 1, as before rounds had a name;
- `parent`: only the pairs on the parent's answers (the on-policy round);
- `newest`: every pair, weighted `DECAY ** g`, g the generations between the pair's version
  and the parent in the versions' family tree: 1 on the parent's answers, 0.5 on its parent's,
  0.25 two back; a version beside the parent (a sibling after a roll back) is two steps away
  through their common parent. Imported pairs weigh as the base's answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from storage.models import ModelVersion, Preference, Response
from storage.repo import CHUNK, PreferencePair, preference_pairs
from storage.selection import VoteSelection

DECAY = 0.5  # `newest`: the weight's factor per generation between a pair's version and the parent
IMPORTED = "imported"  # how the counts name pairs on no version's answers


@dataclass(frozen=True)
class Lineage:
    """Every registered version's parent and name: the versions' family tree."""

    parents: dict[int, int | None]
    names: dict[int, str]

    @classmethod
    def load(cls, session: Session) -> Lineage:
        rows = session.execute(select(ModelVersion.id, ModelVersion.parent_id, ModelVersion.name))
        parents: dict[int, int | None] = {}
        names: dict[int, str] = {}
        for version_id, parent_id, name in rows:
            parents[version_id], names[version_id] = parent_id, name
        return cls(parents, names)

    def chain(self, version_id: int) -> list[int]:
        """The version, its parent, its parent's parent, ..., its base."""
        chain: list[int] = []
        current: int | None = version_id
        while current is not None and current not in chain:
            chain.append(current)
            current = self.parents.get(current)
        return chain

    def text(self, version_id: int) -> str:
        """`v3 ← v2 ← v1 ← base`: the version and where it comes from."""
        return " ← ".join(self.names.get(v, "?") for v in self.chain(version_id))

    def generations(self, version_id: int | None, parent_id: int) -> int:
        """Steps from the parent to `version_id` in the family tree (0: the parent itself);
        None (imported answers) is as far as the parent's base. Another base model's version
        is one step beyond both bases."""
        up = self.chain(parent_id)
        if version_id is None:
            return len(up) - 1
        mine = self.chain(version_id)
        common = next((v for v in mine if v in up), None)
        if common is None:
            return len(mine) + len(up) - 1
        return mine.index(common) + up.index(common)


@dataclass(frozen=True)
class RoundPair:
    """A training pair with the version whose answers it compares, and its weight."""

    pair: PreferencePair
    version_id: int | None  # None: imported answers
    version: str  # that version's name, or IMPORTED
    weight: float  # the round's (1.0 unless `newest`) times the vote's (a `self:` label's)


def answer_versions(session: Session, preference_ids: Iterable[int]) -> dict[int, int | None]:
    """Vote id -> the version whose answers it compares: the newer of its two answers'
    versions (a mixed vote), None when neither answer is a model's."""
    ids = sorted(set(preference_ids))
    resp_a, resp_b = aliased(Response), aliased(Response)
    found: dict[int, int | None] = {}
    for start in range(0, len(ids), CHUNK):
        rows = session.execute(
            select(Preference.id, resp_a.model_version_id, resp_b.model_version_id)
            .join(resp_a, resp_a.id == Preference.response_a_id)
            .join(resp_b, resp_b.id == Preference.response_b_id)
            .where(Preference.id.in_(ids[start : start + CHUNK]))
        )
        for vote_id, a, b in rows:
            found[vote_id] = newer(a, b)
    return found


def newer(a: int | None, b: int | None) -> int | None:
    """The version a vote on answers of versions `a` and `b` is on: the later registered
    (None: neither answer is a model's)."""
    return max((v for v in (a, b) if v is not None), default=None)


@dataclass(frozen=True)
class RoundRule:
    """What `selection.train_on` does to a pair or answer on a version's answers: keeps it
    with a weight, or leaves it out (None)."""

    lineage: Lineage
    train_on: str
    parent: int | None

    @classmethod
    def load(cls, session: Session, selection: VoteSelection) -> RoundRule:
        """ValueError when `parent` or `newest` has no parent version to count from."""
        lineage = Lineage.load(session)
        parent = selection.parent_id
        if selection.train_on != "all" and parent not in lineage.names:
            what = "none given" if parent is None else f"no version has id {parent}"
            raise ValueError(
                f"train on {selection.train_on} needs the version the run continues from ({what})"
            )
        return cls(lineage, selection.train_on, parent)

    def weight(self, version_id: int | None) -> float | None:
        """The weight of a pair on `version_id`'s answers (None: imported), None: left out."""
        if self.train_on == "parent" and version_id != self.parent:
            return None
        if self.train_on == "newest" and self.parent is not None:
            return DECAY ** self.lineage.generations(version_id, self.parent)
        return 1.0

    def name(self, version_id: int | None) -> str:
        return IMPORTED if version_id is None else self.lineage.names[version_id]


def select_round(
    session: Session, pairs: Sequence[PreferencePair], selection: VoteSelection
) -> list[RoundPair]:
    """The pairs `selection.train_on` keeps, in their order, each with its version and weight
    (the round's times the pair's own). ValueError when `parent` or `newest` has no parent
    version to count from."""
    rule = RoundRule.load(session, selection)
    versions = answer_versions(session, [p.preference_id for p in pairs])
    kept = []
    for pair in pairs:
        version_id = versions.get(pair.preference_id)
        weight = rule.weight(version_id)
        if weight is not None:
            name = rule.name(version_id)
            kept.append(RoundPair(pair, version_id, name, weight * pair.weight))
    return kept


def pairs_per_version(
    session: Session, selection: VoteSelection | None = None
) -> dict[int | None, int]:
    """Version id (None: imported) -> the pairs (both splits, both answers non-empty) on its
    answers, from the votes `selection` picks (default: the majority of human votes)."""
    chosen = replace(selection or VoteSelection(), train_on="all", parent_id=None)
    pairs = preference_pairs(session, split=None, selection=chosen).pairs
    kept = [p for p in pairs if has_text(p)]
    return dict(Counter(r.version_id for r in select_round(session, kept, chosen)))


def has_text(pair: PreferencePair) -> bool:
    """Both answers say something (a vote for an empty answer's rival is real, but the pair
    cannot train: every run on it would fail at the pair check)."""
    return bool(pair.chosen.strip()) and bool(pair.rejected.strip())


def counts_by_version(pairs: Iterable[RoundPair]) -> dict[str, int]:
    """How many pairs are on each version's answers, the most first."""
    return dict(Counter(p.version for p in pairs).most_common())


def counts_text(counts: dict[str, int]) -> str:
    """`40 on v2's answers, 23 on v1's, 3 imported` (`` for no pairs)."""
    parts = []
    for name, n in counts.items():
        if name == IMPORTED:
            parts.append(f"{n} imported")
        else:
            parts.append(f"{n} on {name}'s" + ("" if parts else " answers"))
    return ", ".join(parts)


def find_version(session: Session, name: str, base_model: str | None = None) -> ModelVersion:
    """The version named `name` (of `base_model` when given); ValueError naming the versions
    there are, or asking for the base model when two base models have a version of that name."""
    query = select(ModelVersion).where(ModelVersion.name == name.strip())
    if base_model:
        query = query.where(ModelVersion.base_model == base_model)
    found = list(session.scalars(query))
    if len(found) == 1:
        return found[0]
    if found:
        models = ", ".join(sorted(v.base_model for v in found))
        raise ValueError(
            f"{name} exists for several base models ({models}): name one (--base-model)"
        )
    names = sorted({v.name for v in session.scalars(select(ModelVersion))})
    there = ", ".join(names) if names else "none yet (train a run first)"
    raise ValueError(f"no version named {name!r}; the versions are: {there}")


def no_parent_pairs_message(parent: str) -> str:
    """Said when a run that trains on its parent's answers finds none."""
    return (
        f"No pairs were labeled on {parent}'s answers yet: label some in the Label tab, "
        "or choose train on: all."
    )
