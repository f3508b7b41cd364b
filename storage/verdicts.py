"""Verdicts on single answers, and every vote as KTO's unpaired rows.

A verdict is a thumbs up or down on one answer (the Label tab's one-answer mode). KTO
(Ethayarajh et al. 2024) trains on single answers labelled desirable or undesirable, TRL's
*unpaired preference* rows `{"prompt", "completion", "label"}`, so every kind of vote gives such
rows (`kto_rows`):

- a verdict: its answer, desirable for `up`, undesirable for `down`;
- an A/B vote: the answers of its training pairs (storage/repo.py `preference_pairs`, one vote
  at a time) unpaired: chosen desirable, rejected undesirable. So A/B gives the winner (or the
  annotator's rewrite, which replaces it as in DPO) desirable and the loser undesirable; a tie
  or both-bad vote *with* a rewrite gives the rewrite desirable and both answers undesirable;
- a both-bad vote without a rewrite: both answers undesirable (it trains no DPO pair);
- a tie without a rewrite: nothing (two equal answers say nothing about either); counted.

Each vote counts on its own: KTO labels answers, not pairs of answers, so the DPO choice of
`majority`/`unanimous` does not apply; annotators who disagree give the same answer both labels.
The other choices of `VoteSelection` do: `leave_out` annotators are not read, AI judges
(`judge:<name>`) only with `include_judges`, versions' own labels (`self:<version>`) only with
`include_self`, unless a person voted on the same answers, and with their weight. An answer with
no text cannot train; counted too.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from sqlalchemy import Select, case, func, select
from sqlalchemy.orm import Session

from storage.models import (
    VERDICTS,
    AnswerVerdict,
    ModelVersion,
    Preference,
    Prompt,
    Response,
    now_utc,
)
from storage.repo import PreferencePair, insert_ignore, preference_pairs
from storage.rounds import RoundRule, answer_versions, newer
from storage.selection import VoteSelection
from storage.vote_rows import vote_rows

SOURCES = ("verdict", "vote")  # where a KTO row comes from


class RecordedVerdict(NamedTuple):
    """`record_verdict`'s result: the stored verdict and whether this call created it."""

    verdict: AnswerVerdict
    created: bool


@dataclass(frozen=True)
class VerdictCounts:
    """Verdicts by one annotator (`mine`, `up`, `down`) and by everyone."""

    mine: int
    up: int
    down: int
    everyone: int


@dataclass(frozen=True)
class KtoRow:
    """One answer with its label (True: desirable), with its provenance."""

    prompt: str
    completion: str
    label: bool
    annotator: str
    model_version: str | None  # None: a rewrite or an imported answer
    source: str  # one of SOURCES
    # the version whose answers it is on, for rounds (storage/rounds.py): a verdict's answer's,
    # a vote's (the newer of its two answers', also for its rewrite); None: imported answers
    round_version_id: int | None = None
    weight: float = 1.0  # train on newest: 0.5 per generation back; times a `self:` label's

    def trl(self) -> dict[str, Any]:
        """TRL's unpaired row, as `dpo_core`'s KTO reads it (with its weight unless 1)."""
        row = {"prompt": self.prompt, "completion": self.completion, "label": self.label}
        return row if self.weight == 1.0 else row | {"weight": self.weight}


@dataclass(frozen=True)
class KtoSet:
    """The KTO rows of the chosen votes, and what gave none."""

    rows: list[KtoRow]
    ties: int  # tie votes without a rewrite: no row
    empty: int  # answers with no text: no row
    left_out: int  # verdicts and votes not read: left-out annotators, AI judges unless included
    other_versions: int = 0  # rows train on parent leaves out: on other versions' answers

    @property
    def desirable(self) -> int:
        return sum(row.label for row in self.rows)


def record_verdict(
    session: Session,
    *,
    response_id: int,
    verdict: str,
    annotator: str,
    seconds_spent: float | None = None,
) -> RecordedVerdict:
    """Record a thumbs up (`up`) or down (`down`) on one stored answer; returns it and whether
    it is new. Idempotent: the same annotator judging the same answer again (double click,
    retry) leaves the first verdict as it is. ValueError for an unknown verdict, an empty
    annotator, a negative time or an answer that does not exist."""
    if verdict not in VERDICTS:
        raise ValueError(
            f"unknown verdict {verdict!r}; use up (a good answer) or down (a bad answer)"
        )
    annotator = annotator.strip()
    if not annotator:
        raise ValueError("the annotator name is empty")
    if seconds_spent is not None and not seconds_spent >= 0:
        raise ValueError(f"seconds_spent must be >= 0, got {seconds_spent}")
    prompt_id = session.scalar(select(Response.prompt_id).where(Response.id == response_id))
    if prompt_id is None:
        raise ValueError(f"no response with id {response_id}")
    key = {"annotator": annotator, "response_id": response_id}
    row = {
        **key,
        "prompt_id": prompt_id,
        "verdict": verdict,
        "seconds_spent": seconds_spent,
        "created_at": now_utc(),
    }
    created = insert_ignore(session, AnswerVerdict, [row], list(key)) == 1
    return RecordedVerdict(session.scalars(select(AnswerVerdict).filter_by(**key)).one(), created)


def verdict_counts(session: Session, annotator: str) -> VerdictCounts:
    """How many verdicts `annotator` gave (up and down) and everyone gave."""
    mine = AnswerVerdict.annotator == annotator.strip()
    up, down, everyone = session.execute(
        select(
            func.sum(case((mine & (AnswerVerdict.verdict == "up"), 1), else_=0)),
            func.sum(case((mine & (AnswerVerdict.verdict == "down"), 1), else_=0)),
            func.count(AnswerVerdict.id),
        )
    ).one()
    up, down = int(up or 0), int(down or 0)
    return VerdictCounts(mine=up + down, up=up, down=down, everyone=everyone)


def next_verdict_prompt(
    session: Session, annotator: str, *, split: str = "train", exclude: Collection[int] = ()
) -> Prompt | None:
    """The prompt to judge a single answer to next: the fewest verdicts and votes by
    `annotator` first, then the fewest overall (the pair queue's rule, `repo.next_prompt`,
    with verdicts counted as labels too). `exclude`: prompt ids to pass over (skipped)."""
    labels = (
        select(AnswerVerdict.prompt_id, AnswerVerdict.annotator)
        .union_all(select(Preference.prompt_id, Preference.annotator))
        .subquery()
    )
    mine = func.sum(case((labels.c.annotator == annotator.strip(), 1), else_=0))
    counts = (
        select(labels.c.prompt_id, mine.label("mine"), func.count().label("total"))
        .group_by(labels.c.prompt_id)
        .subquery()
    )
    query = (
        select(Prompt)
        .outerjoin(counts, counts.c.prompt_id == Prompt.id)
        .where(Prompt.split == split)
        .order_by(func.coalesce(counts.c.mine, 0), func.coalesce(counts.c.total, 0), Prompt.id)
        .limit(1)
    )
    if exclude:
        query = query.where(Prompt.id.not_in(list(exclude)))
    return session.scalars(query).first()


def kto_rows(
    session: Session, *, split: str | None = "train", selection: VoteSelection | None = None
) -> KtoSet:
    """Every verdict and vote of `split` (None: all) as KTO rows (see the module docstring):
    verdicts first, then votes, each oldest first. `selection`: whose votes are read (its
    `votes` mode does not apply: each vote counts on its own), and which rounds' rows train
    (`train_on`, as for pairs: storage/rounds.py; ValueError without the parent it needs)."""
    selection = selection or VoteSelection()
    rule = RoundRule.load(session, selection)
    every = replace(selection, votes="every", train_on="all", parent_id=None)
    pairs = preference_pairs(session, split=split, selection=every)
    rows, left_out = _verdict_rows(session, split, selection)
    on = answer_versions(session, [p.preference_id for p in pairs.pairs])
    rows += _pair_rows(pairs.pairs, on)
    rows += _both_bad_rows(session, split, selection)
    usable = [row for row in rows if row.completion.strip()]
    weighted = [(row, rule.weight(row.round_version_id)) for row in usable]
    return KtoSet(
        rows=[replace(row, weight=row.weight * w) for row, w in weighted if w is not None],
        ties=pairs.excluded_ties,
        empty=len(rows) - len(usable),
        left_out=left_out + pairs.left_out,  # both-bad votes not read are in pairs.left_out
        other_versions=sum(w is None for _, w in weighted),
    )


def _verdict_rows(
    session: Session, split: str | None, selection: VoteSelection
) -> tuple[list[KtoRow], int]:
    """The rows of the verdicts `selection` reads, and how many it does not."""
    query = (
        select(
            AnswerVerdict.annotator,
            AnswerVerdict.verdict,
            Prompt.text.label("prompt"),
            Response.text.label("completion"),
            ModelVersion.name.label("version"),
            Response.model_version_id,
        )
        .join(Prompt, Prompt.id == AnswerVerdict.prompt_id)
        .join(Response, Response.id == AnswerVerdict.response_id)
        .outerjoin(ModelVersion, ModelVersion.id == Response.model_version_id)
        .order_by(AnswerVerdict.id)
    )
    rows, left_out = [], 0
    for v in session.execute(_in_split(query, split)):
        if not selection.reads(v.annotator):
            left_out += 1
            continue
        label = v.verdict == "up"
        version_id = v.model_version_id
        row = KtoRow(v.prompt, v.completion, label, v.annotator, v.version, "verdict", version_id)
        rows.append(row)
    return rows, left_out


def _pair_rows(pairs: list[PreferencePair], versions: dict[int, int | None]) -> list[KtoRow]:
    """The answers of each vote's pairs (`PreferencePair`s of votes mode `every`), unpaired:
    each distinct chosen answer desirable, each distinct rejected one undesirable. `versions`:
    vote id -> the version it is on (`rounds.answer_versions`)."""
    rows: dict[tuple[int, str, bool], KtoRow] = {}
    for p in pairs:
        on = versions.get(p.preference_id)
        for text, version, label in (
            (p.chosen, p.chosen_model_version, True),
            (p.rejected, p.rejected_model_version, False),
        ):
            row = KtoRow(p.prompt, text, label, p.annotator, version, "vote", on, p.weight)
            rows.setdefault((p.preference_id, text, label), row)
    return list(rows.values())


def _both_bad_rows(session: Session, split: str | None, selection: VoteSelection) -> list[KtoRow]:
    """Both answers of each both-bad vote without a rewrite that `selection` reads,
    undesirable (a vote with a rewrite gave its rows through its pairs)."""
    votes = vote_rows(session, split, Preference.choice == "both_bad", Preference.rewrite.is_(None))
    return [
        KtoRow(
            prompt=v.prompt,
            completion=answer.text,
            label=False,
            annotator=v.annotator,
            model_version=answer.version,
            source="vote",
            round_version_id=newer(v.a.version_id, v.b.version_id),
        )
        for v in votes
        if selection.reads(v.annotator)
        for answer in (v.a, v.b)
    ]


def _in_split(query: Select, split: str | None) -> Select:
    return query if split is None else query.where(Prompt.split == split)
