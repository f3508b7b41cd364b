"""What a verdict records in each mode of the Label tab: a vote on a pair, a verdict on one
answer, an order of 3 or 4. The tab's one record handler (`LabelHandlers.record`) calls
`Recorder.record` and turns its `Recorded` (or its error) into the page's updates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.label.modes import PAIR, SINGLE, Mode
from app.label.ranking import RankingService, order_text
from app.label.service import CHOICES, LabelService
from app.label.single import VERDICT_LABELS, SingleAnswers
from app.label.texts import format_progress, verdicts_text


@dataclass(frozen=True)
class Recorded:
    """A verdict stored, in the words the page shows."""

    new: bool  # False: already recorded (a double click, a retry)
    said: str  # what was recorded: "A is better", "👎 Bad", "C > A > B (3 pairs)"
    progress: str  # the progress line afterwards (Markdown)
    order: str | None = None  # a ranking's order line afterwards


@dataclass
class Recorder:
    """The three recording services of the Label tab, on one `LabelService`."""

    label: LabelService

    def __post_init__(self) -> None:
        self.single = SingleAnswers(self.label)
        self.ranking = RankingService(self.label)

    def progress_text(self, annotator: str, mode: Mode) -> str:
        """The progress line: votes (a ranking counts its pairs), and verdicts with 1 answer."""
        pairs = format_progress(self.label.progress(annotator))
        if mode.buttons != SINGLE:
            return pairs
        return f"{pairs}  \n{verdicts_text(self.single.progress(annotator))}"

    def record(
        self,
        mode: Mode,
        annotator: str,
        shown: dict[str, Any],
        key: str,
        *,
        order: Sequence[int] = (),
        rewrite: str | None = None,
        seconds_spent: float | None = None,
    ) -> Recorded:
        """Record the verdict on the answers `shown` (a `PairProgress.to_dict()`): the button's
        `key` (a pair's choice; up or down for one answer) or, for a ranking, the complete
        `order` (display indexes, best first). ValueError or StorageError with a message for
        the person."""
        ids = [answer["response_id"] for answer in shown["answers"]]
        if mode.buttons == SINGLE:
            result = self.single.verdict(annotator, ids[0], key, seconds_spent=seconds_spent)
            said = VERDICT_LABELS[key]
            return Recorded(result.new, said, self.progress_text(annotator, mode))
        if mode.buttons == PAIR:
            vote = self.label.vote(
                annotator, *ids, key, rewrite=rewrite, seconds_spent=seconds_spent
            )
            return Recorded(vote.new, CHOICES[key], format_progress(vote.progress))
        ranked = self.ranking.rank(
            annotator,
            [ids[i] for i in order],
            seconds_spent=seconds_spent,
            prompt_id=shown["prompt_id"],
        )
        said = f"{order_text(order)} ({ranked.pairs} pairs)"
        last = f"Last order: **{order_text(order)}**"
        return Recorded(ranked.new, said, format_progress(ranked.progress), last)
