"""One decode loop shared by every request: continuous batching for many annotators at once.

    engine = GenerationEngine(generator, lock)         # one per served model, one thread
    ticket = engine.submit("Name three planets.", specs)
    for event in ticket.updates():                     # Waiting(position) ..., then
        ...                                            # GenerationUpdate ... (last: done)

Why: decoding is bound by reading the weights, so one step over 16 rows costs far less than 8
steps over 2 (on a GPU little more than one; on this project's 2-core CPU 16 rows decode ~3.8x
the tokens/s of 2: bench/limits.py). A background thread runs the steps; a request is admitted
at the next step. Its prompt is prefilled in chunks between the others' decode steps: while
anyone decodes, prefill and decode steps take turns by time (`PrefillPacer`: prefill gets a
third), so a long prompt slows the others instead of stopping them; alone, it takes
`EngineLimits.prefill_chunk` tokens a turn. Its rows then join the running batch, and each row
leaves as soon as it finishes. Rows of different adapter versions share a batch
(`FastLlama.batch_lora`). Every row samples with its own seeded generator, so an answer is the
same alone or beside others.

Beyond `max_rows` rows or `max_cached_tokens` cached positions, requests wait first in, first
out (prefetches behind every normal request) and see their position. An error while admitting
one request fails that request only. Whoever else needs the model (loading a version, the reward
evaluation) takes `lock`; the loop holds it for one step at a time and steps aside for them.
Models the fast decoder cannot run take the standard path (`StandardBatchSession`): the
requests admitted in the same turn form one left-padded batch, which advances one token per
loop turn beside the fast rows; its finished rows stay in it until the whole batch is done.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_core.fast_llama import BASE, FastLlama, LoraTerm, RowCache
from dpo_core.generation import (
    AnswerGenerator,
    AnswerSpec,
    GenerationUpdate,
    PreparedPrompt,
    StandardBatchSession,
    _AnswerStream,
    prepare_prompt,
)
from dpo_core.sampling import RowSampler

logger = logging.getLogger(__name__)


_LIVE: weakref.WeakSet[GenerationEngine] = weakref.WeakSet()  # engines whose loop may run


@atexit.register
def _close_live_engines() -> None:
    """Stop every decode loop before the interpreter exits: a daemon thread killed inside a
    torch op aborts the process ("terminate called without an active exception", exit 134)."""
    for engine in list(_LIVE):
        engine.close()


NORMAL, PREFETCH = 0, 1  # request priorities: a prefetch waits behind every normal request
POLL_S = 0.2  # how often a waiting caller re-checks (and a busy engine re-publishes positions)
STEP_ASIDE_S = 0.0005  # the loop's pause while someone else waits for the model lock


@dataclass(frozen=True)
class EngineLimits:
    """How much the loop takes on at once.

    max_rows: answers decoded together; max_cached_tokens: KV-cache positions reserved by the
    running requests (each row reserves prompt + max_new_tokens); prefill_chunk: the most
    prompt tokens prefilled per loop turn (fewer while others decode: `PrefillPacer`);
    max_prompt_tokens: longer prompts are cut (None: the context);
    max_requests: requests running at once (1 = one at a time, today's serialized line).
    """

    max_rows: int = 16
    max_cached_tokens: int = 32768
    prefill_chunk: int = 512
    max_prompt_tokens: int | None = None
    max_requests: int | None = None

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_cached_tokens < 1 or self.prefill_chunk < 1:
            raise ValueError("max_rows, max_cached_tokens and prefill_chunk must be >= 1")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1 (or unset), got {self.max_requests}")


@dataclass(frozen=True)
class Waiting:
    """A request not yet admitted: `position` 1 is next; `model_busy` means it is next but
    someone else holds the model (a version switch, the reward evaluation); `notice`, in
    words, why it waits when that is not the line (a generation server down or slow)."""

    position: int
    model_busy: bool = False
    notice: str | None = None
    server_down: bool = False  # the notice says the generation server is not answering


class ModelLock:
    """A reentrant lock on the model; the decode loop steps aside while anyone else waits."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self._waiting = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._count:
            self._waiting += 1
        try:
            return self._lock.acquire(blocking, timeout)
        finally:
            with self._count:
                self._waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def take_turn(self, blocking: bool) -> bool:
        """Take the lock without counting as someone waiting (the decode loop's turn)."""
        return self._lock.acquire(blocking)

    def others_waiting(self) -> bool:
        return self._waiting > 0


class Ticket:
    """The caller's side of one request: the latest event, an error, a cancel switch."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._event: Waiting | GenerationUpdate | None = None
        self._seq = 0
        self._error: Exception | None = None
        self._final = False
        self.cancelled = threading.Event()

    def publish(self, event: Waiting | GenerationUpdate, final: bool = False) -> None:
        with self._cond:
            if self._event != event or final:
                self._event, self._seq, self._final = event, self._seq + 1, final
                self._cond.notify_all()

    def fail(self, error: Exception) -> None:
        with self._cond:
            self._error, self._final = error, True
            self._cond.notify_all()

    def cancel(self) -> None:
        self.cancelled.set()

    def updates(self, poll_s: float = POLL_S) -> Iterator[Waiting | GenerationUpdate]:
        """The newest event each time one arrives (intermediate ones may be skipped); the last
        is a done GenerationUpdate, or the request's error is raised. Leaving early cancels."""
        seen = 0
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda last=seen: self._seq != last or self._error, poll_s)
                    event, fresh, error = self._event, self._seq != seen, self._error
                    final, seen = self._final, self._seq
                if error is not None:
                    raise error
                if not fresh and self.cancelled.is_set():
                    raise ValueError("the request was cancelled")
                if fresh and event is not None:
                    yield event
                if final:
                    return
        finally:
            self.cancel()

    def result(self) -> GenerationUpdate:
        """Wait for the final update."""
        last = None
        for event in self.updates():
            last = event
        assert isinstance(last, GenerationUpdate)
        return last


@dataclass
class _Row:
    adapter: str
    sampler: RowSampler
    stream: _AnswerStream
    cache: RowCache | None = None
    token: int = 0

    @property
    def finished(self) -> bool:
        return self.stream.finish_reason is not None


@dataclass
class _Request:
    ticket: Ticket
    prompt: PreparedPrompt
    specs: list[AnswerSpec]
    rows: list[_Row]
    priority: int
    order: int
    t0: float
    text: str = ""
    first_token_s: float | None = None
    leaders: dict[str, _Row] = field(default_factory=dict)  # adapter -> row it prefills
    standard: bool = False  # runs on the model's own forward pass, in a _StandardBatch
    prefilled: bool = False

    @property
    def cost(self) -> int:
        """KV-cache positions its rows reserve."""
        return sum(self.prompt.n_tokens + r.stream.max_new_tokens for r in self.rows)


class RequestLine:
    """What every engine shares: its requests waiting (`_pending`, first in, first out within a
    priority) and running, under one condition. Subclasses set `_cond`, `_pending`, `_running`
    and define `submit` and `_publish_positions`."""

    _cond: threading.Condition
    _pending: list[Any]
    _running: list[Any]

    def submit(self, prompt: str, specs: Sequence[AnswerSpec], *, priority: int = NORMAL) -> Ticket:
        raise NotImplementedError

    def _publish_positions(self) -> None:
        raise NotImplementedError

    def promote(self, ticket: Ticket) -> None:
        """A prefetch someone now waits for: it waits as a normal request from now on (its
        place among them is still its arrival)."""
        with self._cond:
            for request in self._pending:
                if request.ticket is ticket:
                    request.priority = NORMAL
            self._pending.sort(key=lambda r: (r.priority, r.order))
        self._publish_positions()

    def generate(self, prompt: str, specs: Sequence[AnswerSpec]) -> GenerationUpdate:
        """Submit and wait for the final update."""
        return self.submit(prompt, specs).result()

    def waiting(self) -> int:
        """Requests not yet finished (running or waiting)."""
        with self._cond:
            return len(self._pending) + len(self._running)


def prepare_request(
    generator: AnswerGenerator, limits: EngineLimits, prompt: str, specs: Sequence[AnswerSpec]
) -> tuple[list[str], PreparedPrompt]:
    """Each answer's version and the templated (perhaps cut) prompt; ValueError for no specs,
    an unknown version or a max_new_tokens the context cannot hold."""
    if not specs:
        raise ValueError("ask for at least one answer")
    adapters = [generator.resolve_adapter(s.adapter) for s in specs]
    max_new = max(s.params.max_new_tokens for s in specs)
    budget = generator.prompt_budget(max_new, limits.max_prompt_tokens)
    server_limit = budget == limits.max_prompt_tokens
    return adapters, prepare_prompt(generator.lm.tokenizer, prompt, budget, server_limit)


class GenerationEngine(RequestLine):
    """The decode loop; `submit` from any thread. Started on first use, stopped by `close`."""

    def __init__(
        self,
        generator: AnswerGenerator,
        lock: ModelLock | None = None,
        limits: EngineLimits | None = None,
    ) -> None:
        self.generator = generator
        self.lock = lock or ModelLock()
        self.limits = limits or EngineLimits()
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._running: list[_Request] = []
        self._order = itertools.count()
        self._lora: dict[str, list[dict[str, LoraTerm]]] = {}
        self._lora_key: tuple[int, tuple[str, ...]] = (0, ())
        self._standard: list[_StandardBatch] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self._busy = False  # the loop waits for someone else's hold on the model
        self.stats = EngineStats()
        self.pacer = PrefillPacer(self.limits.prefill_chunk)

    # --- the callers' side ---------------------------------------------------------------------

    def submit(self, prompt: str, specs: Sequence[AnswerSpec], *, priority: int = NORMAL) -> Ticket:
        """Queue a request; its ticket streams Waiting, then GenerationUpdates.

        Raises ValueError at once for an empty prompt, no specs, an unknown version or a
        max_new_tokens the context cannot hold.
        """
        adapters, prepared = prepare_request(self.generator, self.limits, prompt, specs)
        ticket = Ticket()
        rows = [self._row(spec, adapter) for spec, adapter in zip(specs, adapters, strict=True)]
        order, t0 = next(self._order), time.perf_counter()
        request = _Request(ticket, prepared, list(specs), rows, priority, order, t0, prompt)
        with self._cond:
            self._pending.append(request)
            self._pending.sort(key=lambda r: (r.priority, r.order))
            self._ensure_thread()
            self._cond.notify_all()
        self._publish_positions()
        return ticket

    def _row(self, spec: AnswerSpec, adapter: str) -> _Row:
        p = spec.params
        sampler = RowSampler([p.temperature], [p.top_p], [spec.seed])
        return _Row(adapter, sampler, _AnswerStream(self.generator.lm.tokenizer, p.max_new_tokens))

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
            _LIVE.add(self)
            self._thread.start()

    # --- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._pending or self._running)
                if self._stop:
                    return
            try:
                self._turn()
            except Exception as err:  # a bug, not a request's fault: fail what runs, go on
                logger.exception("the decode loop failed; its running requests fail")
                for request in list(self._running):
                    self._fail(request, err)
                self._standard.clear()

    def _turn(self) -> None:
        self._drop_cancelled()
        with self._model_turn():
            self._admit()
            self._prefill()
            self._step()
        self._publish_positions()

    @contextlib.contextmanager
    def _model_turn(self) -> Iterator[None]:
        """Hold the model for one turn; step aside first for anyone waiting for it."""
        while self.lock.others_waiting():
            time.sleep(STEP_ASIDE_S)
        if not self.lock.take_turn(blocking=False):
            self._busy = True
            self._publish_positions()
            self.lock.take_turn(blocking=True)
            self._busy = False
        try:
            yield
        finally:
            self.lock.release()

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in self._pending + self._running if r.ticket.cancelled.is_set()]
            for request in gone:
                logger.info("a request was abandoned by its caller: its rows are freed")
                self._remove(request)

    def _remove(self, request: _Request) -> None:
        with self._cond:
            for queue in (self._pending, self._running):
                if request in queue:
                    queue.remove(request)
        for row in request.rows:
            row.cache = None

    def _publish_positions(self) -> None:
        with self._cond:
            pending = list(self._pending)
        for position, request in enumerate(pending, start=1):
            request.ticket.publish(Waiting(position, self._busy and position == 1))

    def _admit(self) -> None:
        """Move waiting requests into the batch, first come first served, while they fit."""
        with self._cond:
            admitted = []
            while self._pending and self._fits(self._pending[0]):
                request = self._pending.pop(0)
                self._running.append(request)
                self._start(request)
                admitted.append(request)
        standard = [r for r in admitted if r.standard and r in self._running]
        if standard:
            self._start_standard(standard)

    def _fits(self, request: _Request) -> bool:
        if not self._running:
            return True  # alone it always runs, whatever the limits
        limits = self.limits
        if limits.max_requests is not None and len(self._running) >= limits.max_requests:
            return False
        rows = sum(len(r.rows) for r in self._running) + len(request.rows)
        cost = sum(r.cost for r in self._running) + request.cost
        return rows <= limits.max_rows and cost <= limits.max_cached_tokens

    def _start(self, request: _Request) -> None:
        """Reserve caches (fast path) or open a standard-path stream; a failure ends only it."""
        try:
            fast = self._fast_for(request)
            if fast is None:
                request.standard = True  # batched with the others admitted now (`_admit`)
                return
            max_len = request.prompt.n_tokens + max(r.stream.max_new_tokens for r in request.rows)
            for row in request.rows:
                row.cache = fast.new_cache(max_len)
                request.leaders.setdefault(row.adapter, row)
        except Exception as err:  # this request's fault, handed to its caller
            self._fail(request, err)

    def _fast_for(self, request: _Request) -> FastLlama | None:
        """The fast decoder if it can run every row of `request` (loads their LoRA terms)."""
        fast = self.generator.fast
        if fast is None:
            return None
        key = (id(fast.model), tuple(self.generator.adapters()))
        if key != self._lora_key:  # a version was loaded: fuse the LoRA terms again
            self._lora, self._lora_key = {}, key
        try:
            for adapter in {r.adapter for r in request.rows} - {BASE} - set(self._lora):
                self._lora[adapter] = fast.lora_layers(adapter)
        except NotImplementedError as err:
            logger.info("standard decoding for this request: %s", err)
            return None
        return fast

    def _fail(self, request: _Request, err: Exception) -> None:
        logger.warning("a request failed: %s", err)
        self._remove(request)
        request.ticket.fail(err if isinstance(err, ValueError) else ValueError(str(err)))

    def _prefill(self) -> None:
        """Prefill this turn's share of prompt tokens (`PrefillPacer`), shortest remaining
        prompts first (a long prompt takes several turns and never holds up a short one)."""
        todo = [r for r in self._running if not r.standard and not r.prefilled]
        if not todo:
            return
        decoding = any(r.prefilled for r in self._running if not r.standard)
        budget = self.pacer.budget(decoding)
        if budget == 0:
            return
        t0, done = time.perf_counter(), 0
        for request in sorted(todo, key=_prompt_left):
            if done >= budget:
                break
            try:
                done += self._prefill_request(request, budget - done)
            except Exception as err:  # this request's fault only
                self._fail(request, err)
        self.pacer.prefilled(done, time.perf_counter() - t0, decoding)

    def _prefill_request(self, request: _Request, budget: int) -> int:
        """Prefill one chunk per adapter group; when the prompt is done, sample first tokens."""
        fast = self.generator.fast
        assert fast is not None
        ids, used = request.prompt.input_ids, 0
        for adapter, leader in request.leaders.items():
            cache = leader.cache
            assert cache is not None
            if cache.pos == len(ids):
                continue
            chunk = ids[cache.pos : cache.pos + budget]
            lora = self._lora.get(adapter) if adapter != BASE else None
            logits = fast.prefill_chunk(cache, chunk, lora or [{} for _ in fast.layers])
            used += len(chunk)
            if cache.pos == len(ids):
                self._first_tokens(request, adapter, leader, logits)
        return used

    def _first_tokens(
        self, request: _Request, adapter: str, leader: _Row, logits: torch.Tensor
    ) -> None:
        for row in request.rows:
            if row.adapter != adapter:
                continue
            if row is not leader:
                assert row.cache is not None and leader.cache is not None
                row.cache.copy_from(leader.cache)
            row.token = int(row.sampler(logits[None])[0])
        ready = request.prompt.n_tokens
        if all(r.cache is not None and r.cache.pos == ready for r in request.leaders.values()):
            request.prefilled = True
            self._push(request, [(row, row.token) for row in request.rows])

    def _step(self) -> None:
        """One decode step for every fast row still generating, then each standard request."""
        fast = self.generator.fast
        rows = [
            (req, row)
            for req in self._running
            if not req.standard and req.prefilled
            for row in req.rows
            if not row.finished
        ]
        if rows and fast is not None:
            t0 = time.perf_counter()
            self._fast_step(fast, rows)
            self.pacer.stepped(time.perf_counter() - t0)
        for batch in list(self._standard):
            self._standard_step(batch)

    def _fast_step(self, fast: FastLlama, rows: list[tuple[_Request, _Row]]) -> None:
        adapters = [row.adapter for _, row in rows]
        lora = fast.batch_lora({a: self._lora[a] for a in set(adapters) - {BASE}}, adapters)
        tokens = torch.tensor([row.token for _, row in rows])
        caches = [row.cache for _, row in rows]
        try:
            logits = fast.decode(caches, tokens, lora)  # type: ignore[arg-type]
        except Exception as err:  # shared step: every request in it fails
            for request in {id(r): r for r, _ in rows}.values():
                self._fail(request, err)
            return
        self.stats.count(len(rows))
        by_request: dict[int, list[tuple[_Row, int]]] = {}
        requests = {}
        for i, (request, row) in enumerate(rows):
            row.token = int(row.sampler(logits[i : i + 1])[0])
            by_request.setdefault(id(request), []).append((row, row.token))
            requests[id(request)] = request
        for key, pushed in by_request.items():
            self._push(requests[key], pushed)

    def _push(self, request: _Request, tokens: list[tuple[_Row, int]]) -> None:
        """Record each row's new token, free finished rows, publish the request's update."""
        now = time.perf_counter() - request.t0
        stop_ids = self.generator.stop_ids
        for row, token in tokens:
            row.stream.push(token, token in stop_ids, now)
            if row.finished:
                row.cache = None  # its cache leaves with it
        if request.first_token_s is None:
            request.first_token_s = now
        update = GenerationUpdate(
            answers=tuple(r.stream.progress() for r in request.rows),
            elapsed_s=now,
            first_token_s=request.first_token_s,
            prompt_tokens=request.prompt.n_tokens,
            truncated=request.prompt.truncated,
            notice=request.prompt.notice,
            engine="standard" if request.standard else "fast",
        )
        request.ticket.publish(update, final=update.done)
        if update.done:
            self._remove(request)

    def _start_standard(self, requests: list[_Request]) -> None:
        """One batch on the model's own forward pass for the requests admitted together."""
        rows = [(i, row) for i, r in enumerate(requests) for row in r.rows]
        try:
            session = self.generator.standard_batch(
                [r.prompt.input_ids for r in requests],
                [i for i, _ in rows],
                [row.adapter for _, row in rows],
            )
        except Exception as err:  # the batch's requests fail together
            for request in requests:
                self._fail(request, err)
            return
        self._standard.append(_StandardBatch(session, requests))

    def _standard_step(self, batch: _StandardBatch) -> None:
        """Prefill (first turn) or one step of a standard batch; finished rows idle along."""
        rows = [(req, row) for req in batch.requests for row in req.rows]
        try:
            if batch.started:
                tokens = torch.tensor([row.token for _, row in rows])
                logits = batch.session.step(tokens)
            else:
                logits, batch.started = batch.session.prefill(), True
        except Exception as err:  # a shared forward pass: its requests fail together
            for request in batch.requests:
                self._fail(request, err)
            self._standard.remove(batch)
            return
        self.stats.count(len(rows))
        for request in batch.requests:
            mine = [(i, row) for i, (req, row) in enumerate(rows) if req is request]
            for i, row in mine:
                row.token = int(row.sampler(logits[i : i + 1])[0])
            if request in self._running:
                self._push(request, [(row, row.token) for _, row in mine])
        if not any(r in self._running for r in batch.requests):
            self._standard.remove(batch)


@dataclass
class _StandardBatch:
    session: StandardBatchSession
    requests: list[_Request]
    started: bool = False


def _prompt_left(request: _Request) -> int:
    done = min(row.cache.pos if row.cache else 0 for row in request.leaders.values())
    return request.prompt.n_tokens - done


class PrefillPacer:
    """How many prompt tokens a loop turn prefills. Nobody decoding: all of `chunk`. Else
    prefill and decoding take turns by time: prefill gets at most `SHARE` of the model's time
    (a turn prefills only while `debt` <= 0: each second of prefill adds (1 - SHARE) / SHARE
    seconds of debt, each decode step pays its own time back), about one decode step's worth
    of tokens at a time (from running averages of the prefill rate and the step time), at least
    `MIN_CHUNK`. So while a long prompt prefills the others keep two thirds of the model's
    time, never stopping (late in a long prompt a token costs more to prefill: the debt, not
    the chunk size, keeps the share), and a short prompt still prefills within a few turns.
    Why a third, not half: with half, bench/limits.py (`--long-prompt`, 2-core CPU under load)
    measured the others at 0.33-0.66 of their pace before the long prompt arrived."""

    MIN_CHUNK = 16
    SHARE = 1 / 3  # of the model's time, for prefill while others decode
    SMOOTHING = 0.3  # weight of the newest measurement in the running averages

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.tokens_per_s: float | None = None
        self.step_s: float | None = None
        self.debt = 0.0  # seconds of prefill not yet matched by decode steps

    def budget(self, decoding: bool) -> int:
        if not decoding:
            self.debt = 0.0
            return self.chunk
        if self.debt > 1e-9:  # (not 0: rounding of the share)
            return 0  # a decode-only turn
        if self.tokens_per_s is None or self.step_s is None:
            return self.chunk
        return max(self.MIN_CHUNK, min(self.chunk, int(self.tokens_per_s * self.step_s)))

    def prefilled(self, tokens: int, seconds: float, decoding: bool = True) -> None:
        if tokens > 0 and seconds > 0:
            self.tokens_per_s = self._mean(self.tokens_per_s, tokens / seconds)
            self.debt += seconds * (1 - self.SHARE) / self.SHARE if decoding else 0.0

    def stepped(self, seconds: float) -> None:
        self.step_s = self._mean(self.step_s, seconds)
        self.debt = max(self.debt - seconds, -seconds)  # credit for one step at most

    def _mean(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.SMOOTHING) * old + self.SMOOTHING * new


class EngineStats:
    """Counters for benchmarks and logs: decode steps and the rows they carried."""

    def __init__(self) -> None:
        self.steps = 0
        self.rows = 0

    def count(self, rows: int) -> None:
        self.steps += 1
        self.rows += rows
