"""The preference store's tables: SQLAlchemy 2 typed models.

Constraints carry the rules, so a bad state cannot be written by any caller:
foreign keys, enums as CHECK constraints, a prompt's text unique by hash, one vote per
(annotator, response pair), at most one active version per base model, and at most one live
(queued or running) training run.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 4  # storage/db.py MIGRATIONS upgrades older databases in place

SPLITS = ("train", "heldout")
VERSION_KINDS = ("base", "adapter")
CHOICES = ("a", "b", "tie", "both_bad")
LABEL_EVENTS = ("skip", "regenerate")
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
LIVE_RUN_STATUSES = ("queued", "running")
WINNERS = ("left", "right", "tie")


def now_utc() -> datetime:
    return datetime.now(UTC)


def text_hash(value: str) -> str:
    """SHA-256 hex digest of the text: the deduplication key of prompts and imported answers."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every back end (SQLite stores them naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _enum(values: tuple[str, ...], name: str) -> Enum:
    """A string column limited to `values` by a CHECK constraint (portable, no native enum)."""
    return Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def _partial_unique(name: str, *columns: Any, where: str) -> Index:
    """A unique index over the rows that match `where` (same SQL on SQLite and PostgreSQL)."""
    return Index(
        name, *columns, unique=True, sqlite_where=text(where), postgresql_where=text(where)
    )


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class SchemaInfo(Base):
    """One row: the schema version this database was written with."""

    __tablename__ = "schema_info"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=now_utc)


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (CheckConstraint("length(text) > 0", name="text_not_empty"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    text_hash: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(200), default="")
    split: Mapped[str] = mapped_column(_enum(SPLITS, "prompt_split"), default="train")
    created_at: Mapped[datetime] = mapped_column(default=now_utc)


class ModelVersion(Base):
    """`base` or an immutable adapter directory (`v1`, `v2`, ...) on top of one base model."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("base_model", "name"),
        CheckConstraint(
            "(kind = 'base') = (adapter_path IS NULL)", name="adapter_path_iff_adapter"
        ),
        # At most one active version per base model.
        _partial_unique("uq_model_versions_one_active", "base_model", where="is_active"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    base_model: Mapped[str] = mapped_column(String(500))
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(_enum(VERSION_KINDS, "version_kind"))
    adapter_path: Mapped[str | None] = mapped_column(Text)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    # The run that produced this adapter (its run's output version). use_alter: the two
    # tables refer to each other.
    training_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("training_runs.id", use_alter=True), unique=True
    )
    is_active: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=now_utc)

    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])


class Response(Base):
    """One answer to one prompt. `model_version_id` is NULL for imported answers."""

    __tablename__ = "responses"
    __table_args__ = (
        CheckConstraint("temperature >= 0", name="temperature_non_negative"),
        CheckConstraint("top_p > 0 AND top_p <= 1", name="top_p_range"),
        CheckConstraint("num_tokens >= 0", name="num_tokens_non_negative"),
        CheckConstraint("latency_s >= 0", name="latency_non_negative"),
        # An imported answer (no model version) is stored once per prompt.
        _partial_unique(
            "uq_responses_imported_text", "prompt_id", "text_hash", where="model_version_id IS NULL"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    text: Mapped[str] = mapped_column(Text)
    text_hash: Mapped[str] = mapped_column(String(64))
    temperature: Mapped[float | None]
    top_p: Mapped[float | None]
    max_new_tokens: Mapped[int | None]
    seed: Mapped[int | None]
    num_tokens: Mapped[int | None]
    latency_s: Mapped[float | None]
    created_at: Mapped[datetime] = mapped_column(default=now_utc)

    prompt: Mapped[Prompt] = relationship()
    model_version: Mapped[ModelVersion | None] = relationship()


class Preference(Base):
    """One annotator's vote on two answers to one prompt: a person's, or a model's (an AI
    judge's, a version's own label: storage/annotators.py). The same vote twice is one row."""

    __tablename__ = "preferences"
    __table_args__ = (
        UniqueConstraint("annotator", "response_a_id", "response_b_id"),
        CheckConstraint("response_a_id <> response_b_id", name="two_different_responses"),
        CheckConstraint("length(annotator) > 0", name="annotator_not_empty"),
        CheckConstraint("seconds_spent >= 0", name="seconds_spent_non_negative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    response_a_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    response_b_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    choice: Mapped[str] = mapped_column(_enum(CHOICES, "preference_choice"))
    rewrite: Mapped[str | None] = mapped_column(Text)
    annotator: Mapped[str] = mapped_column(String(200), index=True)
    seconds_spent: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=now_utc)
    # Schema 2. The answer shown on the left (A), for position bias; NULL for imported votes.
    left_response_id: Mapped[int | None]  # response_a_id or response_b_id (no FK: a plain copy)
    # An AI judge's suggestion, stored like `choice` (in stored order); NULL when none was shown.
    suggested_choice: Mapped[str | None] = mapped_column(String(10))
    suggested_by: Mapped[str | None] = mapped_column(String(200))
    # Schema 3. The ranking this vote is one implied pair of (storage/rankings.py); NULL for a
    # vote cast on two answers. No FK: older databases gain it by ALTER TABLE, before the
    # rankings table exists.
    ranking_id: Mapped[int | None]
    # Schema 4. A version's label of its own answers (`self:<version>`, storage/self_labels.py):
    # how much the pair weighs in the loss, the scorer that chose, and its margin. NULL for a
    # person's or a judge's vote (weight 1).
    weight: Mapped[float | None] = mapped_column(
        Float, CheckConstraint("weight > 0", name="weight_positive")
    )
    scorer: Mapped[str | None] = mapped_column(String(64))
    margin: Mapped[float | None] = mapped_column(Float)

    prompt: Mapped[Prompt] = relationship()
    response_a: Mapped[Response] = relationship(foreign_keys=[response_a_id])
    response_b: Mapped[Response] = relationship(foreign_keys=[response_b_id])


class TrainingRun(Base):
    __tablename__ = "training_runs"
    __table_args__ = (
        CheckConstraint("num_pairs >= 0", name="num_pairs_non_negative"),
        # At most one live run: a second Train click cannot queue a second job.
        _partial_unique(
            "uq_training_runs_one_live", text("(1)"), where="status IN ('queued', 'running')"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(_enum(RUN_STATUSES, "run_status"), default="queued")
    base_model: Mapped[str] = mapped_column(String(500))
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    num_pairs: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=now_utc)
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)


class RunMetric(Base):
    """One scalar of one training step, named as TRL names it (`loss`, `rewards/margins`, ...).

    `value` is NULL where the step produced NaN or infinity.
    """

    __tablename__ = "run_metrics"
    __table_args__ = (UniqueConstraint("run_id", "step", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id"))
    step: Mapped[int]
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float | None] = mapped_column(Float)


class ComparisonVote(Base):
    """A blind vote between two versions' answers to one prompt, shown in random order."""

    __tablename__ = "comparison_votes"
    __table_args__ = (
        UniqueConstraint("annotator", "response_left_id", "response_right_id"),
        CheckConstraint("response_left_id <> response_right_id", name="two_different_responses"),
        CheckConstraint("length(annotator) > 0", name="annotator_not_empty"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    response_left_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    response_right_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    winner: Mapped[str] = mapped_column(_enum(WINNERS, "comparison_winner"))
    annotator: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=now_utc)

    response_left: Mapped[Response] = relationship(foreign_keys=[response_left_id])
    response_right: Mapped[Response] = relationship(foreign_keys=[response_right_id])


class Setting(Base):
    """A team-wide setting an admin changes at run time (shared by every app replica)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=now_utc)


class PairClaim(Base):
    """An annotator was handed a pair that others judged (overlap), and has not voted yet:
    it counts as a pending vote so the pair is not handed to more than k people."""

    __tablename__ = "pair_claims"
    __table_args__ = (UniqueConstraint("response_a_id", "response_b_id", "annotator"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    response_a_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))  # the lower id
    response_b_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    annotator: Mapped[str] = mapped_column(String(200))
    claimed_at: Mapped[datetime] = mapped_column(default=now_utc)


class SignInSession(Base):
    """A signed-in browser, shared by every app replica: the token itself never touches the
    database, only its SHA-256. `user_stamp` fingerprints the user's password hash, so a changed
    password or a removed-and-re-added user ends the sessions made before."""

    __tablename__ = "sign_in_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    user_stamp: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=now_utc)
    last_seen_at: Mapped[datetime] = mapped_column(default=now_utc)


class LoginFailure(Base):
    """Failed sign-ins per key (`ip:<address>` or `user:<name>`), counted across replicas."""

    __tablename__ = "login_failures"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    count: Mapped[int]
    last_at: Mapped[datetime]


class SignInCookie(Base):
    """One row: the name suffix of the sign-in cookie, the same on every replica (Gradio draws
    a random one per process, which would sign a user out when the proxy switches replica)."""

    __tablename__ = "sign_in_cookie"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    cookie_id: Mapped[str] = mapped_column(String(64))


class LabelEvent(Base):
    """Something an annotator did besides voting: skipped a prompt, or asked for new answers
    (regenerate). Counted per annotator in the agreement view."""

    __tablename__ = "label_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    annotator: Mapped[str] = mapped_column(String(200), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    kind: Mapped[str] = mapped_column(String(20))  # LABEL_EVENTS
    created_at: Mapped[datetime] = mapped_column(default=now_utc)


class Ranking(Base):
    """One person's order of 3 or 4 answers to one prompt, best first. Its k(k-1)/2 implied
    pairs are stored as ordinary votes (`Preference.ranking_id`); see storage/rankings.py."""

    __tablename__ = "rankings"
    __table_args__ = (
        # The same answers ranked twice by one person (double click, retry) are one ranking.
        UniqueConstraint("annotator", "answers_key"),
        CheckConstraint("length(annotator) > 0", name="annotator_not_empty"),
        CheckConstraint("seconds_spent >= 0", name="seconds_spent_non_negative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    annotator: Mapped[str] = mapped_column(String(200), index=True)
    response_ids: Mapped[list[int]] = mapped_column(JSON)  # best first
    answers_key: Mapped[str] = mapped_column(String(100))  # the ids sorted, "12,13,15"
    seconds_spent: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=now_utc)


VERDICTS = ("up", "down")  # a thumbs up (desirable) or down (undesirable) on one answer


class AnswerVerdict(Base):
    """One person's thumbs up or down on a single answer (the Label tab's one-answer mode): a
    KTO vote (storage/verdicts.py). The same verdict twice is one row; the first one stands."""

    __tablename__ = "answer_verdicts"
    __table_args__ = (
        UniqueConstraint("annotator", "response_id"),
        CheckConstraint("length(annotator) > 0", name="annotator_not_empty"),
        CheckConstraint("seconds_spent >= 0", name="seconds_spent_non_negative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    annotator: Mapped[str] = mapped_column(String(200), index=True)
    verdict: Mapped[str] = mapped_column(_enum(VERDICTS, "answer_verdict"))
    seconds_spent: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=now_utc)

    response: Mapped[Response] = relationship()


class UncertaintyScore(Base):
    """How sure one model version is between two of its own answers to a prompt
    (`dpo_core.uncertainty`): `margin` >= 0, small = unsure. The label queue's "uncertain first"
    order offers the least sure prompts first. Keyed by version: scores of a version that is no
    longer served are left behind, unused."""

    __tablename__ = "uncertainty_scores"
    __table_args__ = (
        UniqueConstraint("model_version_id", "prompt_id"),
        CheckConstraint("margin >= 0", name="margin_non_negative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    margin: Mapped[float] = mapped_column(Float)
    measure: Mapped[str] = mapped_column(String(20))  # dpo_core.uncertainty's measure name
    scored_at: Mapped[datetime] = mapped_column(default=now_utc)
