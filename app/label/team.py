"""Labeling as a team: pairs others judged (overlap) and an AI judge's suggestions.

- Overlap (`storage.overlap`): with k > 1 an annotator's queue first offers a stored pair that
  others judged and that has fewer than k votes. It is shown as it was generated, no model call,
  with the sides drawn afresh for this person.
- Suggestions (`dpo_core.judge`): when a pair is complete the judge reads it and suggests A, B
  or a tie with one line of reason. The page shows it beside the pair; the person's key still
  decides, and the vote stores what was suggested, so the Data tab can say how often people
  followed the judge. A judge that fails or is unsure gives no suggestion, with a note.
  What was shown is remembered in this process for the vote (replicas: the proxy keeps a
  browser on one replica, see the README).
"""

from __future__ import annotations

import logging
import random
import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from dpo_core.judge import Judge, Suggestion
from storage.models import ModelVersion, Response
from storage.overlap import next_shared_pair, overlap_k
from storage.repo import Suggested

logger = logging.getLogger(__name__)

MAX_REMEMBERED = 10_000  # suggestions shown and not yet voted on, oldest forgotten first


@dataclass(frozen=True)
class SharedPair:
    """A stored pair to show again: answers in display order (sides drawn for this person)."""

    prompt_id: int
    prompt: str
    version: str
    answers: tuple[Response, Response]  # stored rows (read-only here)
    votes: int
    k: int


def next_shared(
    sm: sessionmaker[Session], annotator: str, skipped: Collection[int], rng: random.Random
) -> SharedPair | None:
    """The pair this annotator should judge to bring a judged pair to k votes, or None."""
    with sm.begin() as s:
        k = overlap_k(s)
        shared = next_shared_pair(s, annotator.strip(), k) if annotator.strip() else None
        if shared is None or shared.prompt_id in skipped:
            return None
        answers = [s.get_one(Response, i) for i in shared.response_ids]
        version = _version_name(s, shared.response_ids[0])
    rng.shuffle(answers)
    return SharedPair(
        shared.prompt_id, shared.prompt, version, (answers[0], answers[1]), shared.votes, k
    )


def _version_name(s: Session, response_id: int) -> str:
    version_id = s.get_one(Response, response_id).model_version_id
    version = s.get(ModelVersion, version_id) if version_id is not None else None
    return version.name if version is not None else "imported"


class SuggestionBook:
    """Asks the judge about complete pairs and remembers what each annotator was shown."""

    def __init__(self, judge: Judge | None) -> None:
        self.judge = judge
        self._shown: OrderedDict[tuple[str, int, int], Suggested] = OrderedDict()
        self._lock = threading.Lock()

    def suggest(
        self, annotator: str, prompt: str, texts: tuple[str, str], ids: tuple[int, int]
    ) -> Suggestion | None:
        """The judge's suggestion for a pair shown as (A, B); None without a judge."""
        if self.judge is None:
            return None
        suggestion = self.judge.suggest(prompt, texts[0], texts[1])
        if suggestion.choice is not None:
            with self._lock:
                self._shown[(annotator.strip(), *ids)] = Suggested(
                    suggestion.choice, f"judge:{suggestion.judge}"
                )
                while len(self._shown) > MAX_REMEMBERED:
                    self._shown.popitem(last=False)
        return suggestion

    def shown(self, annotator: str, response_a_id: int, response_b_id: int) -> Suggested | None:
        """What the judge suggested for this pair as this annotator saw it (A, B), if anything."""
        with self._lock:
            return self._shown.get((annotator.strip(), response_a_id, response_b_id))


@dataclass(frozen=True)
class JudgeSettings:
    """`--judge` (a local model: `embedded`, a hub id or a directory) or `--judge-url` with
    `--judge-model` (an OpenAI-compatible endpoint; the key from the environment variable
    `key_env`, read at start, never stored)."""

    model: str | None = None
    url: str | None = None
    url_model: str | None = None
    key_env: str = "DPO_STUDIO_JUDGE_KEY"
    timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if self.model and self.url:
            raise ValueError("choose one judge: --judge (a local model) or --judge-url")
        if self.url and not self.url_model:
            raise ValueError("--judge-url needs --judge-model (the model name the endpoint serves)")


def make_judge(settings: JudgeSettings, device: str | None = None) -> Judge | None:
    """The configured judge, None without one. A local judge is its own copy of the model
    (without adapters: it judges with the base model's taste, not the version being trained)."""
    import os

    from dpo_core.judge import LocalJudge, OpenAIJudge
    from dpo_core.modeling import load_model

    if settings.url:
        key = os.environ.get(settings.key_env) or None
        return OpenAIJudge(settings.url, settings.url_model or "", key, settings.timeout_s)
    if settings.model:
        lm = load_model(settings.model, device=device)
        return LocalJudge(lm, name=settings.model)
    return None
