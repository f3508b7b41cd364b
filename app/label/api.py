"""The Label tab's named endpoints for scripts and tests (`gradio_client`), one registration
for every mode: `/generate_pair`, `/vote`, `/label_progress` (pairs), `/generate_answer`,
`/verdict` (one answer, thumbs up or down), `/generate_answers`, `/rank` (3 or 4 answers
ordered). With sign-in on, the signed-in user is the annotator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import gradio as gr

from app.auth.users import annotator_name
from app.label.handlers import user_errors
from app.label.ranking import RankingService
from app.label.service import LabelService
from app.label.single import SingleAnswers
from storage.db import StorageError


class Streamed(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def streamed(start: Callable[[], Iterator[Streamed]]) -> Iterator[dict[str, Any]]:
    """The progress `start()` streams, as dicts; a user error is raised as `gr.Error`."""
    for progress in user_errors(start):
        if isinstance(progress, ValueError | StorageError):
            raise gr.Error(str(progress))
        yield progress.to_dict()


def recorded(record: Callable[[], Streamed]) -> dict[str, Any]:
    """What `record()` stored, as a dict; a user error is raised as `gr.Error`."""
    try:
        return record().to_dict()
    except (ValueError, StorageError) as err:
        raise gr.Error(str(err)) from err


@dataclass
class LabelApi:
    """The endpoints, named after their methods."""

    service: LabelService
    single: SingleAnswers = field(init=False)
    ranking: RankingService = field(init=False)

    def __post_init__(self) -> None:
        self.single = SingleAnswers(self.service)
        self.ranking = RankingService(self.service)

    def generate_pair(
        self,
        prompt: str | None = None,
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[dict[str, Any]]:
        """Two answers to `prompt` (None: the next prompt from the queue), streamed; the last
        value holds the stored response ids, in display order (A, B)."""
        name = annotator_name(request, annotator)
        yield from streamed(lambda: self.service.generate_pair(name, typed=prompt))

    def vote(
        self,
        response_a_id: int,
        response_b_id: int,
        choice: str,
        annotator: str = "",
        rewrite: str = "",
        seconds_spent: float | None = None,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Record a vote (choice: a, b, tie, both_bad); the same vote twice is one vote."""
        name = annotator_name(request, annotator)
        return recorded(
            lambda: self.service.vote(
                name,
                response_a_id,
                response_b_id,
                choice,
                rewrite=rewrite or None,
                seconds_spent=seconds_spent,
            )
        )

    def label_progress(
        self,
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Pairs labeled by the annotator and by everyone, usable pairs, per-choice counts."""
        return self.service.progress(annotator_name(request, annotator)).to_dict()

    def generate_answer(
        self,
        prompt: str | None = None,
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[dict[str, Any]]:
        """One answer to `prompt` (None: the next prompt from the queue), streamed; the last
        value holds the stored response id (`answer.response_id`)."""
        name = annotator_name(request, annotator)
        yield from streamed(lambda: self.single.generate(name, typed=prompt))

    def verdict(
        self,
        response_id: int,
        verdict: str,
        annotator: str = "",
        seconds_spent: float | None = None,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Record a verdict (up: a good answer, down: a bad one) on a stored answer; the same
        verdict twice is one verdict."""
        name = annotator_name(request, annotator)
        return recorded(
            lambda: self.single.verdict(name, response_id, verdict, seconds_spent=seconds_spent)
        )

    def generate_answers(
        self,
        prompt: str | None = None,
        k: int = 3,
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[dict[str, Any]]:
        """k (3 or 4) answers to `prompt` (None: the next prompt from the queue), streamed; the
        last value holds the stored response ids, in display order (A, B, C, D)."""
        name = annotator_name(request, annotator)
        yield from streamed(lambda: self.ranking.generate(name, k, typed=prompt))

    def rank(
        self,
        response_ids: list[int],
        annotator: str = "",
        seconds_spent: float | None = None,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Record an order of 3 or 4 answers to one prompt, best first (response ids); stored
        as its implied pairs. The same answers ranked twice by one person are one ranking."""
        name = annotator_name(request, annotator)
        return recorded(lambda: self.ranking.rank(name, response_ids, seconds_spent=seconds_spent))


def register_api(service: LabelService) -> None:
    """Register `LabelApi`'s endpoints under their method names."""
    api = LabelApi(service)
    # Generation streams through the model service's own queue, which shows the position.
    for generate in (api.generate_pair, api.generate_answer, api.generate_answers):
        gr.api(generate, api_name=generate.__name__, concurrency_limit=None)
    # Votes and progress are short database transactions (~9 ms). API clients still reach them
    # through Gradio's queue and event stream (queue=False only changes the browser's path):
    # p99 177 ms at 16 annotators in bench/load.py. Scripts that need a fast vote use the plain
    # `POST /api/vote` route instead (app/label/route.py: p99 28.5 ms in the same benchmark).
    for record in (api.vote, api.label_progress, api.verdict, api.rank):
        gr.api(record, api_name=record.__name__, queue=False)
