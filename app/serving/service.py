"""The one in-memory model, shared by every browser, with a visible line in front of it.

Label requests join a first-in-first-out line and see their position while they wait; the head
of the line generates in a worker thread that holds the model lock of `VersionedModel` (which
Compare and the reward evaluation take too), so two requests never run the model at once and no
second copy is ever loaded. Updates reach the caller through a queue, coalesced to one every
`update_interval_s`; a caller that goes away (closed tab) stops its generation at the next token
and frees the model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from app.serving.versions import VersionedModel
from dpo_core.generation import AnswerSpec, GenerationUpdate

logger = logging.getLogger(__name__)

POLL_S = 0.2


@dataclass(frozen=True)
class Waiting:
    """A request that has not started: `position` 1 is next; `model_busy` means it is next but
    the model is still busy with other work (a comparison, a version switch)."""

    position: int
    model_busy: bool = False


class RequestLine:
    """A FIFO line of tickets; the ticket at the head may use the model."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._line: list[object] = []

    def join(self) -> object:
        ticket = object()
        with self._cond:
            self._line.append(ticket)
        return ticket

    def wait_turn(self, ticket: object, timeout_s: float) -> int:
        """Wait up to `timeout_s` to reach the head; returns how many are ahead (0 = our turn)."""
        with self._cond:
            self._cond.wait_for(lambda: self._line[0] is ticket, timeout=timeout_s)
            return self._line.index(ticket)

    def leave(self, ticket: object) -> None:
        with self._cond:
            if ticket in self._line:
                self._line.remove(ticket)
                self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._line)


_STARTED, _DONE = object(), object()


class ModelService:
    """Queued, streamed generation with the served model and its versions."""

    def __init__(
        self,
        versions: VersionedModel,
        *,
        max_prompt_tokens: int | None = None,
        update_interval_s: float = 0.05,
    ) -> None:
        self.versions = versions
        self.max_prompt_tokens = max_prompt_tokens
        self.update_interval_s = update_interval_s
        self.line = RequestLine()

    @property
    def active_version(self) -> str:
        return self.versions.active

    def activate_version(self, name: str, adapter_path: str | None) -> None:
        """Serve `name` by default from now on (loads its adapter once)."""
        self.versions.activate(name, adapter_path)

    def waiting(self) -> int:
        """Requests in line, the running one included."""
        return len(self.line)

    def stream(
        self, prompt: str, specs: Sequence[AnswerSpec]
    ) -> Iterator[Waiting | GenerationUpdate]:
        """Wait in line (yielding `Waiting`), then yield `GenerationUpdate`s; the last is done.

        Raises ValueError for an empty prompt at once, and re-raises the generator's errors
        (unknown version, max_new_tokens too large) when it reaches the head of the line.
        """
        if not prompt or not prompt.strip():
            raise ValueError("The prompt is empty: type a question or an instruction.")
        return self._stream(prompt, list(specs))

    def _stream(self, prompt: str, specs: list[AnswerSpec]) -> Iterator[Waiting | GenerationUpdate]:
        ticket = self.line.join()
        cancel = threading.Event()
        started = False
        try:
            ahead = self.line.wait_turn(ticket, 0)
            while ahead:
                yield Waiting(ahead)
                ahead = self.line.wait_turn(ticket, POLL_S)
            out: queue.Queue[object] = queue.Queue()
            worker = threading.Thread(
                target=self._work, args=(prompt, specs, ticket, out, cancel), daemon=True
            )
            worker.start()
            started = True
            yield from self._relay(out)
        finally:
            cancel.set()
            if not started:
                self.line.leave(ticket)

    def _work(
        self,
        prompt: str,
        specs: list[AnswerSpec],
        ticket: object,
        out: queue.Queue[object],
        cancel: threading.Event,
    ) -> None:
        """Run in a worker thread: the lock is taken and released by the same thread."""
        try:
            with self.versions.lock:
                out.put(_STARTED)
                stream = self.versions.generator.stream(
                    prompt, specs, max_prompt_tokens=self.max_prompt_tokens
                )
                for update in stream:
                    out.put(update)
                    if cancel.is_set():
                        logger.info("generation abandoned by its caller")
                        break
        except Exception as err:  # handed to the caller, who re-raises it
            out.put(err)
        finally:
            self.line.leave(ticket)
            out.put(_DONE)

    def _relay(self, out: queue.Queue[object]) -> Iterator[Waiting | GenerationUpdate]:
        """Pass the worker's updates on, at most one per `update_interval_s` (first and last
        always)."""
        started = False
        pending: GenerationUpdate | None = None
        last_sent = 0.0
        while True:
            try:
                item = out.get(timeout=POLL_S)
            except queue.Empty:
                if not started:
                    yield Waiting(1, model_busy=True)
                continue
            if item is _DONE:
                if pending is not None:
                    yield pending
                return
            if isinstance(item, Exception):
                raise item
            if item is _STARTED:
                started = True
                continue
            pending = item
            now = time.monotonic()
            first = last_sent == 0.0
            if first or pending.done or now - last_sent >= self.update_interval_s:
                yield pending
                pending, last_sent = None, now
