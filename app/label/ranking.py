"""The Label tab's ranking mode: 3 or 4 answers to one prompt, ordered best to worst.

The answers take the pair's path (`LabelService.generate` with k=3 or 4): the active
version, a random seed each, a random display order (A, B, C, D), and temperatures spread evenly
between the two Sampling temperatures (0.7, 0.85, 1.0 for three answers with the defaults), so
they differ by seed and temperature as a pair's do. They are stored once all are complete.

The order is given with keys: the answers' letters, best first. After k-1 letters the order is
complete (the answer left is the worst) and recorded at once: two keys for 3 answers, the same
as "pick the best, then the worst", and three keys for 4 answers, which order all six pairs
where best-then-worst would leave the middle two unordered (5 of 6 pairs).

A ranking is stored by `storage.rankings` as its k(k-1)/2 implied pairs (ordinary votes; that
module says why not a listwise loss). The time recorded runs from all answers complete to the
order complete, as a vote's runs from the pair complete to the vote; `python -m storage stats`
compares pairs per minute of the two screens.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from app.label.service import (
    LabelService,
    LabelSettings,
    PairProgress,
    Progress,
    check_name,
    check_rank_size,
)
from storage.db import transaction
from storage.rankings import record_ranking

logger = logging.getLogger(__name__)

RANK_MODES = {"3 (rank)": 3, "4 (rank)": 4}  # the Label tab's "Answers to judge" choices
LETTERS = "ABCD"


@dataclass(frozen=True)
class RankResult:
    """A recorded ranking: its id, whether new, the pairs it stored, the annotator's progress."""

    ranking_id: int
    new: bool  # False: these answers were already ranked by this annotator (retry)
    pairs: int
    progress: Progress

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def order_text(order: Sequence[int]) -> str:
    """Display indexes, best first, as letters: `B > A > C`."""
    return " > ".join(LETTERS[i] for i in order)


def complete_order(order: Sequence[int], k: int) -> list[int] | None:
    """The full order once k-1 answers are placed (the one left is the worst); else None."""
    if len(order) < k - 1:
        return None
    return [*order, *(i for i in range(k) if i not in order)][:k]


class RankingService:
    """Generates k answers and records their order; a thin layer over `LabelService`."""

    def __init__(self, label: LabelService) -> None:
        self.label = label

    def generate(
        self,
        annotator: str,
        k: int,
        *,
        typed: str | None = None,
        skipped: Collection[int] = (),
        settings: LabelSettings | None = None,
        prompt_id: int | None = None,
    ) -> Iterator[PairProgress]:
        """Stream k answers to `typed`, else the annotator's next queue prompt; the last
        progress is done and stored; skips and regenerations are noted as a pair's are.
        ValueError (before anything streams) for a k other than 3 or 4, an empty prompt or
        queue, or bad settings."""
        check_rank_size(int(k))
        return self.label.generate(
            annotator, int(k), typed=typed, skipped=skipped, settings=settings, prompt_id=prompt_id
        )

    def rank(
        self,
        annotator: str,
        response_ids: Sequence[int],
        *,
        seconds_spent: float | None = None,
        prompt_id: int | None = None,
    ) -> RankResult:
        """Record the order of the answers (ids best first). Idempotent per annotator and set
        of answers. ValueError for a bad name or order, WriteError when the database refuses."""
        check_name(annotator)
        with transaction(self.label.sm, "Your ranking") as s:
            recorded = record_ranking(
                s,
                response_ids=[int(rid) for rid in response_ids],
                annotator=annotator,
                seconds_spent=seconds_spent,
                prompt_id=prompt_id,
            )
        if not recorded.created:
            logger.info("ranking %d was already recorded (retry)", recorded.ranking_id)
        progress = self.label.progress(annotator)
        return RankResult(recorded.ranking_id, recorded.created, recorded.pairs, progress)
