"""Who is a person: the one rule that tells people's votes from models' votes.

An annotator named with a model prefix is a model, not a person:
- `judge:<name>`: an AI judge (dpo_core/judge.py) labeling a pair it was given;
- `self:<version>`: a model version labeling pairs of its own answers (storage/self_labels.py).

A model's vote is never counted as a person's: not in agreement statistics, not towards an
overlap's k, not in people's labeling rates; it trains only when chosen
(`VoteSelection.include_judges` / `include_self`). Every query that tells them apart asks here.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_
from sqlalchemy.orm import InstrumentedAttribute

JUDGE_PREFIX = "judge:"  # an AI judge's votes: `judge:<name>`
SELF_PREFIX = "self:"  # a version's labels of its own answers: `self:<version>`
MODEL_PREFIXES = (JUDGE_PREFIX, SELF_PREFIX)


def is_person(annotator: str) -> bool:
    """Whether `annotator` names a person (or an import), not a model."""
    return not annotator.startswith(MODEL_PREFIXES)


def is_judge(annotator: str) -> bool:
    return annotator.startswith(JUDGE_PREFIX)


def is_self(annotator: str) -> bool:
    return annotator.startswith(SELF_PREFIX)


def self_annotator(version: str) -> str:
    """The annotator name of `version`'s labels of its own answers: `self:v2`."""
    return f"{SELF_PREFIX}{version}"


def person_filter(column: InstrumentedAttribute[str] | ColumnElement[str]) -> ColumnElement[bool]:
    """SQL: the annotator `column` names a person (the SQL form of `is_person`)."""
    return and_(*(~column.startswith(prefix) for prefix in MODEL_PREFIXES))
