"""Single-answer labeling: one answer streamed from the served version, judged thumbs up or down.

A verdict is a KTO vote (storage/verdicts.py): an answer a person finds good is desirable, a
bad one undesirable, with no second answer to read. The answer goes through the same engine
path as a pair (`ModelService.stream`, one `AnswerSpec` instead of two) and is stored with its
version, sampling parameters and seed once complete; a verdict refers to the stored answer, so
recording it twice (double click, retry) is one verdict. The answer's temperature is one of the
pair settings' two, drawn at random. The queue counts verdicts as labels: a person judging
single answers moves through the prompts as one voting on pairs does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from app.label.service import (
    MAX_NAME_CHARS,
    SEED_RANGE,
    LabelService,
    LabelSettings,
    PairAnswer,
    _answer,
    first_in_queue,
)
from app.serving.service import Waiting
from dpo_core.generation import AnswerSpec, GenerationUpdate
from storage import repo, verdicts
from storage.db import transaction
from storage.models import VERDICTS

logger = logging.getLogger(__name__)

ONE_ANSWER = "1"  # the Label tab's "Answers to judge" value for this mode
VERDICT_LABELS = {"up": "👍 Good", "down": "👎 Bad"}


@dataclass(frozen=True)
class SingleProgress:
    """One answer on its way: waiting in line, streaming, or done (stored, ready to judge)."""

    prompt_id: int
    prompt: str
    version: str
    answer: PairAnswer | None = None  # once generation starts
    waiting: int | None = None  # position in line while the model is busy
    notice: str | None = None
    done: bool = False
    ready_at: float | None = None  # time.time() when the answer was complete

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VerdictResult:
    verdict_id: int
    new: bool  # False: the same verdict was already recorded (double click, retry)
    counts: verdicts.VerdictCounts

    def to_dict(self) -> dict[str, Any]:
        """The `/verdict` endpoint's answer."""
        return {"verdict_id": self.verdict_id, "new": self.new, "progress": asdict(self.counts)}


class SingleAnswers:
    """The one-answer mode on a `LabelService`'s model, prompts, settings and random source."""

    def __init__(self, label: LabelService) -> None:
        self.label = label

    def progress(self, annotator: str) -> verdicts.VerdictCounts:
        with self.label.sm.begin() as s:
            return verdicts.verdict_counts(s, annotator)

    def pick_prompt(
        self,
        annotator: str,
        typed: str | None,
        skipped: Collection[int] = (),
        prompt_id: int | None = None,
    ) -> tuple[int, str]:
        """(prompt id, text): as `LabelService.pick_prompt`, with the queue counting verdicts."""
        if typed is not None or prompt_id is not None:
            return self.label.pick_prompt(annotator, typed, skipped, prompt_id)
        with transaction(self.label.sm, "The prompt") as s:
            prompt = first_in_queue(
                lambda passed: verdicts.next_verdict_prompt(s, annotator, exclude=passed),
                skipped,
            )
            return prompt.id, prompt.text

    def generate(
        self,
        annotator: str,
        typed: str | None = None,
        skipped: Collection[int] = (),
        settings: LabelSettings | None = None,
        prompt_id: int | None = None,
    ) -> Iterator[SingleProgress]:
        """Stream one answer for `annotator`; the last SingleProgress is done and stored.

        Raises ValueError (before anything is yielded) for an empty prompt, an empty queue or
        invalid settings; errors of the model come out of the iteration as ValueError too."""
        settings = settings or self.label.settings
        params = self.label.rng.choice(settings.params())
        self.label._note_events(annotator, skipped, prompt_id)
        prompt_id, prompt = self.pick_prompt(annotator, typed, skipped, prompt_id)
        version = self.label.models.active_version
        spec = AnswerSpec(params, self.label.rng.randrange(SEED_RANGE), adapter=version)
        stream = self.label.models.stream(prompt, [spec])
        return self._answers(stream, SingleProgress(prompt_id, prompt, version), spec)

    def _answers(
        self,
        stream: Iterator[Waiting | GenerationUpdate],
        progress: SingleProgress,
        spec: AnswerSpec,
    ) -> Iterator[SingleProgress]:
        yield progress
        for event in stream:
            if isinstance(event, Waiting):
                yield replace(progress, waiting=event.position)
                continue
            answer = _answer(spec, event.answers[0])
            progress = replace(progress, answer=answer, waiting=None, notice=event.notice)
            if event.done:
                progress = self._store(progress)
            yield progress

    def _store(self, progress: SingleProgress) -> SingleProgress:
        """Record the answer; it is then ready for a verdict."""
        answer = progress.answer
        assert answer is not None  # a done event carries the answer
        with transaction(self.label.sm, "The answer") as s:
            row = repo.record_response(
                s,
                prompt_id=progress.prompt_id,
                model_version_id=self.label._version_id(s, progress.version),
                text=answer.text,
                temperature=answer.temperature,
                top_p=answer.top_p,
                max_new_tokens=answer.max_new_tokens,
                seed=answer.seed,
                num_tokens=answer.num_tokens,
                latency_s=answer.latency_s,
            )
            stored = replace(answer, response_id=row.id)
        return replace(progress, answer=stored, done=True, ready_at=time.time())

    def verdict(
        self,
        annotator: str,
        response_id: int,
        verdict: str,
        *,
        seconds_spent: float | None = None,
    ) -> VerdictResult:
        """Record a thumbs up (`up`) or down (`down`) on a stored answer. Idempotent per
        annotator and answer. ValueError with a message for the person otherwise."""
        if verdict not in VERDICTS:
            raise ValueError(
                f"unknown verdict {verdict!r}; use up (a good answer) or down (a bad answer)"
            )
        if not annotator or not annotator.strip():
            raise ValueError("Type your name before voting: votes are recorded per annotator.")
        if len(annotator.strip()) > MAX_NAME_CHARS:
            raise ValueError(f"The name is too long: at most {MAX_NAME_CHARS} characters.")
        with transaction(self.label.sm, "Your verdict") as s:
            row, new = verdicts.record_verdict(
                s,
                response_id=int(response_id),
                verdict=verdict,
                annotator=annotator,
                seconds_spent=seconds_spent,
            )
            verdict_id = row.id
            counts = verdicts.verdict_counts(s, annotator)
        if not new:
            logger.info("verdict %d was already recorded (double click or retry)", verdict_id)
        return VerdictResult(verdict_id, new, counts)
