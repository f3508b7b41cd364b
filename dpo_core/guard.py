"""The over-optimisation guard: best checkpoint and early stopping on held-out metrics.

At each evaluation point the trainer hands the guard the held-out reward accuracy, the held-out
loss and the KL(policy || base) estimate. A checkpoint whose KL is above the ceiling is never
kept (its answers have drifted from the base: off-topic, babbling). Among the others the guard
keeps the latest one whose held-out accuracy is within `ACCURACY_TOLERANCE` of the best so far:
held-out accuracy saturates early and the held-out loss rises while the answers are still
moving the way the labels ask (docs/defaults.md), so "the best loss" would keep an early
checkpoint that behaves like the base. The run stops early when the KL passes the ceiling, or
when the accuracy stays below the best for `patience` evaluations in a row (over-fitting).
When there are too few held-out pairs to trust their accuracy, `KLGuard` runs instead: it reads
only the KL, on prompts nobody trained on (held-out prompts, or queue prompts never labeled),
keeps the latest checkpoint within the ceiling and stops when the KL stays above it for
`patience` evaluations in a row. Pure bookkeeping: no model, no tensors.

Both fail closed: when no evaluation was within the ceiling, the checkpoint kept is the least
drifted one (the lowest KL read), and `within_ceiling` is False, so the run's version is saved
but not made active (`metrics.json` says `"within_kl_ceiling": false`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Fewer training pairs than this rarely change the answers visibly (docs/defaults.md).
MIN_PAIRS_FOR_VISIBLE_CHANGE = 30
# Held-out reward accuracy this close to the best so far counts as just as good.
ACCURACY_TOLERANCE = 0.05


@dataclass(frozen=True)
class EvalPoint:
    step: int
    accuracy: float | None  # held-out implicit-reward accuracy (None: no held-out pairs)
    loss: float | None  # held-out preference loss (None: no held-out pairs)
    kl: float | None  # KL(policy || base) per answer, None when not measured


@dataclass(frozen=True)
class Decision:
    keep: bool  # this checkpoint is the new best: snapshot it
    stop: str | None  # why the run should stop now, in plain words (None: go on)


@dataclass
class _Ceiling:
    """What both guards share: the KL ceiling, the points read, the checkpoint kept within the
    ceiling (`best`) and, while there is none, the least-drifted point (`fallback`)."""

    kl_ceiling: float
    patience: int
    reads: str = ""
    best: EvalPoint | None = None
    fallback: EvalPoint | None = None
    points: list[EvalPoint] = field(default_factory=list)

    @property
    def kept(self) -> EvalPoint | None:
        """The checkpoint the run ends with: the best within the ceiling, else the least
        drifted (None: nothing was evaluated)."""
        return self.best or self.fallback

    @property
    def within_ceiling(self) -> bool:
        """False only when evaluations were read and none was within the ceiling."""
        return self.best is not None or not self.points

    def _over(self, point: EvalPoint) -> bool:
        """True when `point` is above the ceiling; it becomes the fallback when nothing so far
        was within the ceiling and it drifted least (the caller snapshots it then)."""
        if point.kl is None or point.kl <= self.kl_ceiling:
            return False
        if self.best is None and (self.fallback is None or point.kl < self.fallback.kl):
            self.fallback = point
        return True


@dataclass
class Guard(_Ceiling):
    """The full guard: held-out reward accuracy and the KL ceiling. `reads` says in words
    what it measured on (for the run's summary), e.g. "held-out reward accuracy on 12 pairs,
    KL on their 12 prompts"."""

    _best_accuracy: float = -1.0
    _stale: int = 0  # evaluations in a row below the best accuracy

    def observe(self, point: EvalPoint) -> Decision:
        self.points.append(point)
        if self._over(point):
            return Decision(self.fallback is point, kl_reason(point, self.kl_ceiling))
        assert point.accuracy is not None, "the accuracy guard needs held-out pairs"
        self._best_accuracy = max(self._best_accuracy, point.accuracy)
        if point.accuracy >= self._best_accuracy - ACCURACY_TOLERANCE:
            self.best, self._stale = point, 0
            return Decision(True, None)
        self._stale += 1
        if self._stale >= self.patience:
            return Decision(False, self._stale_reason(point))
        return Decision(False, None)

    def _stale_reason(self, point: EvalPoint) -> str:
        return (
            f"held-out reward accuracy stayed below its best ({self._best_accuracy:.2f}) for "
            f"{self.patience} evaluations in a row up to step {point.step}: over-fitting"
        )

    def kept_text(self, best: EvalPoint, last: bool) -> str:
        kl = f", KL {best.kl:.1f} nats" if best.kl is not None else ""
        if last:
            return f"Kept the final weights (held-out reward accuracy {best.accuracy:.2f}{kl})."
        return (
            f"Kept the checkpoint from step {best.step}, the last as good as the best on "
            f"held-out pairs (reward accuracy {best.accuracy:.2f}{kl})."
        )


@dataclass
class KLGuard(_Ceiling):
    """The guard of a run with too few held-out pairs for their accuracy to mean anything: the
    KL alone, read on prompts nobody trains on. Without an accuracy there is no "better", only
    "still close enough to the base": more training moves the answers further the way the
    labels ask (docs/defaults.md), so the best checkpoint is the latest one within the KL
    ceiling. A point above the ceiling is never kept; the run stops when the KL stays above it
    for `patience` evaluations in a row (one high reading on a few prompts may be noise; the
    kept checkpoint is the last one within the ceiling either way). `reads` says in words
    what the KL was read on."""

    _over_in_a_row: int = 0  # evaluations in a row above the ceiling

    def observe(self, point: EvalPoint) -> Decision:
        self.points.append(point)
        if not self._over(point):
            self.best, self._over_in_a_row = point, 0
            return Decision(True, None)
        self._over_in_a_row += 1
        keep = self.fallback is point
        if self._over_in_a_row >= self.patience:
            reason = kl_reason(point, self.kl_ceiling)
            if self.patience > 1:
                reason += f" (above the ceiling {self.patience} evaluations in a row)"
            return Decision(keep, reason)
        return Decision(keep, None)

    def kept_text(self, best: EvalPoint, last: bool) -> str:
        kl = f"KL {best.kl:.1f} nats" if best.kl is not None else "KL not measured"
        if last:
            return f"Kept the final weights ({kl}, within the ceiling {self.kl_ceiling:g})."
        return (
            f"Kept the checkpoint from step {best.step}, the last within the KL ceiling "
            f"{self.kl_ceiling:g} ({kl})."
        )


def kl_reason(point: EvalPoint, ceiling: float) -> str:
    return (
        f"the answers drifted too far from the base model at step {point.step} "
        f"(KL {point.kl:.1f} nats per answer, ceiling {ceiling:g}); "
        "more training would risk off-topic or garbled answers"
    )


def summary(
    guard: Guard | KLGuard | None,
    stop: str | None,
    last_step: int,
    total_steps: int,
    why_off: str | None,
) -> str:
    """A few plain-words sentences: how the run ended, which checkpoint was kept, and which
    guard ran on what (or why none did)."""
    if stop:
        text = f"Stopped early at step {last_step} of {total_steps}: {stop}."
    else:
        text = f"Trained all {total_steps} step{'s' if total_steps != 1 else ''}."
    if guard is None:
        return f"{text} No early stopping: {why_off}." if why_off else text
    reads = f" {guard.reads}." if guard.reads else ""
    if guard.best is None and guard.fallback is not None:
        kept = guard.fallback
        return (
            f"{text} Every evaluation was above the KL ceiling ({guard.kl_ceiling:g} nats): "
            f"kept the least-drifted checkpoint (step {kept.step}, KL {kept.kl:.1f} nats); the "
            "version is saved but not made active (an admin can activate it on purpose). "
            f"Lower the learning rate, raise beta or label more pairs.{reads}"
        )
    if guard.best is None:
        return f"{text} Nothing was evaluated.{reads}"
    return f"{text} {guard.kept_text(guard.best, guard.best.step == last_step)}{reads}"


def few_pairs_warning(num_pairs: int) -> str | None:
    """A warning when there are too few training pairs to expect a visible change."""
    if num_pairs >= MIN_PAIRS_FOR_VISIBLE_CHANGE:
        return None
    return (
        f"Only {num_pairs} preference pairs: with fewer than {MIN_PAIRS_FOR_VISIBLE_CHANGE} the "
        "answers usually do not change visibly. Label more pairs for a clear effect."
    )
