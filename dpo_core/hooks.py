"""What a caller hands a training run to follow and stop it, and how a stop unwinds the run.

`Hooks` bundles the callbacks of `dpo_core.trainer.train` with the process group they are
asked in: under torchrun a stop asked on any rank is agreed by all (`Comm.any`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpo_core.distributed import Comm

StepCallback = Callable[[dict[str, float]], None]
StopCheck = Callable[[], bool]
EvalHook = Callable[[Any], dict[str, float]]


class TrainingCancelled(Exception):
    """Raised inside the loop when `should_stop()` says so; `train` turns it into a result."""


@dataclass
class Hooks:
    """The caller's callbacks (see `dpo_core.trainer.train`) and the group they are asked in."""

    on_step: StepCallback | None = None
    should_stop: StopCheck | None = None
    on_eval: EvalHook | None = None
    comm: Comm = field(default_factory=Comm)

    def stop(self) -> bool:
        """Whether to stop now: asked on any rank, agreed by all (a collective under torchrun:
        every rank calls it at the same points)."""
        return self.comm.any(self.should_stop is not None and self.should_stop())
