"""The one in-memory model, shared by every browser through one decode loop.

Requests go to the model's `GenerationEngine` (`dpo_core.engine`): each is admitted at the next
decoding step and shares the batch with everyone else's; beyond the engine's limits it waits
first in, first out and sees its position. Updates reach the caller coalesced to one every
`update_interval_s`; a caller that goes away (closed tab) frees its rows at the next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

from app.serving.versions import VersionedModel
from dpo_core.engine import NORMAL, Ticket, Waiting
from dpo_core.generation import AnswerSpec, GenerationUpdate

__all__ = ["ModelService", "Waiting"]

logger = logging.getLogger(__name__)


class ModelService:
    """Streamed generation with the served model and its versions."""

    def __init__(self, versions: VersionedModel, *, update_interval_s: float = 0.05) -> None:
        self.versions = versions
        self.update_interval_s = update_interval_s

    @property
    def active_version(self) -> str:
        return self.versions.active

    def activate_version(self, name: str, adapter_path: str | None) -> None:
        """Serve `name` by default from now on (loads its adapter once)."""
        self.versions.activate(name, adapter_path)

    def waiting(self) -> int:
        """Requests not finished, running or waiting."""
        return self.versions.engine.waiting()

    def submit(self, prompt: str, specs: Sequence[AnswerSpec], priority: int = NORMAL) -> Ticket:
        """Queue a request now; read it later with `relay`.

        Raises ValueError at once for an empty prompt, an unknown version or a max_new_tokens
        the context cannot hold.
        """
        if not prompt or not prompt.strip():
            raise ValueError("The prompt is empty: type a question or an instruction.")
        return self.versions.engine.submit(prompt, list(specs), priority=priority)

    def stream(
        self, prompt: str, specs: Sequence[AnswerSpec]
    ) -> Iterator[Waiting | GenerationUpdate]:
        """Yield `Waiting` while in line, then `GenerationUpdate`s; the last is done.

        Raises ValueError as `submit` does; a failure while generating (an adapter that does
        not load) comes out of the iteration as ValueError.
        """
        return self.relay(self.submit(prompt, specs))

    def relay(self, ticket: Ticket) -> Iterator[Waiting | GenerationUpdate]:
        """The ticket's events, at most one update per `update_interval_s` (the first and the
        last always); leaving early cancels the request."""
        last_sent = 0.0
        for event in ticket.updates():
            if isinstance(event, Waiting):
                yield event
                continue
            now = time.monotonic()
            if last_sent == 0.0 or event.done or now - last_sent >= self.update_interval_s:
                yield event
                last_sent = now
