"""A version's labels of its own answers (self-labels), stored as votes like an AI judge's.

After version vK is trained, vK answers prompts twice and a scorer (its implicit reward, a
reward model, ...) says which answer is better (`python -m dpo_core self-label`). Each such
label is stored here as a vote by annotator `self:vK` (storage/annotators.py) on two stored
answers of vK, with the scorer's name, its margin and the pair's weight in the loss
(`Preference.scorer`, `.margin`, `.weight`). Like a judge's vote it is never counted as a
person's (agreement, overlap, people's counts), it trains only when chosen
(`VoteSelection.include_self`, with its weight), and a person's vote on the same two answers
overrides it (storage/selection.py `read_votes`).

`self_label_agreement` says how often people who judged the same two answers chose the same
side as the model did: the evidence for trusting a scorer on a version's own answers.

Functions take a session and never commit (the caller owns the transaction).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from storage.annotators import SELF_PREFIX, is_self, person_filter, self_annotator
from storage.models import (
    ModelVersion,
    Preference,
    Prompt,
    Response,
    now_utc,
    text_hash,
)
from storage.repo import CHUNK, add_prompts, check_storable, insert_ignore
from storage.rounds import find_version
from storage.selection import agreed_outcome
from storage.team_settings import read_setting, write_setting

SCORER_MAX_CHARS = 64  # Preference.scorer's column width


@dataclass(frozen=True)
class SelfLabel:
    """One pair of a version's own answers to `prompt`, as its scorer judged them."""

    prompt: str
    chosen: str  # the answer the scorer preferred
    rejected: str
    margin: float  # the scorer's margin of chosen over rejected
    scorer: str  # the scorer's name, e.g. `implicit`, `reward-model`
    weight: float = 1.0  # the pair's weight in the loss (> 0)


@dataclass(frozen=True)
class AddedSelfLabels:
    """What `add_self_labels` did: new votes, and labels already stored (the first stands)."""

    annotator: str  # `self:<version>`
    added: int
    already: int


@dataclass(frozen=True)
class SelfLabelFile:
    """The labels of a `python -m dpo_core self-label` output file, and whose they are."""

    version: str | None  # None: no rows and no version given
    labels: list[SelfLabel]


def read_self_labels(path: str | Path, version: str | None = None) -> SelfLabelFile:
    """Read a JSONL file of self-labels: `prompt`, `chosen`, `rejected` (strings), `margin`,
    `scorer`, `weight` (default 1) and `annotator` (`self:<version>`, optional when `version`
    is given). ValueError naming the file and line for anything else."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the self-labels: {err}") from err
    labels: list[SelfLabel] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            where = f"{path}, line {number}"
            row = _json_object(line, where)
            version = _row_version(row, version, where)
            labels.append(_self_label(row, where))
    return SelfLabelFile(version, labels)


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg})") from err
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with prompt, chosen, rejected, ...")
    return row


def _row_version(row: dict[str, Any], version: str | None, where: str) -> str:
    """The version a row is by: its `annotator` (`self:<version>`), which must match `version`
    when that is known; `version` when the row names none."""
    annotator = row.get("annotator")
    if annotator is None:
        if version is None:
            raise ValueError(f"{where}: no annotator (self:<version>); give the version")
        return version
    if not isinstance(annotator, str) or not is_self(annotator):
        raise ValueError(f"{where}: annotator {annotator!r} is not a version (self:<version>)")
    named = annotator[len(SELF_PREFIX) :]
    if version is not None and named != version:
        raise ValueError(f"{where}: a label by {named}, not by {version}: one version per file")
    return named


def _self_label(row: dict[str, Any], where: str) -> SelfLabel:
    for key in ("prompt", "chosen", "rejected", "scorer"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: {key!r} must be a string (TRL's standard format)")
    for key in ("margin", "weight"):
        value = row.get(key, 1.0 if key == "weight" else None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {key!r} must be a number, got {value!r}")
    return SelfLabel(
        row["prompt"],
        row["chosen"],
        row["rejected"],
        margin=float(row["margin"]),
        scorer=row["scorer"],
        weight=float(row.get("weight", 1.0)),
    )


def check_self_label(label: SelfLabel, where: str) -> None:
    """ValueError naming `where` (e.g. "self-label 3") and what is wrong with the label."""
    if not label.prompt.strip():
        raise ValueError(f"{where}: the prompt is empty")
    if not label.chosen.strip() or not label.rejected.strip():
        raise ValueError(f"{where}: an answer is empty; a pair needs two answers with text")
    if label.chosen == label.rejected:
        raise ValueError(f"{where}: chosen and rejected are the same answer")
    for text, what in (
        (label.prompt, "the prompt"),
        (label.chosen, "chosen"),
        (label.rejected, "rejected"),
    ):
        check_storable(text, f"{where}: {what}")
    if not isinstance(label.weight, (int, float)) or not (
        math.isfinite(label.weight) and label.weight > 0
    ):
        raise ValueError(f"{where}: the weight must be a number above 0, got {label.weight!r}")
    if not isinstance(label.margin, (int, float)) or not math.isfinite(label.margin):
        raise ValueError(f"{where}: the margin must be a finite number, got {label.margin!r}")
    if not label.scorer.strip() or len(label.scorer.strip()) > SCORER_MAX_CHARS:
        raise ValueError(
            f"{where}: the scorer needs a name of 1 to {SCORER_MAX_CHARS} characters, "
            f"got {label.scorer!r}"
        )


def add_self_labels(
    session: Session,
    version_name: str,
    labels: Sequence[SelfLabel],
    *,
    base_model: str | None = None,
    split: str = "train",
) -> AddedSelfLabels:
    """Store `labels` as votes by `self:<version_name>`: each prompt once (deduplicated), each
    answer once as an answer of that version (one stored before with the same text is reused,
    so a person's vote on it meets the model's), and a vote for the chosen answer with its
    margin, scorer and weight. Idempotent: the same label twice is one vote, the first stands.
    ValueError (nothing stored) for a version that does not exist (`base_model`: the one meant
    when several have that name) or a bad label, naming it."""
    version = find_version(session, version_name, base_model)
    for i, label in enumerate(labels, start=1):
        check_self_label(label, f"self-label {i}")
    annotator = self_annotator(version.name)
    prompt_ids = add_prompts(session, [label.prompt for label in labels], split=split).ids
    keyed = [(prompt_ids[label.prompt.strip()], label) for label in labels]
    texts = dict.fromkeys((pid, t) for pid, label in keyed for t in (label.chosen, label.rejected))
    answer_ids = _version_answers(session, version, list(texts))
    now = now_utc()
    rows = []
    for pid, label in keyed:
        chosen, rejected = answer_ids[pid, label.chosen], answer_ids[pid, label.rejected]
        rows.append(
            {
                "annotator": annotator,
                "response_a_id": min(chosen, rejected),  # stored order: a < b
                "response_b_id": max(chosen, rejected),
                "prompt_id": pid,
                "choice": "a" if chosen < rejected else "b",
                "created_at": now,
                "weight": float(label.weight),
                "scorer": label.scorer.strip(),
                "margin": float(label.margin),
            }
        )
    key = ["annotator", "response_a_id", "response_b_id"]
    added = insert_ignore(session, Preference, rows, key)
    return AddedSelfLabels(annotator, added, len(rows) - added)


def _version_answers(
    session: Session, version: ModelVersion, answers: list[tuple[int, str]]
) -> dict[tuple[int, str], int]:
    """Ids of `version`'s answers by (prompt id, text); the missing ones created."""
    found = _stored_answers(session, version.id, sorted({pid for pid, _ in answers}))
    for pid, text in answers:
        if (pid, text_hash(text)) not in found:
            response = Response(
                prompt_id=pid, model_version_id=version.id, text=text, text_hash=text_hash(text)
            )
            session.add(response)
            session.flush()
            found[pid, response.text_hash] = response.id
    return {(pid, text): found[pid, text_hash(text)] for pid, text in answers}


def _stored_answers(
    session: Session, version_id: int, prompt_ids: list[int]
) -> dict[tuple[int, str], int]:
    """(prompt id, text hash) -> the first stored answer of the version with that text."""
    found: dict[tuple[int, str], int] = {}
    for start in range(0, len(prompt_ids), CHUNK):
        rows = session.execute(
            select(Response.prompt_id, Response.text_hash, Response.id)
            .where(Response.model_version_id == version_id)
            .where(Response.prompt_id.in_(prompt_ids[start : start + CHUNK]))
            .order_by(Response.id)
        )
        for pid, digest, rid in rows:
            found.setdefault((pid, digest), rid)
    return found


@dataclass(frozen=True)
class SelfLabelAgreement:
    """How often people agreed with one version's own labels (one scorer).

    A pair *agreed* when the strict majority of the people's votes on the same two answers
    chose the answer the model chose; a tie, a both-bad vote, or no majority counts as not
    the same."""

    version: str
    scorer: str | None
    labels: int = 0  # the version's own labels stored
    judged: int = 0  # of them, pairs a person also voted on
    agreed: int = 0  # of those, pairs where the people's majority chose the model's answer
    people_votes: int = 0  # people's votes on those pairs
    people_agreed: int = 0  # of them, votes for the model's answer

    @property
    def rate(self) -> float | None:
        return self.agreed / self.judged if self.judged else None

    def sentence(self) -> str:
        """One plain sentence for the Data tab."""
        whose = f"{self.version}'s own labels" + (f" ({self.scorer})" if self.scorer else "")
        if not self.judged:
            return f"People have not yet judged any of the {self.labels} pairs of {whose}."
        return (
            f"People agreed with {whose} on {self.agreed} of {self.judged} pairs they also judged."
        )


def self_label_agreement(session: Session) -> list[SelfLabelAgreement]:
    """Per version (and scorer) with self-labels: how many pairs people also judged, and on
    how many they chose the same side (see `SelfLabelAgreement`); by version name."""
    model = select(
        Preference.annotator,
        Preference.scorer,
        Preference.response_a_id,
        Preference.response_b_id,
        Preference.choice,
    ).where(Preference.annotator.startswith(SELF_PREFIX))
    people = _people_on_self_labels(session)
    tally: dict[tuple[str, str], SelfLabelAgreement] = {}
    for annotator, scorer, a, b, choice in session.execute(model):
        version = annotator[len(SELF_PREFIX) :]
        votes = people.get((a, b), [])
        seen = tally.get((version, scorer or "")) or SelfLabelAgreement(version, scorer)
        tally[version, scorer or ""] = SelfLabelAgreement(
            version,
            scorer,
            labels=seen.labels + 1,
            judged=seen.judged + bool(votes),
            agreed=seen.agreed + (bool(votes) and agreed_outcome(votes, "majority") == choice),
            people_votes=seen.people_votes + len(votes),
            people_agreed=seen.people_agreed + votes.count(choice),
        )
    return [tally[key] for key in sorted(tally)]


def _people_on_self_labels(session: Session) -> dict[tuple[int, int], list[str]]:
    """(response a id, response b id) -> people's choices on a pair that has a self-label."""
    model = aliased(Preference)
    same_pair = and_(
        model.response_a_id == Preference.response_a_id,
        model.response_b_id == Preference.response_b_id,
        model.annotator.startswith(SELF_PREFIX),
    )
    rows = session.execute(
        select(Preference.response_a_id, Preference.response_b_id, Preference.choice)
        .where(person_filter(Preference.annotator))
        .where(exists().where(same_pair))
    )
    found: dict[tuple[int, int], list[str]] = {}
    for a, b, choice in rows:
        found.setdefault((a, b), []).append(choice)
    return found


# --- the app's self-labeling job (app/train/self_labels.py) ------------------------------------

SELF_LABELS_KEY = "self_labels"  # the Setting row: how many self-labels per human label
MULTIPLIERS = (0, 2, 4, 8)  # 0: off; else the self-labels per human label of the round


def self_label_multiplier(session: Session) -> int:
    """How many self-labels per human label of a round the app adds (0: off, the default)."""
    value = read_setting(session, SELF_LABELS_KEY)
    return value if isinstance(value, int) and value in MULTIPLIERS else 0


def set_self_label_multiplier(session: Session, multiplier: int) -> None:
    """Set it for the team (every replica). ValueError for a value not in MULTIPLIERS."""
    if multiplier not in MULTIPLIERS:
        raise ValueError(
            f"self-labels must be off or {', '.join(f'{m}x' for m in MULTIPLIERS[1:])} "
            f"the human labels, got {multiplier!r}"
        )
    write_setting(session, SELF_LABELS_KEY, multiplier)


@dataclass(frozen=True)
class OwnAnswerVote:
    """A person's A/B vote on two answers both written by one version: the evidence a scorer
    is calibrated on (the answer the person chose, and the other)."""

    prompt: str
    chosen: str
    rejected: str


def own_answer_votes(session: Session, version_id: int) -> list[OwnAnswerVote]:
    """People's A/B votes on pairs whose two answers are both by `version_id`, oldest first
    (ties and both-bad votes say nothing about which answer is better)."""
    return _ab_votes(session, version_id, own=True)


def other_answer_votes(session: Session, version_id: int, limit: int) -> list[OwnAnswerVote]:
    """People's A/B votes on pairs with no answer by `version_id` (the pairs its rounds were
    trained on: the reward-model scorer is fitted on them), the newest `limit`, oldest first."""
    return _ab_votes(session, version_id, own=False, limit=limit)


def _ab_votes(
    session: Session, version_id: int, *, own: bool, limit: int | None = None
) -> list[OwnAnswerVote]:
    resp_a, resp_b = aliased(Response), aliased(Response)
    by_version = tuple(  # an imported answer (no version) is no version's
        func.coalesce(r.model_version_id, 0) == version_id for r in (resp_a, resp_b)
    )
    query = (
        select(Preference.id, Prompt.text, Preference.choice, resp_a.text, resp_b.text)
        .join(Prompt, Prompt.id == Preference.prompt_id)
        .join(resp_a, resp_a.id == Preference.response_a_id)
        .join(resp_b, resp_b.id == Preference.response_b_id)
        .where(person_filter(Preference.annotator), Preference.choice.in_(("a", "b")))
        .where(and_(*by_version) if own else ~or_(*by_version))
        .order_by(Preference.id.desc())
        .limit(limit)
    )
    rows = sorted(session.execute(query))  # by id: oldest first
    return [
        OwnAnswerVote(prompt, a, b) if choice == "a" else OwnAnswerVote(prompt, b, a)
        for _, prompt, choice, a, b in rows
    ]


def round_labels(session: Session, version_id: int) -> int:
    """People's votes on pairs with an answer by `version_id`: the human labels of its round."""
    resp_a, resp_b = aliased(Response), aliased(Response)
    query = (
        select(func.count())
        .select_from(Preference)
        .join(resp_a, resp_a.id == Preference.response_a_id)
        .join(resp_b, resp_b.id == Preference.response_b_id)
        .where(person_filter(Preference.annotator))
        .where(or_(resp_a.model_version_id == version_id, resp_b.model_version_id == version_id))
    )
    return int(session.scalar(query) or 0)


def self_label_count(session: Session, version_name: str) -> int:
    """The labels stored by `self:<version_name>`."""
    query = select(func.count()).where(Preference.annotator == self_annotator(version_name))
    return int(session.scalar(query) or 0)


@dataclass(frozen=True)
class UnjudgedSelfLabel:
    """A pair a version labeled that no person has judged yet (stored order: a < b)."""

    prompt_id: int
    prompt: str
    version: str
    response_ids: tuple[int, int]


def next_unjudged_self_label(
    session: Session, exclude_prompts: Collection[int] = ()
) -> UnjudgedSelfLabel | None:
    """A random self-labeled pair without a person's vote (prompts in `exclude_prompts`
    passed over), for people to check the model's labels; None when there is none."""
    person = aliased(Preference)
    judged = exists().where(
        person.response_a_id == Preference.response_a_id,
        person.response_b_id == Preference.response_b_id,
        person_filter(person.annotator),
    )
    query = (
        select(Preference.prompt_id, Prompt.text, Preference.annotator)
        .add_columns(Preference.response_a_id, Preference.response_b_id)
        .join(Prompt, Prompt.id == Preference.prompt_id)
        .where(Preference.annotator.startswith(SELF_PREFIX), ~judged)
        .order_by(func.random())
        .limit(1)
    )
    if exclude_prompts:
        query = query.where(Preference.prompt_id.not_in(list(exclude_prompts)))
    row = session.execute(query).first()
    if row is None:
        return None
    prompt_id, prompt, annotator, a, b = row
    return UnjudgedSelfLabel(prompt_id, prompt, annotator[len(SELF_PREFIX) :], (a, b))
