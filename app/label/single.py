"""Single-answer labeling: one answer streamed from the served version, judged thumbs up or down.

A verdict is a KTO vote (storage/verdicts.py): an answer a person finds good is desirable, a
bad one undesirable, with no second answer to read. The answer goes through the pair's path
(`LabelService.generate` with k=1: one `AnswerSpec` instead of two) and is stored with its
version, sampling parameters and seed once complete; a verdict refers to the stored answer, so
recording it twice (double click, retry) is one verdict. The answer's temperature is one of the
pair settings' two, drawn at random. The queue counts verdicts as labels: a person judging
single answers moves through the prompts as one voting on pairs does.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from app.label.service import ONE, LabelService, LabelSettings, PairAnswer, PairProgress, check_name
from storage import verdicts
from storage.db import transaction
from storage.models import VERDICTS

logger = logging.getLogger(__name__)

ONE_ANSWER = "1"  # the Label tab's "Answers to judge" value for this mode
VERDICT_LABELS = {"up": "👍 Good", "down": "👎 Bad"}


@dataclass(frozen=True)
class SingleProgress:
    """One answer on its way: waiting in line, streaming, or done (stored, ready to judge).
    The `/generate_answer` endpoint's payload: `LabelService.generate`'s progress, one answer."""

    prompt_id: int
    prompt: str
    version: str
    answer: PairAnswer | None = None  # once generation starts
    waiting: int | None = None  # position in line while the model is busy
    notice: str | None = None
    done: bool = False
    ready_at: float | None = None  # time.time() when the answer was complete

    @classmethod
    def of(cls, progress: PairProgress) -> SingleProgress:
        answer = progress.answers[0] if progress.answers else None
        return cls(
            progress.prompt_id,
            progress.prompt,
            progress.version,
            answer,
            progress.waiting,
            progress.notice,
            progress.done,
            progress.ready_at,
        )

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
    """The one-answer mode on a `LabelService`: its answers take the service's one path
    (`generate` with k=1); this records and counts verdicts."""

    def __init__(self, label: LabelService) -> None:
        self.label = label

    def progress(self, annotator: str) -> verdicts.VerdictCounts:
        with self.label.sm.begin() as s:
            return verdicts.verdict_counts(s, annotator)

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
        answers = self.label.generate(
            annotator, ONE, typed=typed, skipped=skipped, settings=settings, prompt_id=prompt_id
        )
        return (SingleProgress.of(progress) for progress in answers)

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
        check_name(annotator)
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
