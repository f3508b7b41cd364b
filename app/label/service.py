"""Labeling: pick a prompt, stream k answers from the served version, record them and the vote.

The service owns the rules; the Label tab (`app.label.tab`) and the API endpoints
(`app.label.api`) are thin wrappers around it. One path (`LabelService.generate`) writes k
answers: one judged alone (`app.label.single` records its verdict), a pair voted on (here), or
3-4 ranked (`app.label.ranking` records the order). Each answer gets its own temperature and a
random seed; which one appears as A is random. The answers are stored (with version, sampling
parameters, seed, token count and latency) once all are complete; a vote refers to the stored
responses, so recording it twice (double click, retry) is one vote.

Prefetch: once a pair is complete, the annotator's next pair (the next prompt of their queue,
the active version, the same settings) starts generating at a lower priority than anyone's
waiting request, so after the vote it is there at once. A prefetched pair is stored only when
it is shown; it is dropped when the active version changes, when the settings change, when its
prompt was skipped, or after `PREFETCH_TTL_S` (an annotator who left).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.label.team import SharedPair, SuggestionBook, next_shared
from app.label.uncertainty import UncertaintyScorer
from app.serving.service import ModelService, Waiting
from dpo_core.engine import PREFETCH, Ticket
from dpo_core.generation import AnswerSpec, GenerationUpdate, SamplingParams
from dpo_core.judge import Judge, Suggestion
from storage import repo, runs, verdicts
from storage.agreement import record_label_event
from storage.annotators import is_person
from storage.db import transaction
from storage.models import Prompt, Response
from storage.overlap import JUDGE_PREFIX
from storage.rankings import MAX_ANSWERS, MIN_ANSWERS
from storage.self_labels import next_unjudged_self_label
from storage.uncertainty import set_queue_order

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent
DEFAULT_PROMPTS = APP_DIR / "default_prompts.txt"
DEFAULT_GUIDELINES = APP_DIR / "guidelines.md"
CHOICES = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both bad"}
SEED_RANGE = 2**31 - 1
MAX_NAME_CHARS = 200  # storage's annotator column
MAX_JUDGE_BATCH = 200  # pairs the judge labels per click
PREFETCH_TTL_S = 600.0  # a next pair nobody asked for within this long is dropped
ONE, PAIR = 1, 2  # answers per prompt: one judged 👍/👎, a pair voted on; 3-4 are ranked
# How the status line and storage's messages name k answers.
ANSWERS_NAMED = {1: "one answer", 2: "two answers", 3: "three answers", 4: "four answers"}


@dataclass(frozen=True)
class LabelSettings:
    """Sampling for the two answers: one temperature each (diverse pairs teach DPO more)."""

    temperatures: tuple[float, float] = (0.7, 1.0)
    top_p: float = 0.95
    max_new_tokens: int = 256

    def params(self) -> list[SamplingParams]:
        """Validated SamplingParams for the two answers (ValueError with the field's name)."""
        return [SamplingParams(t, self.top_p, int(self.max_new_tokens)) for t in self.temperatures]


def check_rank_size(k: int) -> None:
    """ValueError unless k answers can be ranked (3 or 4)."""
    if not MIN_ANSWERS <= k <= MAX_ANSWERS:
        raise ValueError(f"rank {MIN_ANSWERS} or {MAX_ANSWERS} answers, not {k}")


def rank_settings(settings: LabelSettings, k: int) -> LabelSettings:
    """`settings` with k temperatures spread evenly from the first to the last (a ranking's
    answers differ by seed and temperature as a pair's do: 0.7, 0.85, 1.0 for three)."""
    check_rank_size(k)
    low, high = settings.temperatures[0], settings.temperatures[-1]
    spread = tuple(round(low + (high - low) * i / (k - 1), 4) for i in range(k))
    return replace(settings, temperatures=spread)


def answer_params(settings: LabelSettings, k: int, rng: random.Random) -> list[SamplingParams]:
    """Validated sampling for k answers: one of the two temperatures drawn at random for one
    answer, both for a pair, spread between them for a ranking (ValueError otherwise)."""
    if k == ONE:
        return [rng.choice(settings.params())]
    if k == PAIR:
        return settings.params()
    return rank_settings(settings, k).params()


@dataclass(frozen=True)
class PairAnswer:
    """One answer as shown (A or B); `response_id` is set once the pair is stored."""

    text: str
    num_tokens: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    finished: bool = False
    latency_s: float | None = None
    response_id: int | None = None


@dataclass(frozen=True)
class PairProgress:
    """A pair on its way: waiting in line, streaming, or done (stored, ready for a vote)."""

    prompt_id: int
    prompt: str
    version: str
    answers: tuple[PairAnswer, ...] = ()  # (A, B) in display order, once generation starts
    waiting: int | None = None  # position in line while the model is busy
    notice: str | None = None
    done: bool = False
    ready_at: float | None = None  # time.time() when both answers were complete
    suggestion: Suggestion | None = None  # an AI judge's, once the pair is complete
    shared: str | None = None  # "judged by 1 of 3": a pair others judged (overlap)
    checking: str | None = None  # the version whose own label this pair is (check mode)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Progress:
    mine: int
    everyone: int
    usable_pairs: int
    by_choice: dict[str, int] = field(default_factory=dict)
    prompts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VoteResult:
    preference_id: int
    new: bool  # False: the same vote was already recorded (double click, retry)
    progress: Progress

    def to_dict(self) -> dict[str, Any]:
        """The vote endpoints' answer (Gradio's `/vote` and `POST /api/vote`)."""
        progress = self.progress.to_dict()
        return {"preference_id": self.preference_id, "new": self.new, "progress": progress}


@dataclass
class _Prefetch:
    """An annotator's next pair, generating (or done) before they asked for it."""

    pair: PairProgress
    specs: list[AnswerSpec]
    settings: LabelSettings
    ticket: Ticket
    started: float  # time.monotonic()

    def usable(self, version: str, settings: LabelSettings, skipped: Collection[int]) -> bool:
        fresh = time.monotonic() - self.started < PREFETCH_TTL_S
        same = self.pair.version == version and self.settings == settings
        return fresh and same and self.pair.prompt_id not in skipped


class LabelService:
    def __init__(
        self,
        sm: sessionmaker[Session],
        models: ModelService,
        base_model: str,
        *,
        settings: LabelSettings | None = None,
        guidelines_path: Path | None = None,
        rng: random.Random | None = None,
        prefetch: bool = True,
        judge: Judge | None = None,
    ) -> None:
        self.sm = sm
        self.suggestions = SuggestionBook(judge)
        self.models = models
        self.base_model = base_model
        self.settings = settings or LabelSettings()
        self.guidelines_path = guidelines_path
        self.rng = rng or random.Random()
        self.prefetch = prefetch
        self._prefetched: dict[str, _Prefetch] = {}  # annotator -> their next pair
        self._prefetch_lock = threading.Lock()
        self.scorer = UncertaintyScorer(sm, self.models, self._version_id)  # uncertain-first

    # --- start-up and reading ---------------------------------------------------------------

    def import_default_prompts(self, path: Path = DEFAULT_PROMPTS) -> int:
        """On first start (no prompts at all), fill the queue with the prompts shipped with the
        app, so a new user can label at once. Returns how many were added."""
        with self.sm.begin() as s:
            if sum(repo.store_stats(s).prompts.values()):
                return 0
            texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
            added = repo.add_prompts(s, texts, source="default").added
        logger.info("imported %d default prompts from %s", added, path)
        return added

    def guidelines(self) -> str:
        """The guidelines Markdown: the data directory's `guidelines.md` if there is one."""
        for path in (self.guidelines_path, DEFAULT_GUIDELINES):
            if path is not None and path.is_file():
                return path.read_text(encoding="utf-8")
        return ""

    def progress(self, annotator: str) -> Progress:
        with self.sm.begin() as s:
            return _progress(s, annotator)

    # --- generating a pair ------------------------------------------------------------------

    def pick_prompt(
        self,
        annotator: str,
        typed: str | None,
        skipped: Collection[int] = (),
        prompt_id: int | None = None,
        *,
        k: int = PAIR,
    ) -> tuple[int, str]:
        """(prompt id, text): prompt `prompt_id` (regenerate), else the typed prompt, else the
        next from the queue (prompts this annotator has labeled least first, skipped ones
        passed over; with the "uncertain-first" order, the least sure of those first). For one
        answer (k=1) the queue counts verdicts as labels too."""
        with transaction(self.sm, "The prompt") as s:
            if prompt_id is not None:
                prompt = s.get(Prompt, int(prompt_id))
                if prompt is None:
                    raise ValueError(f"no prompt with id {prompt_id}")
            elif typed is not None:
                if not typed.strip():
                    raise ValueError("The prompt is empty: type a question or an instruction.")
                prompt = repo.add_prompt(s, typed, source="typed")
            elif k == ONE:
                prompt = first_in_queue(
                    lambda passed: verdicts.next_verdict_prompt(s, annotator, exclude=passed),
                    skipped,
                )
            else:
                uncertain_for = self.scorer.queue_version(s)
                prompt = first_in_queue(
                    lambda passed: repo.next_prompt(
                        s, annotator.strip(), exclude=passed, uncertain_for=uncertain_for
                    ),
                    skipped,
                )
            return prompt.id, prompt.text

    def generate(
        self,
        annotator: str,
        k: int = PAIR,
        *,
        typed: str | None = None,
        skipped: Collection[int] = (),
        settings: LabelSettings | None = None,
        prompt_id: int | None = None,
        check: bool = False,
    ) -> Iterator[PairProgress]:
        """Stream k answers (1: judged alone, 2: a pair, 3-4: ranked) for `annotator`; the last
        PairProgress is done and stored. Skips and regenerations are noted in every mode. Only
        a pair is shared with a team, prefetched and shown to a judge. `check` (a pair, from
        the queue): a pair the model labeled itself that no person has judged ("Check the
        model's labels"), ValueError when there is none.

        Raises ValueError (before anything is yielded) for a k other than 1 to 4, an empty
        prompt, an empty queue or invalid settings; errors of the model come out of the
        iteration as ValueError too.
        """
        k = int(k)
        settings = settings or self.settings
        params = answer_params(settings, k, self.rng)
        self._note_events(annotator, skipped, prompt_id)
        if k == PAIR and check and typed is None and prompt_id is None:
            return iter([self._self_labeled_pair(skipped)])
        if k == PAIR:
            return self._generate_pair(annotator, typed, skipped, settings, prompt_id)
        prompt_id, prompt = self.pick_prompt(annotator, typed, skipped, prompt_id, k=k)
        answers, specs = self._new_answers(prompt_id, prompt, params)
        stream = self.models.stream(prompt, specs)
        return self._pairs(stream, answers, specs, annotator, settings, prefetch_next=False)

    def generate_pair(
        self,
        annotator: str,
        typed: str | None = None,
        skipped: Collection[int] = (),
        settings: LabelSettings | None = None,
        prompt_id: int | None = None,
    ) -> Iterator[PairProgress]:
        """Stream a pair for `annotator` (`generate` with k=2)."""
        return self.generate(
            annotator, PAIR, typed=typed, skipped=skipped, settings=settings, prompt_id=prompt_id
        )

    def _generate_pair(
        self,
        annotator: str,
        typed: str | None,
        skipped: Collection[int],
        settings: LabelSettings,
        prompt_id: int | None,
    ) -> Iterator[PairProgress]:
        """A pair others judged, else the prefetched one, else a new one; then the judge."""
        self._drop_stale_prefetches()
        if typed is None and prompt_id is None:
            shared = next_shared(self.sm, annotator, skipped, self.rng)
            if shared is not None:
                return self._with_suggestion(annotator, iter([shared_progress(shared)]))
            ready = self._take_prefetch(annotator, settings, skipped)
            if ready is not None:
                self.models.versions.engine.promote(ready.ticket)
                stream = self.models.relay(ready.ticket)
                pairs = self._pairs(stream, ready.pair, ready.specs, annotator, settings)
                return self._with_suggestion(annotator, pairs)
        prompt_id, prompt = self.pick_prompt(annotator, typed, skipped, prompt_id)
        pair, specs = self._new_answers(prompt_id, prompt, settings.params())
        stream = self.models.stream(prompt, specs)
        return self._with_suggestion(
            annotator, self._pairs(stream, pair, specs, annotator, settings)
        )

    def _self_labeled_pair(self, skipped: Collection[int]) -> PairProgress:
        """A self-labeled pair nobody has judged, its sides drawn afresh (skipped prompts
        passed over unless only they are left); ValueError when there is none."""
        with self.sm.begin() as s:
            found = next_unjudged_self_label(s, skipped) or next_unjudged_self_label(s)
            if found is None:
                raise ValueError(NO_SELF_LABELS)
            answers = [s.get_one(Response, i) for i in found.response_ids]
            self.rng.shuffle(answers)
            shared = SharedPair(
                found.prompt_id, found.prompt, found.version, (answers[0], answers[1]), 0, 1
            )
            return replace(shared_progress(shared), shared=None, checking=found.version)

    def _note_events(
        self, annotator: str, skipped: Collection[int], regenerated: int | None
    ) -> None:
        """Skips (once per prompt) and regenerations, for the agreement view. Best effort: a
        refused write is logged, never in the way of the next pair."""
        if not annotator.strip() or not is_person(annotator):
            return
        try:
            with self.sm.begin() as s:
                for prompt_id in skipped:
                    record_label_event(s, annotator, int(prompt_id), "skip")
                if regenerated is not None:
                    record_label_event(s, annotator, int(regenerated), "regenerate")
        except (SQLAlchemyError, ValueError) as err:  # a full disk: the pair matters more
            logger.warning("could not note skips/regenerations for %s: %s", annotator, err)

    def _with_suggestion(
        self, annotator: str, pairs: Iterator[PairProgress]
    ) -> Iterator[PairProgress]:
        """The pair as it streams, then once more with the judge's suggestion (if a judge)."""
        pair = None
        for pair in pairs:
            yield pair
        if pair is None or not pair.done or self.suggestions.judge is None:
            return
        texts = (pair.answers[0].text, pair.answers[1].text)
        ids = (pair.answers[0].response_id, pair.answers[1].response_id)
        yield replace(pair, suggestion=self.suggestions.suggest(annotator, pair.prompt, texts, ids))

    def _new_answers(
        self, prompt_id: int, prompt: str, params: list[SamplingParams]
    ) -> tuple[PairProgress, list[AnswerSpec]]:
        """Answers for the active version, one per `params`: random seeds, and a random display
        order (which one is shown as A)."""
        version = self.models.active_version
        seeds = [self.rng.randrange(SEED_RANGE) for _ in params]
        order = list(range(len(params)))
        self.rng.shuffle(order)
        specs = [AnswerSpec(params[i], seeds[i], adapter=version) for i in order]
        return PairProgress(prompt_id, prompt, version), specs

    def _pairs(
        self,
        stream: Iterator[Waiting | GenerationUpdate],
        pair: PairProgress,
        specs: list[AnswerSpec],
        annotator: str,
        settings: LabelSettings,
        prefetch_next: bool = True,
    ) -> Iterator[PairProgress]:
        yield pair
        for event in stream:
            if isinstance(event, Waiting):  # its notice: a generation server down or slow
                yield replace(pair, waiting=event.position, notice=event.notice or pair.notice)
                continue
            answers = tuple(_answer(spec, a) for spec, a in zip(specs, event.answers, strict=True))
            pair = replace(pair, answers=answers, waiting=None, notice=event.notice)
            if event.done:
                pair = self._store(pair)
            yield pair
        if pair.done and prefetch_next:  # shown: now start the next one
            self._start_prefetch(annotator, settings, pair.prompt_id)

    # --- the next pair, before the vote -------------------------------------------------------

    def _start_prefetch(self, annotator: str, settings: LabelSettings, shown: int) -> None:
        """Start `annotator`'s next queue pair at low priority (nothing is stored yet)."""
        if not self.prefetch or not annotator.strip() or not is_person(annotator):
            return
        version = self.models.active_version
        with self._prefetch_lock:
            held = self._prefetched.get(annotator)
            if held is not None and held.usable(version, settings, {shown}):
                return
        try:
            prompt_id, prompt = self.pick_prompt(annotator, None, {shown})
            if prompt_id == shown:
                return  # the queue has nothing else
            pair, specs = self._new_answers(prompt_id, prompt, settings.params())
            ticket = self.models.submit(prompt, specs, priority=PREFETCH)
        except ValueError as err:
            logger.info("no next pair prefetched for %s: %s", annotator, err)
            return
        self._keep_prefetch(annotator, _Prefetch(pair, specs, settings, ticket, time.monotonic()))

    def _keep_prefetch(self, annotator: str, prefetch: _Prefetch) -> None:
        with self._prefetch_lock:
            old = self._prefetched.pop(annotator, None)
            self._prefetched[annotator] = prefetch
        if old is not None:
            old.ticket.cancel()

    def _take_prefetch(
        self, annotator: str, settings: LabelSettings, skipped: Collection[int]
    ) -> _Prefetch | None:
        """The annotator's prefetched pair if it still fits what they ask for (else dropped)."""
        with self._prefetch_lock:
            prefetch = self._prefetched.pop(annotator, None)
        if prefetch is None:
            return None
        if prefetch.usable(self.models.active_version, settings, skipped):
            return prefetch
        prefetch.ticket.cancel()
        return None

    def _drop_stale_prefetches(self) -> None:
        """Cancel prefetches of another version or older than the time limit."""
        version = self.models.active_version
        with self._prefetch_lock:
            stale = [
                name
                for name, p in self._prefetched.items()
                if not p.usable(version, p.settings, ())
            ]
            dropped = [self._prefetched.pop(name) for name in stale]
        for prefetch in dropped:
            prefetch.ticket.cancel()

    def _store(self, pair: PairProgress) -> PairProgress:
        """Record the answers; they are then ready for a vote, a verdict or a ranking."""
        named = ANSWERS_NAMED.get(len(pair.answers), "answers")
        with transaction(self.sm, f"The {named}") as s:
            version_id = self._version_id(s, pair.version)
            stored = []
            for answer in pair.answers:
                row = repo.record_response(
                    s,
                    prompt_id=pair.prompt_id,
                    model_version_id=version_id,
                    text=answer.text,
                    temperature=answer.temperature,
                    top_p=answer.top_p,
                    max_new_tokens=answer.max_new_tokens,
                    seed=answer.seed,
                    num_tokens=answer.num_tokens,
                    latency_s=answer.latency_s,
                )
                stored.append(replace(answer, response_id=row.id))
        return replace(pair, answers=tuple(stored), done=True, ready_at=time.time())

    def _version_id(self, s: Session, name: str) -> int:
        if name == runs.BASE:
            return runs.ensure_base_version(s, self.base_model).id
        for version in runs.list_versions(s, self.base_model):
            if version.name == name:
                return version.id
        raise ValueError(f"model version {name!r} is not in the database")

    # --- AI feedback ---------------------------------------------------------------------------

    def judge_label(self, count: int) -> str:
        """Let the judge label `count` pairs of its own queue as annotator `judge:<name>` (kept
        apart from people's votes, and off for training unless chosen). A message for the admin.
        Raises ValueError without a judge or for a bad count."""
        judge = self.suggestions.judge
        if judge is None:
            raise ValueError("No AI judge: start the app with --judge or --judge-url.")
        if not 1 <= int(count) <= MAX_JUDGE_BATCH:
            raise ValueError(f"choose between 1 and {MAX_JUDGE_BATCH} pairs, got {count}")
        name = f"{JUDGE_PREFIX}{judge.name}"
        labeled = unsure = 0
        for _ in range(int(count)):
            *_, pair = [None, *self.generate_pair(name)]  # the last event: the complete pair
            if pair is None or pair.suggestion is None or pair.suggestion.choice is None:
                unsure += 1
                continue
            self.vote(name, *(a.response_id for a in pair.answers), pair.suggestion.choice)
            labeled += 1
        return f"{name} labeled {labeled} pair(s); no verdict on {unsure}."

    # --- voting -------------------------------------------------------------------------------

    def vote(
        self,
        annotator: str,
        response_a_id: int,
        response_b_id: int,
        choice: str,
        *,
        rewrite: str | None = None,
        seconds_spent: float | None = None,
    ) -> VoteResult:
        """Record a vote on the answers shown as A and B. Idempotent per annotator and pair."""
        if choice not in CHOICES:
            raise ValueError(f"unknown choice {choice!r}; use one of {', '.join(CHOICES)}")
        check_name(annotator)
        shown = self.suggestions.shown(annotator, int(response_a_id), int(response_b_id))
        with transaction(self.sm, "Your vote") as s:
            preference, new = repo.record_preference(
                s,
                response_a_id=int(response_a_id),
                response_b_id=int(response_b_id),
                choice=choice,
                annotator=annotator,
                rewrite=rewrite,
                seconds_spent=seconds_spent,
                suggestion=shown,
            )
            preference_id = preference.id
            progress = _progress(s, annotator)  # same transaction: one lock, not two
        if not new:
            logger.info("vote %d was already recorded (double click or retry)", preference_id)
        return VoteResult(preference_id, new, progress)


def check_name(annotator: str | None) -> None:
    """ValueError for a missing or too long annotator name (votes and rankings)."""
    if not annotator or not annotator.strip():
        raise ValueError("Type your name before voting: votes are recorded per annotator.")
    if len(annotator.strip()) > MAX_NAME_CHARS:
        raise ValueError(f"The name is too long: at most {MAX_NAME_CHARS} characters.")


def _progress(s: Session, annotator: str) -> Progress:
    stats = repo.store_stats(s)
    mine = stats.by_annotator.get(annotator.strip())
    return Progress(
        mine=mine.votes if mine else 0,
        everyone=stats.overall.votes,
        usable_pairs=stats.overall.usable_pairs,
        by_choice=dict(stats.overall.by_choice),
        prompts=sum(stats.prompts.values()),
    )


def shared_progress(shared: SharedPair) -> PairProgress:
    """A stored pair others judged, ready for this annotator's vote (no generation)."""
    answers = tuple(
        PairAnswer(
            text=r.text,
            num_tokens=r.num_tokens or 0,
            temperature=r.temperature or 0.0,
            top_p=r.top_p or 1.0,
            max_new_tokens=r.max_new_tokens or 0,
            seed=r.seed or 0,
            finished=True,
            latency_s=r.latency_s,
            response_id=r.id,
        )
        for r in shared.answers
    )
    return PairProgress(
        shared.prompt_id,
        shared.prompt,
        shared.version,
        answers,
        done=True,
        ready_at=time.time(),
        shared=f"judged by {shared.votes} of {shared.k}",
    )


def _answer(spec: AnswerSpec, progress: Any) -> PairAnswer:
    return PairAnswer(
        text=progress.text,
        num_tokens=progress.token_count,
        temperature=spec.params.temperature,
        top_p=spec.params.top_p,
        max_new_tokens=spec.params.max_new_tokens,
        seed=spec.seed,
        finished=progress.finished,
        latency_s=progress.latency_s,
    )


def open_label_service(
    sm: sessionmaker[Session],
    versions: Any,
    base_model: str,
    data_dir: Path,
    *,
    prefetch: bool = True,
    judge: Judge | None = None,
    queue_order: str | None = None,
) -> LabelService:
    """The Label tab's service on the app's shared model
    (`app.serving.versions.VersionedModel`); fills an empty prompt queue with the
    default prompts. prefetch: generate each annotator's next pair before their vote.
    queue_order: store this order for everyone (`storage.uncertainty`; None: keep the stored
    one). ValueError for an unknown order."""
    if queue_order is not None:
        with sm.begin() as s:
            set_queue_order(s, queue_order)
    service = LabelService(
        sm,
        ModelService(versions),
        base_model,
        guidelines_path=data_dir / "guidelines.md",
        prefetch=prefetch,
        judge=judge,
    )
    service.import_default_prompts()
    return service


NO_SELF_LABELS = (
    "No labels of the model's to check: every pair it labeled has a person's vote, or it has "
    "labeled none yet (Train tab: Add the model's own labels)."
)
EMPTY_QUEUE = (
    "The prompt queue is empty: type a prompt, or import some with "
    "`python -m storage import-prompts FILE`."
)


def first_in_queue(
    pick: Callable[[Collection[int]], Prompt | None], skipped: Collection[int]
) -> Prompt:
    """The queue's next prompt by `pick` (given the prompt ids to pass over), passing over the
    skipped ones unless every prompt left was skipped; ValueError when the queue is empty."""
    prompt = pick(skipped)
    if prompt is None and skipped:
        prompt = pick(())
    if prompt is None:
        raise ValueError(EMPTY_QUEUE)
    return prompt
