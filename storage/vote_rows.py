"""A vote with both its answers and their versions: the one query that reads them.

Training pairs (`repo.preference_pairs`) and KTO's both-bad rows (`verdicts.kto_rows`) both
start from an A/B vote joined to its prompt, its two answers and the model version of each;
this module owns that join and hands back typed rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session, aliased

from storage.models import ModelVersion, Preference, Prompt, Response


@dataclass(frozen=True)
class VotedAnswer:
    """One answer a vote judged (or an annotator's rewrite)."""

    text: str
    version: str | None  # the model version's name; None: a rewrite or an imported answer
    version_id: int | None = None


@dataclass(frozen=True)
class VoteRow:
    """One A/B vote with its prompt text and both answers as shown (A, B)."""

    id: int
    response_a_id: int
    response_b_id: int
    prompt: str
    choice: str
    rewrite: str | None
    annotator: str
    a: VotedAnswer
    b: VotedAnswer
    weight: float = 1.0  # a version's own label's weight (storage/self_labels.py); else 1


def vote_rows(session: Session, split: str | None, *where: ColumnElement[bool]) -> list[VoteRow]:
    """Every vote of `split` (None: all) meeting the `where` conditions (on `Preference`'s
    columns), oldest first."""
    resp_a, resp_b = aliased(Response), aliased(Response)
    ver_a, ver_b = aliased(ModelVersion), aliased(ModelVersion)
    query = (
        select(
            Preference.id,
            Preference.response_a_id,
            Preference.response_b_id,
            Prompt.text.label("prompt"),
            Preference.choice,
            Preference.rewrite,
            Preference.annotator,
            resp_a.text.label("a_text"),
            ver_a.name.label("a_version"),
            resp_a.model_version_id.label("a_version_id"),
            resp_b.text.label("b_text"),
            ver_b.name.label("b_version"),
            resp_b.model_version_id.label("b_version_id"),
            Preference.weight,
        )
        .join(Prompt, Prompt.id == Preference.prompt_id)
        .join(resp_a, resp_a.id == Preference.response_a_id)
        .join(resp_b, resp_b.id == Preference.response_b_id)
        .outerjoin(ver_a, ver_a.id == resp_a.model_version_id)
        .outerjoin(ver_b, ver_b.id == resp_b.model_version_id)
        .where(*where)
        .order_by(Preference.id)
    )
    if split is not None:
        query = query.where(Prompt.split == split)
    return [
        VoteRow(
            id=row.id,
            response_a_id=row.response_a_id,
            response_b_id=row.response_b_id,
            prompt=row.prompt,
            choice=row.choice,
            rewrite=row.rewrite,
            annotator=row.annotator,
            a=VotedAnswer(row.a_text, row.a_version, row.a_version_id),
            b=VotedAnswer(row.b_text, row.b_version, row.b_version_id),
            weight=1.0 if row.weight is None else row.weight,
        )
        for row in session.execute(query)
    ]
