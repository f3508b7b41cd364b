"""Model versions in the one in-memory model: the base plus named LoRA adapters (`v1`, ...).

Adapters load lazily into one PEFT wrapper around the shared base weights, so any version (or
several at once, one per batch row) can answer without a second copy of the model. Every
generation goes through the one decode loop (`dpo_core.engine`); loading a version and the
reward evaluation take the model lock, which the loop holds for one step at a time, so they
wait only for the current step, and rows already decoding finish on their own version.
"""

from __future__ import annotations

import logging
from typing import Any

from dpo_core.engine import EngineLimits, GenerationEngine, ModelLock, Waiting
from dpo_core.generation import AnswerGenerator, AnswerSpec, GenerationUpdate, SamplingParams
from dpo_core.modeling import LoadedModel, ModelLoadError, is_adapter_dir
from dpo_core.remote_engine import RemoteEngine
from dpo_core.reward_eval import RewardAccuracy, implicit_reward_accuracy

logger = logging.getLogger(__name__)

SERVER_DOWN = (
    "The generation server is not answering, so nothing was generated (nothing stored is "
    "affected): try again when it is back."
)


class GenerationServerDown(ValueError):
    """A blocking `generate` (Compare) gives up while the generation server is down, rather
    than hold the page without a word; the Label tab's requests wait and say so instead."""


BASE = "base"
REWARD_CHUNK = 8  # pairs scored per hold of the model (a few hundred ms on the embedded model)


class VersionedModel:
    """The served model and its loaded versions; `active` answers when no version is named."""

    def __init__(
        self,
        lm: LoadedModel,
        generator: AnswerGenerator | None = None,
        limits: EngineLimits | None = None,
        generation_url: str | None = None,
    ) -> None:
        self.lm = lm
        self.lock = ModelLock()
        self.generator = generator or AnswerGenerator(lm)
        self.engine: GenerationEngine | RemoteEngine
        if generation_url:  # answers from a server; log-prob work stays on `lm`
            self.engine = RemoteEngine(self.generator, generation_url, limits)
        else:
            self.engine = GenerationEngine(self.generator, self.lock, limits)
        self.active = BASE

    @property
    def remote(self) -> RemoteEngine | None:
        """The generation server's engine, or None when this process generates."""
        return self.engine if isinstance(self.engine, RemoteEngine) else None

    def loaded(self) -> list[str]:
        return [BASE, *self.generator.adapters()]

    def ensure_loaded(self, name: str, adapter_path: str | None) -> None:
        """Load adapter version `name` from `adapter_path` unless it is already there (and into
        the generation server, when there is one: ModelLoadError when it refuses)."""
        if name == BASE:
            return
        if name not in self.generator.adapters():
            self._load_local(name, adapter_path)
        if self.remote is not None:
            self.remote.add_version(name, adapter_path)

    def _load_local(self, name: str, adapter_path: str | None) -> None:
        if not is_adapter_dir(adapter_path):
            raise ModelLoadError(
                f"version {name}: its adapter directory {adapter_path} is missing or incomplete "
                "(was it moved or deleted?)"
            )
        from peft import PeftModel

        with self.lock:
            model = self.lm.model
            if isinstance(model, PeftModel):
                model.load_adapter(adapter_path, adapter_name=name)
            else:
                # The first adapter wraps the projections in LoRA layers around the same base
                # weights: the generator follows the wrapper and keeps its packed weights.
                model = PeftModel.from_pretrained(model, adapter_path, adapter_name=name)
                model.eval()
            self.generator.rebind(model)
            logger.info("loaded version %s from %s", name, adapter_path)

    def activate(self, name: str, adapter_path: str | None) -> None:
        """Make `name` the version that answers by default (e.g. after a training run)."""
        self.ensure_loaded(name, adapter_path)
        with self.lock:
            if name != BASE:
                self.lm.model.set_adapter(name)
            self.active = name
        logger.info("serving version %s", name)

    def generate(
        self, prompt: str, versions: list[str], *, seed: int, params: SamplingParams
    ) -> GenerationUpdate:
        """One answer per version to `prompt`, all in one batch, every row with the same seed."""
        specs = [AnswerSpec(params, seed=seed, adapter=v) for v in versions]
        final = None
        for event in self.engine.submit(prompt, specs).updates():  # leaving early cancels
            if isinstance(event, Waiting) and event.server_down:
                raise GenerationServerDown(SERVER_DOWN)
            if isinstance(event, GenerationUpdate):
                final = event
        assert final is not None and final.done, "a ticket's last event is its final update"
        return final

    def reward_accuracy(
        self, pairs: list[dict[str, Any]], versions: list[str], *, max_length: int = 512
    ) -> dict[str, RewardAccuracy]:
        """Implicit-reward accuracy per version, `REWARD_CHUNK` pairs per hold of the model,
        so the labelers' decode loop runs between chunks. Raises ValueError when no pair is
        usable."""
        adapters = [v for v in versions if v != BASE]
        parts: list[dict[str, RewardAccuracy]] = []
        for start in range(0, len(pairs), REWARD_CHUNK):
            chunk = pairs[start : start + REWARD_CHUNK]
            try:
                with self.lock:
                    parts.append(
                        implicit_reward_accuracy(self.lm, chunk, adapters, max_length=max_length)
                    )
            except ValueError:  # a chunk of unusable pairs only
                continue
        if not parts:
            raise ValueError("no usable held-out pairs (all empty or identical after truncation)")
        return {name: _pooled([p[name] for p in parts]) for name in parts[0]}


def _pooled(parts: list[RewardAccuracy]) -> RewardAccuracy:
    """One RewardAccuracy over several chunks of pairs (means weighted by their pairs)."""
    n = sum(p.pairs for p in parts)
    return RewardAccuracy(
        pairs=n,
        accuracy=sum(p.accuracy * p.pairs for p in parts) / n,
        mean_margin=sum(p.mean_margin * p.pairs for p in parts) / n,
    )
