"""Self-labels between rounds: the active version labels pairs of its own answers, in the
background, only where it is shown to agree with people on its own answers (issue 27).

For the active version vK (never the base), when "Add the model's own labels" is on:
1. the scorer: a reward model (`reward-model`, the default: a linear head on the base's
   hidden states, fitted on people's A/B votes on answers not by vK, the pairs its rounds
   trained on; bench/loop.py found its labels right on 96-99 % of decisive pairs where the
   version's own margin was right on 80 %), or vK's implicit-reward margin (`margin`,
   `per-token`, `centered`);
2. calibrate it on people's A/B votes on pairs of vK's own answers
   (`dpo_core.self_label.calibrate`): fewer than 8 such votes (or fewer than 8 to fit the
   reward model on), or no margin where it agrees with them 90 % of the time, and it stores
   nothing and says why in words;
3. otherwise vK answers queue prompts nobody has labeled, twice each, up to multiplier x the
   people's labels of vK's round (less the self-labels it already stored), and every pair
   scored at or above the threshold is stored as a vote by `self:vK` with its scorer, margin
   and weight (`storage.self_labels.add_self_labels`).

It never blocks labelers: its answers wait in the engine behind every labeler's request,
prefetches included (`SELF_LABEL_PRIORITY`), one request at a time; the log-prob scoring holds
the model lock for `SCORE_CHUNK` pairs at a time, as the reward evaluation does, so the
labelers' decode loop runs between chunks. One job at a time per app process.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field, replace

import torch
from sqlalchemy.orm import Session, sessionmaker

from app.label.service import SEED_RANGE, LabelSettings
from app.label.uncertainty import SCORING
from app.serving.versions import BASE, VersionedModel
from app.train.request import SELF_LABEL_CHOICES, SELF_LABELS_OFF, self_label_multiplier_of
from app.train.run_inputs import unlabeled_prompts
from dpo_core import self_label as scoring
from dpo_core.engine import Ticket
from dpo_core.generation import AnswerSpec
from storage import self_labels as stored
from storage.rounds import find_version

logger = logging.getLogger(__name__)

# Behind every labeler's request, their prefetches too: the queue's background scoring's place.
SELF_LABEL_PRIORITY = SCORING
SCORE_CHUNK = 8  # pairs scored per hold of the model lock
DEFAULT_SCORER = scoring.REWARD_MODEL  # the cleanest labels in bench/loop.py (docs/loop.md)
MAX_FIT_PAIRS = 512  # people's newest pairs the reward model is fitted on
DEFAULT_WEIGHT = 1.0  # a self-label's weight in the loss: no experiment has set another yet
MAX_LENGTH = 1024  # tokens of prompt + answer the scorer reads


@dataclass(frozen=True)
class SelfLabelProgress:
    """Where the job stands, for the Train tab."""

    state: str = "idle"  # idle, running, done, declined (said why), failed
    version: str | None = None
    target: int = 0  # pairs to answer
    answered: int = 0
    kept: int = 0  # stored as self-labels
    threshold: float | None = None
    scorer: str = DEFAULT_SCORER
    message: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"

    def text(self) -> str:
        """`Self-labels: 12 of 64 pairs answered, 5 kept above reward-model margin 1.3`, or
        why none."""
        if self.state == "idle":
            return self.message or "Self-labels: none made by this app yet."
        if self.state in ("declined", "failed") or self.threshold is None:
            return f"Self-labels for {self.version}: {self.message}"
        line = (
            f"Self-labels: {self.answered} of {self.target} pairs answered, {self.kept} kept "
            f"above {self.scorer} margin {self.threshold:.3g}"
        )
        return line + (f" ({self.message})" if self.message else "") + "."


def choice_text(multiplier: int) -> str:
    """The Train tab's choice for a multiplier: `off`, `2x`, ..."""
    return SELF_LABELS_OFF if multiplier == 0 else f"{multiplier}x"


class SelfLabelJob:
    """The background job; `start` returns at once with a message, `progress` reads it."""

    def __init__(
        self,
        sm: sessionmaker[Session],
        versions: VersionedModel,
        base_model: str,
        *,
        scorer: str = DEFAULT_SCORER,
        weight: float = DEFAULT_WEIGHT,
        settings: LabelSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.sm = sm
        self.versions = versions
        self.base_model = base_model
        self.scorer = scoring.check_scorer(scorer)  # ValueError naming the scorers
        self.weight = weight
        self.settings = settings or LabelSettings()
        self.rng = rng or random.Random()
        self._progress = SelfLabelProgress()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ticket: Ticket | None = None  # the request being answered (cancelled on close)

    # --- the setting ----------------------------------------------------------------------------

    def choice(self) -> str:
        """The team's setting as the Train tab shows it (`off` unless an admin chose)."""
        with self.sm.begin() as s:
            return choice_text(stored.self_label_multiplier(s))

    def set_choice(self, choice: str) -> str:
        """Store the team's setting; ValueError naming the choices for an unknown one."""
        multiplier = self_label_multiplier_of(choice)
        with self.sm.begin() as s:
            stored.set_self_label_multiplier(s, multiplier)
        return choice_text(multiplier)

    # --- running ------------------------------------------------------------------------------

    def progress(self) -> SelfLabelProgress:
        with self._lock:
            return self._progress

    def version_activated(self, name: str, adapter_path: str | None = None) -> None:
        """A version became active: label with it when the setting is on (never the base)."""
        if name != BASE and self.choice() != SELF_LABELS_OFF:
            logger.info("self-labels: %s", self.start(name))

    def start(self, version: str | None = None) -> str:
        """Start labeling with `version` (default: the active one) in the background; a
        message saying what happens (or why not), never an exception for a user's error."""
        version = version or self.versions.active
        if version == BASE:
            return "The base model has no labels of its own: train a version first."
        if self.choice() == SELF_LABELS_OFF:
            choices = ", ".join(SELF_LABEL_CHOICES[1:])
            return f"Add the model's own labels is off: choose {choices} first (Advanced)."
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return f"The model is already labeling ({self._progress.version})."
            self._stop.clear()
            self._progress = SelfLabelProgress(
                "running", version, scorer=self.scorer, message="calibrating"
            )
            self._thread = threading.Thread(
                target=self._run, args=(version,), name="self-labels", daemon=True
            )
            self._thread.start()
        return f"{version} is labeling pairs of its own answers in the background."

    def wait(self) -> SelfLabelProgress:
        """Wait for the job (tests, shutdown) and return where it ended."""
        thread = self._thread
        if thread is not None:
            thread.join()
        return self.progress()

    def close(self) -> None:
        """Stop: cancel the request being answered and wait (the app's shutdown). Idempotent."""
        self._stop.set()
        ticket = self._ticket
        if ticket is not None:
            ticket.cancel()
        self.wait()

    def _update(self, **changes: object) -> None:
        with self._lock:
            self._progress = replace(self._progress, **changes)  # type: ignore[arg-type]

    def _run(self, version: str) -> None:
        try:
            self._label(version)
        except Exception as err:  # a failed job says so in the Train tab; labelers go on
            logger.exception("self-labels with %s failed", version)
            self._update(state="failed", message=f"failed: {err}")

    def _label(self, version: str) -> None:
        plan = self._plan(version)
        if plan is None:
            return
        self._update(target=len(plan.prompts), threshold=plan.threshold, message="")
        for start in range(0, len(plan.prompts), SCORE_CHUNK):
            if self._stop.is_set():
                self._update(state="done", message="stopped")
                return
            chunk = plan.prompts[start : start + SCORE_CHUNK]
            answered = [self._answer(p, version) for p in chunk]
            pairs = [p for p in answered if scoring.labelable(p)]  # an empty answer: no label
            kept = []
            if pairs:
                signed = self._signed(version, pairs, plan.head)
                kept = scoring.keep_labels(pairs, signed, plan.threshold, self.weight)
                self._store(version, kept)
            done = self.progress()
            self._update(answered=done.answered + len(answered), kept=done.kept + len(kept))
        self._update(state="done")

    def _plan(self, version: str) -> _Plan | None:
        """The scorer, its threshold and the prompts to answer, or None (the progress says why)."""
        with self.sm.begin() as s:
            row = find_version(s, version, self.base_model)
            evidence = stored.own_answer_votes(s, row.id)
            fit = []
            if self.scorer == scoring.REWARD_MODEL:
                fit = stored.other_answer_votes(s, row.id, limit=MAX_FIT_PAIRS)
            human = stored.round_labels(s, row.id)
            made = stored.self_label_count(s, version)
            wanted = stored.self_label_multiplier(s) * human - made
            prompts = unlabeled_prompts(s, limit=max(wanted, 0))
            adapter_path = row.adapter_path
        self.versions.ensure_loaded(version, adapter_path)
        head = self._fit(fit) if self.scorer == scoring.REWARD_MODEL else None
        if isinstance(head, str):
            self._update(state="declined", message=f"no self-labels: {head}.")
            return None
        threshold = self._calibrate(version, evidence, head)
        if threshold.value is None:
            self._update(state="declined", message=f"no self-labels: {threshold.reason}.")
            return None
        if wanted <= 0 or not prompts:
            why = (
                f"{made} already, as many as the setting allows for {human} human labels"
                if wanted <= 0
                else "no prompt in the queue is unlabeled: import more prompts (Data tab)"
            )
            self._update(state="declined", threshold=threshold.value, message=f"none added: {why}.")
            return None
        return _Plan(threshold.value, prompts, head)

    def _fit(self, votes: list[stored.OwnAnswerVote]) -> scoring.RewardHead | str:
        """The reward head fitted on people's pairs (the chosen answer first), or why not."""
        pairs = [scoring.AnswerPair(v.prompt, v.chosen, v.rejected) for v in votes]
        pairs = [p for p in pairs if scoring.labelable(p)]
        if len(pairs) < scoring.MIN_CALIBRATION_PAIRS:
            return (
                f"the reward model learns from people's labels of earlier answers: only "
                f"{len(pairs)}, at least {scoring.MIN_CALIBRATION_PAIRS} are needed"
            )
        prompts = [p.prompt for p in pairs]
        chosen = self._features(prompts, [p.first for p in pairs])
        rejected = self._features(prompts, [p.second for p in pairs])
        head = scoring.fit_reward_head(chosen, rejected)
        logger.info("self-labels: reward head fitted on %d pairs", head.fit_pairs)
        return head

    def _calibrate(
        self,
        version: str,
        evidence: list[stored.OwnAnswerVote],
        head: scoring.RewardHead | None,
    ) -> scoring.Threshold:
        """The scorer's threshold from people's votes on the version's own answers (each
        pair with the person's chosen answer first, so a positive margin agrees)."""
        if len(evidence) < scoring.MIN_CALIBRATION_PAIRS:  # too few: no need to score them
            return scoring.calibrate([0.0] * len(evidence))  # the reason, in words
        pairs = [scoring.AnswerPair(v.prompt, v.chosen, v.rejected) for v in evidence]
        pairs = [p for p in pairs if scoring.labelable(p)]  # a vote on an empty answer
        if len(pairs) < scoring.MIN_CALIBRATION_PAIRS:
            return scoring.calibrate([0.0] * len(pairs))
        return scoring.calibrate(self._signed(version, pairs, head).tolist())

    def _signed(
        self, version: str, pairs: list[scoring.AnswerPair], head: scoring.RewardHead | None
    ) -> torch.Tensor:
        """Each pair's signed margin (> 0: the first answer is preferred) by the scorer."""
        if head is None:
            return scoring.margins(self._log_ratios(version, pairs), self.scorer)
        prompts = [p.prompt for p in pairs]
        first = head.scores(self._features(prompts, [p.first for p in pairs]))
        second = head.scores(self._features(prompts, [p.second for p in pairs]))
        return (first - second).float()

    def _features(self, prompts: list[str], answers: list[str]) -> torch.Tensor:
        """The base model's answer features (`scoring.answer_features`), `SCORE_CHUNK` per
        hold of the model lock (the decode loop runs between chunks)."""
        parts = []
        for start in range(0, len(prompts), SCORE_CHUNK):
            end = start + SCORE_CHUNK
            with self.versions.lock:
                lm = self.versions.lm
                parts.append(
                    scoring.answer_features(
                        lm, prompts[start:end], answers[start:end], max_length=MAX_LENGTH
                    )
                )
        return torch.cat(parts)

    def _answer(self, prompt: str, version: str) -> scoring.AnswerPair:
        """Two answers by `version`, one per label temperature, behind every labeler."""
        specs = [
            AnswerSpec(params, self.rng.randrange(SEED_RANGE), adapter=version)
            for params in self.settings.params()
        ]
        self._ticket = self.versions.engine.submit(prompt, specs, priority=SELF_LABEL_PRIORITY)
        update = self._ticket.result()
        return scoring.AnswerPair(prompt, update.answers[0].text, update.answers[1].text)

    def _log_ratios(self, version: str, pairs: list[scoring.AnswerPair]) -> scoring.LogRatios:
        """The version's log-ratios to the base, `SCORE_CHUNK` pairs per hold of the model
        (the decode loop runs between chunks); the active adapter is restored after each."""
        parts = []
        for start in range(0, len(pairs), SCORE_CHUNK):
            with self.versions.lock:
                model = self.versions.lm.model
                active = model.active_adapter
                try:
                    model.set_adapter(version)
                    chunk = pairs[start : start + SCORE_CHUNK]
                    parts.append(scoring.log_ratios(self.versions.lm, chunk, max_length=MAX_LENGTH))
                finally:
                    model.set_adapter(active)
        return scoring.LogRatios(
            *(torch.cat([getattr(p, name) for p in parts]) for name in _RATIO_FIELDS)
        )

    def _store(self, version: str, kept: list[scoring.SelfLabel]) -> None:
        if not kept:
            return
        labels = [
            stored.SelfLabel(k.prompt, k.chosen, k.rejected, k.margin, self.scorer, k.weight)
            for k in kept
        ]
        with self.sm.begin() as s:
            stored.add_self_labels(s, version, labels, base_model=self.base_model)


_RATIO_FIELDS = ("first", "second", "first_tokens", "second_tokens")


@dataclass(frozen=True)
class _Plan:
    """What a job labels: the prompts, kept at or above `threshold` by the scorer (`head`:
    the fitted reward model; None: the version's own margins)."""

    threshold: float
    prompts: list[str] = field(default_factory=list)
    head: scoring.RewardHead | None = None
