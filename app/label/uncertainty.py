"""Uncertainty first: a background scorer that finds the prompts where the served version is
least sure, so that the label queue can offer them first.

With the queue order "uncertain-first" (`storage.uncertainty`, set by an admin or
`--queue-order`), each time a labeler's next prompt is picked the scorer is woken, never waited
for. It takes the `window` least labeled prompts that the active version has no score for,
samples two answers to each through the shared decode loop at a priority below everyone's
prefetches (`SCORING`), and measures the version's margin between them
(`dpo_core.uncertainty`: the implicit-reward margin for an adapter version, the difference in
mean per-token log-prob for the base), holding the model for `batch` prompts at a time so the
labelers' decoding runs in between. Scores are stored per (version, prompt): a version switch
starts afresh, and until a prompt is scored the queue keeps its least-labeled order.
"""

from __future__ import annotations

import atexit
import logging
import random
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from app.serving.service import ModelService
from app.serving.versions import BASE
from dpo_core.engine import PREFETCH, Ticket
from dpo_core.generation import AnswerSpec, SamplingParams
from dpo_core.uncertainty import AnswerPair, pair_margins, same_answer
from storage.uncertainty import (
    UNCERTAIN_FIRST,
    Candidate,
    PromptScore,
    queue_order,
    record_scores,
    set_queue_order,
    unscored_window,
    version_scores,
)

logger = logging.getLogger(__name__)

SCORING = PREFETCH + 1  # behind every waiting request, prefetches included
SEED_RANGE = 2**31 - 1
JOIN_S = 5.0  # how long closing waits for a pass to notice it must stop
# Two samples that are the same text (`same_answer`): stored as sure, after every margin.
IDENTICAL, SURE_MARGIN = "identical", 1e9

VersionId = Callable[[Session, str], int]  # a version's name -> its database id

_LIVE: weakref.WeakSet[UncertaintyScorer] = weakref.WeakSet()


@atexit.register
def _close_live_scorers() -> None:
    """Stop scoring before the interpreter exits (a daemon thread killed inside a torch op
    aborts the process). Registered after the engine's own handler, so it runs before it."""
    for scorer in list(_LIVE):
        scorer.close()


@dataclass(frozen=True)
class ScorerSettings:
    """What is scored and how: `window` least labeled prompts; two answers each, sampled like
    the Label tab's (one temperature each) but shorter; `batch` prompts per model hold."""

    window: int = 32
    temperatures: tuple[float, float] = (0.7, 1.0)
    top_p: float = 0.95
    max_new_tokens: int = 128
    batch: int = 4

    def __post_init__(self) -> None:
        if self.window < 1 or self.batch < 1:
            raise ValueError(f"window and batch must be >= 1, got {self.window}, {self.batch}")
        for t in self.temperatures:
            SamplingParams(t, self.top_p, self.max_new_tokens)  # ValueError naming the field


class UncertaintyScorer:
    """Scores the label queue's next prompts for the active version, in its own thread.

    `version_id` maps a version name to its database id (the Label service's rule).
    `background=False` keeps the thread off: passes run only when `score_window` is called.
    """

    def __init__(
        self,
        sm: sessionmaker[Session],
        models: ModelService,
        version_id: VersionId,
        *,
        settings: ScorerSettings | None = None,
        rng: random.Random | None = None,
        background: bool = True,
    ) -> None:
        self.sm = sm
        self.models = models
        self.version_id = version_id
        self.settings = settings or ScorerSettings()
        self.rng = rng or random.Random()
        self.background = background
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tickets: set[Ticket] = set()
        self._lock = threading.Lock()
        self.passes = 0  # background passes finished (scored or failed)

    def queue_version(self, s: Session) -> int | None:
        """The id of the version whose scores order the queue now, or None when the order is
        least-labeled (or the served version is not in the database). Wakes the scorer;
        returns at once."""
        if queue_order(s) != UNCERTAIN_FIRST:
            return None
        try:
            version_id = self.version_id(s, self.models.active_version)
        except ValueError as err:  # never in a labeler's way: the default order then
            logger.warning("queue order least-labeled for now: %s", err)
            return None
        self.wake()
        return version_id

    def set_order(self, order: str) -> str:
        """Store the queue order for everyone (an admin's choice); a message saying what the
        queue now does. ValueError for an unknown order."""
        with self.sm.begin() as s:
            set_queue_order(s, order)
        if order == UNCERTAIN_FIRST:
            self.wake()
        return self.status()

    def status(self) -> str:
        """What the queue offers first, and how many prompts are scored for the served version."""
        version = self.models.active_version
        with self.sm.begin() as s:
            if queue_order(s) != UNCERTAIN_FIRST:
                return "The queue offers the prompts each annotator labeled least first."
            try:
                scored = len(version_scores(s, self.version_id(s, version)))
            except ValueError as err:  # served but not registered: see queue_version
                return f"Least sure first, but nothing is scored: {err}."
        return (
            f"Least sure first: {scored} prompt(s) scored for version {version} so far (in the "
            "background); among prompts labeled equally often, the least sure come first, "
            "unscored ones after them."
        )

    def wake(self) -> None:
        """Ask for a pass (started in the background; a pass under way is not interrupted)."""
        if not self.background or self._stop.is_set():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="uncertainty", daemon=True)
                _LIVE.add(self)
                self._thread.start()
        self._wake.set()

    def close(self) -> None:
        """Stop the thread: answers being sampled are cancelled, nothing half-scored is kept."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            tickets, thread = list(self._tickets), self._thread
        for ticket in tickets:
            ticket.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=JOIN_S)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                with self.sm.begin() as s:
                    wanted = queue_order(s) == UNCERTAIN_FIRST
                if wanted:
                    self.score_window()
            except Exception:  # a bug or a database fault: the queue keeps its order
                logger.exception("uncertainty scoring failed; the queue stays least-labeled")
            self.passes += 1

    def score_window(self) -> int:
        """One pass: score the window's unscored prompts for the active version, `batch` at a
        time. Stops early when the active version changes. Returns how many scores were
        stored."""
        version = self.models.active_version
        with self.sm.begin() as s:
            version_id = self.version_id(s, version)
            todo = unscored_window(s, version_id, self.settings.window)
        stored = 0
        for start in range(0, len(todo), self.settings.batch):
            if self._stop.is_set() or self.models.active_version != version:
                break
            scores = self._score(todo[start : start + self.settings.batch], version)
            with self.sm.begin() as s:
                stored += record_scores(s, version_id, scores)
        logger.info("scored %d prompt(s) for version %s", stored, version)
        return stored

    def _score(self, chunk: list[Candidate], version: str) -> list[PromptScore]:
        answered = self._sample(chunk, version)
        if not answered or self._stop.is_set():
            return []
        same = [(c, pair) for c, pair in answered if same_answer(pair)]
        differ = [(c, pair) for c, pair in answered if not same_answer(pair)]
        scores = [PromptScore(c.prompt_id, SURE_MARGIN, IDENTICAL) for c, _ in same]
        if differ:
            versions = self.models.versions
            adapter = None if version == BASE else version
            with versions.lock:
                margins = pair_margins(versions.lm, [pair for _, pair in differ], adapter)
            scores += [
                PromptScore(c.prompt_id, margin, margins.measure)
                for (c, _), margin in zip(differ, margins.values, strict=True)
            ]
        return scores

    def _sample(self, chunk: list[Candidate], version: str) -> list[tuple[Candidate, AnswerPair]]:
        """Two answers per prompt from `version`, all submitted at once at `SCORING` priority.
        A prompt whose answers fail is left unscored (logged)."""
        s = self.settings
        submitted = []
        for candidate in chunk:
            if self._stop.is_set():
                break
            specs = [
                AnswerSpec(
                    SamplingParams(t, s.top_p, s.max_new_tokens),
                    self.rng.randrange(SEED_RANGE),
                    adapter=version,
                )
                for t in s.temperatures
            ]
            try:
                ticket = self.models.submit(candidate.text, specs, priority=SCORING)
            except ValueError as err:
                logger.info("prompt %d not scored: %s", candidate.prompt_id, err)
                continue
            with self._lock:
                self._tickets.add(ticket)
            submitted.append((candidate, ticket))
        return [answered for answered in map(self._answers, submitted) if answered is not None]

    def _answers(self, item: tuple[Candidate, Ticket]) -> tuple[Candidate, AnswerPair] | None:
        candidate, ticket = item
        try:
            texts = ticket.result().texts
        except ValueError as err:  # cancelled (closing), or the version failed to answer
            logger.info("prompt %d not scored: %s", candidate.prompt_id, err)
            return None
        finally:
            with self._lock:
                self._tickets.discard(ticket)
        return candidate, AnswerPair(candidate.text, texts[0], texts[1])
