"""Repository functions for labeling data: prompts, responses, preferences, comparison votes.

Every function takes a session and never commits: the caller owns the transaction, one per user
event (`with Session.begin() as session: ...`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, aliased

from common.pair_format import Pair
from storage.annotators import is_person
from storage.models import (
    CHOICES,
    SPLITS,
    WINNERS,
    ComparisonVote,
    ModelVersion,
    Preference,
    Prompt,
    Response,
    UncertaintyScore,
    now_utc,
    text_hash,
)
from storage.selection import VoteSelection, agreed_outcome, read_votes
from storage.vote_rows import VotedAnswer, VoteRow, vote_rows

CHUNK = 500  # values per IN (...): well under SQLite's limit on bound parameters


@dataclass(frozen=True)
class AddPromptsResult:
    ids: dict[str, int]  # stripped text -> id, in input order
    added: int
    duplicates: int  # already stored, or repeated in the input
    blank: int


@dataclass(frozen=True)
class PreferencePair:
    """One training pair in TRL's standard form, with its provenance."""

    prompt: str
    chosen: str
    rejected: str
    annotator: str
    chosen_model_version: str | None  # None: a human rewrite or an imported answer
    rejected_model_version: str | None
    preference_id: int
    weight: float = 1.0  # a version's own label's weight (storage/self_labels.py); else 1


@dataclass(frozen=True)
class PairSet:
    """Training pairs and what did not train. Under `every` the counts are votes; under
    `majority`/`unanimous` they are pairs of answers (an agreed tie, an agreed both-bad, no
    agreement)."""

    pairs: list[PreferencePair]
    excluded_ties: int
    excluded_both_bad: int
    undecided: int = 0  # pairs of answers whose votes do not agree enough
    left_out: int = 0  # votes not read: left-out annotators, models' votes unless included
    overridden: int = 0  # versions' own labels not read: a person voted on the same answers


@dataclass
class VoteCounts:
    votes: int = 0
    by_choice: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHOICES, 0))
    usable_pairs: int = 0


@dataclass(frozen=True)
class StoreStats:
    prompts: dict[str, int]  # per split
    responses: int
    overall: VoteCounts  # every vote, models' too
    by_annotator: dict[str, VoteCounts]
    people: VoteCounts = field(default_factory=VoteCounts)  # people's votes only


class RecordedVote(NamedTuple):
    """`record_preference`'s result: the stored vote and whether this call created it."""

    preference: Preference
    created: bool


class RecordedComparison(NamedTuple):
    """`record_comparison_vote`'s result: the stored vote and whether this call created it."""

    vote: ComparisonVote
    created: bool


@dataclass(frozen=True)
class _AnswerPair:
    """Two answers to one prompt: the prompt and each answer's model version (None: none)."""

    prompt_id: int
    first_version_id: int | None
    second_version_id: int | None


@dataclass(frozen=True)
class Matchup:
    """Blind votes between two versions, from `version_x`'s side (x's id < y's id)."""

    version_x: str
    version_y: str
    x_wins: int
    ties: int
    y_wins: int


def check_storable(text: str, what: str) -> str:
    """`text`, unless it holds U+0000: PostgreSQL cannot store it, so no back end takes it."""
    if "\x00" in text:
        raise ValueError(f"{what} contains a NUL character (U+0000), which cannot be stored")
    return text


def add_prompts(
    session: Session, texts: Iterable[str], *, source: str = "", split: str = "train"
) -> AddPromptsResult:
    """Add prompts (stripped; blank ones skipped), deduplicated by text hash.

    A prompt already present keeps its first source and split. Safe under concurrent writers.
    """
    _check_in(split, SPLITS, "split")
    by_hash: dict[str, str] = {}
    blank = non_blank = 0
    for raw in texts:
        stripped = check_storable(raw, "a prompt").strip()
        if stripped:
            non_blank += 1
            by_hash.setdefault(text_hash(stripped), stripped)
        else:
            blank += 1
    now = now_utc()
    rows = [
        {"text": text, "text_hash": h, "source": source, "split": split, "created_at": now}
        for h, text in by_hash.items()
    ]
    added = insert_ignore(session, Prompt, rows, ["text_hash"])
    hashes = list(by_hash)
    id_of: dict[str, int] = {}
    for start in range(0, len(hashes), CHUNK):
        id_of.update(_prompt_ids(session, hashes[start : start + CHUNK]))
    ids = {text: id_of[h] for h, text in by_hash.items()}
    return AddPromptsResult(ids, added, non_blank - added, blank)


def add_prompt(session: Session, text: str, *, source: str = "", split: str = "train") -> Prompt:
    """Get or create one prompt (a typed one, say). Raises ValueError when it is blank."""
    ids = add_prompts(session, [text], source=source, split=split).ids
    if not ids:
        raise ValueError("the prompt is empty")
    return session.get_one(Prompt, ids[text.strip()])


def _prompt_ids(session: Session, hashes: list[str]) -> dict[str, int]:
    query = select(Prompt.text_hash, Prompt.id).where(Prompt.text_hash.in_(hashes))
    return dict(session.execute(query).all())


def list_prompts(
    session: Session, *, split: str | None = None, limit: int | None = None
) -> list[Prompt]:
    query = select(Prompt).order_by(Prompt.id).limit(limit)
    if split is not None:
        query = query.where(Prompt.split == split)
    return list(session.scalars(query))


def next_prompt(
    session: Session,
    annotator: str,
    *,
    split: str = "train",
    exclude: Collection[int] = (),
    uncertain_for: int | None = None,
) -> Prompt | None:
    """The prompt to label next: fewest votes by `annotator` first, then fewest votes overall.

    `exclude` holds prompt ids to pass over (the ones this annotator skipped in this session).
    `uncertain_for` (a model version id; `storage.uncertainty`): among prompts labeled equally
    often, those this version is least sure about come first, then the unscored ones.
    """
    mine = func.sum(case((Preference.annotator == annotator, 1), else_=0))
    counts = (
        select(Preference.prompt_id, mine.label("mine"), func.count().label("total"))
        .group_by(Preference.prompt_id)
        .subquery()
    )
    query = (
        select(Prompt)
        .outerjoin(counts, counts.c.prompt_id == Prompt.id)
        .where(Prompt.split == split)
        .order_by(func.coalesce(counts.c.mine, 0), func.coalesce(counts.c.total, 0))
        .limit(1)
    )
    if uncertain_for is not None:
        score = UncertaintyScore
        on = (score.prompt_id == Prompt.id) & (score.model_version_id == uncertain_for)
        query = query.outerjoin(score, on).order_by(score.margin.is_(None), score.margin)
    query = query.order_by(Prompt.id)
    if exclude:
        query = query.where(Prompt.id.not_in(list(exclude)))
    return session.scalars(query).first()


def record_response(
    session: Session,
    *,
    prompt_id: int,
    model_version_id: int | None,
    text: str,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    num_tokens: int | None = None,
    latency_s: float | None = None,
) -> Response:
    """Store one generated answer with what produced it (version, sampling parameters, seed)."""
    response = Response(
        prompt_id=prompt_id,
        model_version_id=model_version_id,
        text=check_storable(text, "the response"),
        text_hash=text_hash(text),
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        num_tokens=num_tokens,
        latency_s=latency_s,
    )
    session.add(response)
    session.flush()
    return response


def record_preference(
    session: Session,
    *,
    response_a_id: int,
    response_b_id: int,
    choice: str,
    annotator: str,
    rewrite: str | None = None,
    seconds_spent: float | None = None,
    suggestion: Suggested | None = None,
) -> RecordedVote:
    """Record a vote; returns it and whether it is new.

    `response_a_id` is the answer shown on the left (A). Idempotent: the same annotator voting
    on the same two answers again (double click, retry, either display order) leaves the first
    vote as it is. A rewrite, if given, is a better answer written by the annotator: it becomes
    `chosen` in the training pairs. `suggestion`: what an AI judge suggested (A/B as shown).
    """
    _check_in(choice, CHOICES, "choice")
    if suggestion is not None:
        _check_in(suggestion.choice, CHOICES, "suggested choice")
    annotator = _checked_annotator(annotator)
    if seconds_spent is not None and not seconds_spent >= 0:
        raise ValueError(f"seconds_spent must be >= 0, got {seconds_spent}")
    prompt_id = _two_responses(session, response_a_id, response_b_id).prompt_id
    left = response_a_id
    suggested = (
        _stored_order(response_a_id, response_b_id, suggestion.choice)[2] if suggestion else None
    )
    response_a_id, response_b_id, choice = _stored_order(response_a_id, response_b_id, choice)
    key = {"annotator": annotator, "response_a_id": response_a_id, "response_b_id": response_b_id}
    row = {
        **key,
        "prompt_id": prompt_id,
        "choice": choice,
        "rewrite": check_storable(rewrite or "", "the rewrite").strip() or None,
        "seconds_spent": seconds_spent,
        "created_at": now_utc(),
        "left_response_id": left,
        "suggested_choice": suggested,
        "suggested_by": suggestion.judge if suggestion else None,
    }
    created = insert_ignore(session, Preference, [row], list(key)) == 1
    preference = session.scalars(select(Preference).filter_by(**key)).one()
    return RecordedVote(preference, created)


@dataclass(frozen=True)
class Suggested:
    """An AI judge's suggestion shown with a pair: `choice` as shown (a = left)."""

    choice: str
    judge: str


def _stored_order(response_a_id: int, response_b_id: int, choice: str) -> tuple[int, int, str]:
    """Votes are stored with response_a_id < response_b_id, so a swapped display of the same
    two answers is the same vote (its unique key)."""
    if response_a_id < response_b_id:
        return response_a_id, response_b_id, choice
    return response_b_id, response_a_id, {"a": "b", "b": "a"}.get(choice, choice)


def _checked_annotator(annotator: str) -> str:
    annotator = annotator.strip()
    if not annotator:
        raise ValueError("the annotator name is empty")
    return annotator


def add_imported_pairs(
    session: Session,
    pairs: Sequence[Pair],
    *,
    annotator: str,
    source: str = "",
    split: str = "train",
) -> int:
    """Store pairs from a dataset as votes by `annotator` for chosen.

    Their answers are stored once per prompt and text, with no model version. A vote already
    stored is skipped, so importing a file twice adds nothing. Returns how many votes are new.
    Pairs with chosen == rejected are refused by the database: drop them first. Bulk statements
    throughout, so a large dataset imports in seconds.
    """
    annotator = _checked_annotator(annotator)
    prompt_ids = add_prompts(session, [p.prompt for p in pairs], source=source, split=split).ids
    keyed = [(prompt_ids[p.prompt.strip()], p.chosen, p.rejected) for p in pairs]
    answers = dict.fromkeys((pid, text) for pid, c, r in keyed for text in (c, r))
    answer_ids = _imported_answers(session, list(answers))
    now = now_utc()
    rows = []
    for prompt_id, chosen, rejected in keyed:
        a, b, choice = _stored_order(
            answer_ids[prompt_id, chosen], answer_ids[prompt_id, rejected], "a"
        )
        rows.append(
            {
                "annotator": annotator,
                "response_a_id": a,
                "response_b_id": b,
                "prompt_id": prompt_id,
                "choice": choice,
                "rewrite": None,
                "seconds_spent": None,
                "created_at": now,
            }
        )
    return insert_ignore(session, Preference, rows, ["annotator", "response_a_id", "response_b_id"])


def _imported_answers(
    session: Session, answers: list[tuple[int, str]]
) -> dict[tuple[int, str], int]:
    """Ids of answers with no model version, by (prompt id, text); the missing ones created."""
    imported = Response.model_version_id.is_(None)
    now = now_utc()
    rows = [
        {
            "prompt_id": pid,
            "text": check_storable(text, "an answer"),
            "text_hash": text_hash(text),
            "created_at": now,
        }
        for pid, text in answers
    ]
    insert_ignore(session, Response, rows, ["prompt_id", "text_hash"], imported)
    prompt_ids = sorted({pid for pid, _ in answers})
    found: dict[tuple[int, str], int] = {}
    for i in range(0, len(prompt_ids), CHUNK):
        query = select(Response.prompt_id, Response.text_hash, Response.id).where(
            imported, Response.prompt_id.in_(prompt_ids[i : i + CHUNK])
        )
        found.update({(pid, h): rid for pid, h, rid in session.execute(query)})
    return {(pid, text): found[pid, text_hash(text)] for pid, text in answers}


def _two_responses(session: Session, first_id: int, second_id: int) -> _AnswerPair:
    """The prompt and model versions of two different answers to one prompt."""
    if first_id == second_id:
        raise ValueError("a vote needs two different responses")
    rows = session.execute(
        select(Response.id, Response.prompt_id, Response.model_version_id).where(
            Response.id.in_((first_id, second_id))
        )
    )
    found = {row.id: row for row in rows}
    for rid in (first_id, second_id):
        if rid not in found:
            raise ValueError(f"no response with id {rid}")
    first, second = found[first_id], found[second_id]
    if first.prompt_id != second.prompt_id:
        raise ValueError("the two responses answer different prompts")
    return _AnswerPair(first.prompt_id, first.model_version_id, second.model_version_id)


def preference_pairs(
    session: Session, *, split: str | None = "train", selection: VoteSelection | None = None
) -> PairSet:
    """Votes turned into (prompt, chosen, rejected) pairs, oldest vote first.

    `selection` (default: `VoteSelection()`, majority of human votes) says which votes are
    read and how several votes on the same two answers decide (storage/selection.py). One vote
    gives: `a`/`b`: the winner is chosen, the other rejected; with a rewrite, the rewrite is
    chosen against the loser. `tie`/`both_bad`: nothing (counted), unless the annotator wrote a
    better answer: then it is chosen against each of the two. A version's own label trains
    with its weight (`PreferencePair.weight`).
    """
    selection = selection or VoteSelection()
    votes = read_votes(vote_rows(session, split), selection)
    if selection.votes == "every":
        pair_set = _pairs_of_votes(votes.read)
    else:
        pair_set = _pairs_by_agreement(votes.read, selection.votes)
    return replace(pair_set, left_out=votes.left_out, overridden=votes.overridden)


def _pairs_of_votes(votes: Sequence[VoteRow]) -> PairSet:
    """Each vote its own pairs (`every`); ties and both-bad votes without a rewrite counted."""
    pairs: list[PreferencePair] = []
    ties = both_bad = 0
    for vote in votes:
        made = _vote_pairs(vote)
        pairs += made
        if not made:
            ties += vote.choice == "tie"
            both_bad += vote.choice == "both_bad"
    return PairSet(pairs, excluded_ties=ties, excluded_both_bad=both_bad)


def _pairs_by_agreement(votes: Sequence[VoteRow], mode: str) -> PairSet:
    """`majority`/`unanimous`: per pair of answers, the votes of the agreed outcome train
    (identical pairs once, credited to every annotator who gave them, with the largest of
    their weights); answer pairs with no agreement, or an agreed tie / both-bad with no
    rewrite, are counted."""
    units: dict[tuple[int, int], list[VoteRow]] = {}
    for vote in votes:
        units.setdefault((vote.response_a_id, vote.response_b_id), []).append(vote)
    found: dict[tuple[str, str, str], list[PreferencePair]] = {}
    ties = both_bad = undecided = 0
    for unit_votes in units.values():
        outcome = agreed_outcome([v.choice for v in unit_votes], mode)
        made = [p for v in unit_votes if v.choice == outcome for p in _vote_pairs(v)]
        for pair in made:
            found.setdefault((pair.prompt, pair.chosen, pair.rejected), []).append(pair)
        if not made:
            undecided += outcome is None
            ties += outcome == "tie"
            both_bad += outcome == "both_bad"
    pairs = [
        replace(
            same[0],
            annotator=", ".join(dict.fromkeys(p.annotator for p in same)),
            weight=max(p.weight for p in same),
        )
        for same in found.values()
    ]
    pairs.sort(key=lambda p: p.preference_id)
    return PairSet(pairs, excluded_ties=ties, excluded_both_bad=both_bad, undecided=undecided)


def _vote_pairs(vote: VoteRow) -> list[PreferencePair]:
    """The pairs one vote gives, on its own."""
    a, b = vote.a, vote.b
    winner, loser = (b, a) if vote.choice == "b" else (a, b)
    rewrite = VotedAnswer(vote.rewrite, None) if vote.rewrite else None
    if vote.choice in ("a", "b"):
        chosen, losers = rewrite or winner, [loser]
    elif rewrite:
        chosen, losers = rewrite, [a, b]
    else:
        return []
    return [
        PreferencePair(
            prompt=vote.prompt,
            chosen=chosen.text,
            rejected=lost.text,
            annotator=vote.annotator,
            chosen_model_version=chosen.version,
            rejected_model_version=lost.version,
            preference_id=vote.id,
            weight=vote.weight,
        )
        for lost in losers
    ]


def vote_annotators(session: Session) -> list[str]:
    """Everyone who has voted, AI judges included, sorted: the names `leave_out` can take."""
    query = select(Preference.annotator).distinct().order_by(Preference.annotator)
    return list(session.scalars(query))


def unknown_annotators(session: Session, selection: VoteSelection) -> list[str]:
    """The names in `selection.leave_out` with no votes (a typo, or someone not voting yet):
    leaving them out changes nothing, so callers say so and go on."""
    known = set(vote_annotators(session))
    return [name for name in selection.leave_out if name not in known]


def _usable_pairs() -> ColumnElement[int]:
    """How many training pairs one vote gives on its own, as SQL (`preference_pairs` with
    `votes="every"`)."""
    return case(
        (Preference.choice.in_(("a", "b")), 1),
        (Preference.rewrite.is_not(None), 2),
        else_=0,
    )


def store_stats(session: Session) -> StoreStats:
    """Counts for progress displays and `python -m storage stats`."""
    prompts = dict.fromkeys(SPLITS, 0)
    prompts.update(session.execute(select(Prompt.split, func.count()).group_by(Prompt.split)).all())
    responses = session.scalar(select(func.count()).select_from(Response)) or 0
    rows = session.execute(
        select(
            Preference.annotator, Preference.choice, func.count(), func.sum(_usable_pairs())
        ).group_by(Preference.annotator, Preference.choice)
    )
    overall, people = VoteCounts(), VoteCounts()
    by_annotator: dict[str, VoteCounts] = {}
    for annotator, choice, votes, usable in rows:
        mine = by_annotator.setdefault(annotator, VoteCounts())
        for counts in (overall, mine, people) if is_person(annotator) else (overall, mine):
            counts.votes += votes
            counts.by_choice[choice] += votes
            counts.usable_pairs += int(usable or 0)
    return StoreStats(prompts, responses, overall, dict(sorted(by_annotator.items())), people)


def record_comparison_vote(
    session: Session,
    *,
    response_left_id: int,
    response_right_id: int,
    winner: str,
    annotator: str,
) -> RecordedComparison:
    """Record a blind vote between two versions' answers (left/right as shown); idempotent."""
    _check_in(winner, WINNERS, "winner")
    annotator = _checked_annotator(annotator)
    answers = _two_responses(session, response_left_id, response_right_id)
    left_version, right_version = answers.first_version_id, answers.second_version_id
    if left_version is None or right_version is None or left_version == right_version:
        raise ValueError("a comparison needs answers from two different model versions")
    key = {
        "annotator": annotator,
        "response_left_id": response_left_id,
        "response_right_id": response_right_id,
    }
    row = {**key, "prompt_id": answers.prompt_id, "winner": winner, "created_at": now_utc()}
    created = insert_ignore(session, ComparisonVote, [row], list(key)) == 1
    return RecordedComparison(
        session.scalars(select(ComparisonVote).filter_by(**key)).one(), created
    )


def comparison_counts(session: Session) -> list[Matchup]:
    """Win / tie / loss counts for every pair of versions that met in blind votes."""
    left, right = aliased(Response), aliased(Response)
    rows = session.execute(
        select(left.model_version_id, right.model_version_id, ComparisonVote.winner, func.count())
        .join(left, left.id == ComparisonVote.response_left_id)
        .join(right, right.id == ComparisonVote.response_right_id)
        .group_by(left.model_version_id, right.model_version_id, ComparisonVote.winner)
    )
    tally: dict[tuple[int, int], list[int]] = {}
    for left_version, right_version, winner, n in rows:
        x, y = sorted((left_version, right_version))
        counts = tally.setdefault((x, y), [0, 0, 0])  # x wins, ties, y wins
        if winner == "tie":
            counts[1] += n
        else:
            winner_version = left_version if winner == "left" else right_version
            counts[0 if winner_version == x else 2] += n
    names = dict(session.execute(select(ModelVersion.id, ModelVersion.name)).all())
    return [Matchup(names[x], names[y], *counts) for (x, y), counts in sorted(tally.items())]


def insert_ignore(
    session: Session,
    model: type,
    rows: list[dict[str, Any]],
    key: list[str],
    where: ColumnElement[bool] | None = None,
) -> int:
    """INSERT rows (executemany), skipping those whose `key` columns clash with a stored row in
    the unique index on `key` (partial when `where` is given). Safe under concurrent writers.
    Returns how many rows were inserted."""
    if not rows:
        return 0
    session.flush()  # a Core statement skips autoflush; pending rows it refers to must be there
    insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else postgresql_insert
    stmt = insert(model.__table__).on_conflict_do_nothing(index_elements=key, index_where=where)
    result = session.connection().execute(stmt, rows, execution_options={"preserve_rowcount": True})
    return result.rowcount


def _check_in(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
