"""Paired (or n-way) answers to one prompt: one batch, streamed token by token.

    generator = AnswerGenerator(lm)                    # packs the weights once
    specs = [AnswerSpec(SamplingParams(0.7), seed=1), AnswerSpec(SamplingParams(1.0), seed=2)]
    for update in generator.stream("Name three planets.", specs):
        print(update.texts, update.token_counts)      # both answers grow together

Each answer has its own sampling parameters, seed and model version (`adapter`): the same
spec always gives the same answer, whatever it is batched with. Llama-family models run on the
fast decoder (`dpo_core.fast_llama`); anything else (4-bit bitsandbytes, other architectures,
DoRA adapters) runs the same loop on the model's own forward pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dpo_core.fast_llama import BASE, FastLlama, base_model_of
from dpo_core.modeling import LoadedModel
from dpo_core.sampling import RowSampler

logger = logging.getLogger(__name__)

ACTIVE = None  # AnswerSpec.adapter: whichever adapter the model has active (or the base)
MIN_PROMPT_TOKENS = 16


@dataclass(frozen=True)
class SamplingParams:
    """How one answer is sampled. temperature 0 means greedy decoding."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class AnswerSpec:
    """One answer to produce: sampling parameters, seed, and which model version answers.

    adapter: None = the model's active adapter (or the base model when it has none),
    "base" = the base model with adapters disabled, anything else = a loaded PEFT adapter.
    """

    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    adapter: str | None = ACTIVE


@dataclass(frozen=True)
class PreparedPrompt:
    input_ids: torch.Tensor  # (T,) chat-templated prompt, ending with the assistant header
    truncated: bool = False
    notice: str | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class AnswerProgress:
    """One answer so far. finish_reason: None while running, then "stop" or "length"."""

    text: str
    token_count: int
    finish_reason: str | None = None
    latency_s: float | None = None  # request to last token, once finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationUpdate:
    """A snapshot of all answers; the last one a stream yields has done=True."""

    answers: tuple[AnswerProgress, ...]
    elapsed_s: float
    first_token_s: float
    prompt_tokens: int
    truncated: bool = False
    notice: str | None = None
    engine: str = "fast"

    @property
    def done(self) -> bool:
        return all(a.finished for a in self.answers)

    @property
    def texts(self) -> list[str]:
        return [a.text for a in self.answers]

    @property
    def token_counts(self) -> list[int]:
        return [a.token_count for a in self.answers]


def chat_input_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """Render one user turn with the chat template and the generation prompt. Shape (1, T)."""
    messages = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return enc["input_ids"]


def prepare_prompt(
    tokenizer: Any, prompt: str, max_tokens: int, server_limit: bool = False
) -> PreparedPrompt:
    """Template `prompt`; if it exceeds `max_tokens`, keep its beginning and say so (and, with
    `server_limit`, that the limit is the server's `--max-prompt-tokens`, not the model's).

    Raises ValueError for an empty prompt.
    """
    if not prompt or not prompt.strip():
        raise ValueError("The prompt is empty: type a question or an instruction.")
    # No token spans 64 characters, so this cut never removes text the model would read.
    text = prompt[: max_tokens * 64]
    ids = chat_input_ids(tokenizer, text)[0]
    if ids.shape[0] <= max_tokens and len(text) == len(prompt):
        return PreparedPrompt(ids)
    content = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(content) - (ids.shape[0] - max_tokens)
    while keep > 0:
        ids = chat_input_ids(tokenizer, tokenizer.decode(content[:keep]))[0]
        if ids.shape[0] <= max_tokens:
            break
        keep -= ids.shape[0] - max_tokens
    if keep <= 0:
        raise ValueError(f"the chat template alone is longer than {max_tokens} tokens")
    limit = (
        f"this server's limit ({max_tokens:,} prompt tokens: --max-prompt-tokens)"
        if server_limit
        else f"the model can read ({max_tokens:,} tokens with room for the answer)"
    )
    notice = (
        f"The prompt ({len(prompt):,} characters) is longer than {limit}, so only its "
        f"first {keep:,} tokens were used."
    )
    logger.info(notice)
    return PreparedPrompt(ids, truncated=True, notice=notice)


class DecodeSession(Protocol):
    """One batch being decoded: rows share a prompt, each row keeps its own KV cache."""

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) prompt -> next-token logits (B, V) float32."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) tokens -> next-token logits (B, V) float32."""
        ...


class StandardSession:
    """Decoding with the model's own forward pass (any causal LM, any PEFT adapter type)."""

    def __init__(self, model: Any, row_adapters: list[str], peft: bool) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=base_model_of(model).config)
        self.device = next(model.parameters()).device
        self.kwargs: dict[str, Any] = {}
        if peft:  # PEFT mixed-batch inference: one adapter name per row
            self.kwargs["adapter_names"] = ["__base__" if a == BASE else a for a in row_adapters]
        self.rows = len(row_adapters)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device)[None].expand(self.rows, -1)
        return self._forward(ids)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens.to(self.device)[:, None])

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, **self.kwargs)
        return out.logits[:, -1].float()


class StandardBatchSession:
    """Several prompts decoded in one batch on the model's own forward pass (any causal LM).

    Prompts are left-padded to one length (B, T) with an attention mask that hides the padding
    and position ids counted from each row's first real token, so a row reads what it would
    read alone. row_prompt[i] is the index in `prompts` that row i answers.
    """

    def __init__(
        self,
        model: Any,
        prompts: list[torch.Tensor],
        row_prompt: list[int],
        row_adapters: list[str],
        pad_id: int,
        peft: bool,
    ) -> None:
        self.standard = StandardSession(model, row_adapters, peft)
        length = max(int(p.shape[0]) for p in prompts)
        ids = torch.full((len(row_prompt), length), pad_id, dtype=torch.long)
        mask = torch.zeros(len(row_prompt), length, dtype=torch.long)
        for row, i in enumerate(row_prompt):
            n = int(prompts[i].shape[0])
            ids[row, length - n :] = prompts[i]
            mask[row, length - n :] = 1
        device = self.standard.device
        self.ids, self.mask = ids.to(device), mask.to(device)  # (B, T) each
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Next-token logits (B, V) float32 after every row's prompt."""
        return self._forward(self.ids, self.positions)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) tokens -> next-token logits (B, V) float32."""
        ones = self.mask.new_ones(self.mask.shape[0], 1)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return self._forward(tokens.to(self.standard.device)[:, None], self.positions)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        s = self.standard
        out = s.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=s.cache,
            use_cache=True,
            **s.kwargs,
        )
        return out.logits[:, -1].float()


class AnswerGenerator:
    """Generates answers with one loaded model; build once (it packs the weights), reuse.

    Not thread-safe: one request at a time (the app queues requests in front of it).
    weights: "auto" | "int4" | "int8" | "none" (see `dpo_core.fast_llama`); fast=False always
    uses the model's own forward pass; threads: CPU threads of the fast decoder (None: torch's
    setting; see `FastLlama`).
    """

    def __init__(
        self,
        lm: LoadedModel,
        *,
        weights: str = "auto",
        fast: bool = True,
        threads: int | None = 1,
    ) -> None:
        self.lm = lm
        self.fast: FastLlama | None = None
        if fast:
            try:
                self.fast = FastLlama(lm.model, weights, threads)
            except NotImplementedError as err:
                logger.info("using the standard decoding loop: %s", err)
        self.stop_ids = _stop_ids(lm)
        self.context = int(getattr(base_model_of(lm.model).config, "max_position_embeddings", 0))

    def rebind(self, model: Any) -> None:
        """Use a new wrapper of the same base weights (PEFT wraps the model to load an adapter)."""
        self.lm.model = model
        if self.fast is not None:
            try:
                self.fast.rebind(model)
            except NotImplementedError as err:
                logger.info("using the standard decoding loop: %s", err)
                self.fast = None

    def adapters(self) -> list[str]:
        """Loaded PEFT adapter names (empty for a plain model)."""
        return list(getattr(self.lm.model, "peft_config", {}) or {})

    def resolve_adapter(self, adapter: str | None) -> str:
        """Map an AnswerSpec.adapter to a concrete adapter name or BASE."""
        names = self.adapters()
        if adapter is ACTIVE:
            return getattr(self.lm.model, "active_adapter", BASE) if names else BASE
        if adapter == BASE or adapter in names:
            return adapter
        raise ValueError(f"unknown model version {adapter!r}; loaded: {[BASE, *names]}")

    def prompt_budget(self, max_new_tokens: int, max_prompt_tokens: int | None = None) -> int:
        budget = self.context - max_new_tokens if self.context else 1 << 30
        if max_prompt_tokens:
            budget = min(budget, max_prompt_tokens)
        if budget < MIN_PROMPT_TOKENS:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                f"context of {self.context} tokens"
            )
        return budget

    def stream(
        self,
        prompt: str,
        specs: Sequence[AnswerSpec],
        *,
        max_prompt_tokens: int | None = None,
    ) -> Iterator[GenerationUpdate]:
        """Yield a GenerationUpdate after every decoding step; the last one has done=True.

        Raises ValueError (before yielding anything) for an empty prompt, no specs, or an
        unknown adapter. A prompt longer than the context is cut, with `notice` saying so.
        """
        t0 = time.perf_counter()
        if not specs:
            raise ValueError("ask for at least one answer")
        rows = [self.resolve_adapter(s.adapter) for s in specs]
        max_new = max(s.params.max_new_tokens for s in specs)
        budget = self.prompt_budget(max_new, max_prompt_tokens)
        prepared = prepare_prompt(self.lm.tokenizer, prompt, budget)
        session, engine = self._session(rows, prepared.n_tokens + max_new)
        return self._decode(session, engine, prepared, specs, t0)

    def generate(self, prompt: str, specs: Sequence[AnswerSpec], **kwargs: Any) -> GenerationUpdate:
        """Run `stream` to the end and return the final update."""
        *_, last = self.stream(prompt, specs, **kwargs)
        return last

    def _session(self, rows: list[str], max_len: int) -> tuple[DecodeSession, str]:
        if self.fast is not None:
            try:
                return self.fast.session(rows, max_len), "fast"
            except NotImplementedError as err:
                logger.info("standard decoding for this request: %s", err)
        peft = bool(self.adapters())
        if not peft and any(r != BASE for r in rows):
            raise ValueError("this model has no adapters loaded")
        return StandardSession(self.lm.model, rows, peft), "standard"

    def standard_batch(
        self, prompts: list[torch.Tensor], row_prompt: list[int], row_adapters: list[str]
    ) -> StandardBatchSession:
        """A batch of several prompts on the model's own forward pass (see the class)."""
        peft = bool(self.adapters())
        if not peft and any(r != BASE for r in row_adapters):
            raise ValueError("this model has no adapters loaded")
        tokenizer = self.lm.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        model = self.lm.model
        return StandardBatchSession(model, prompts, row_prompt, row_adapters, int(pad), peft)

    def _decode(
        self,
        session: DecodeSession,
        engine: str,
        prepared: PreparedPrompt,
        specs: Sequence[AnswerSpec],
        t0: float,
    ) -> Iterator[GenerationUpdate]:
        # No inference_mode block here: a generator may resume on another thread; the
        # session methods enter it themselves.
        sampler = RowSampler(
            [s.params.temperature for s in specs],
            [s.params.top_p for s in specs],
            [s.seed for s in specs],
        )
        streams = [_AnswerStream(self.lm.tokenizer, s.params.max_new_tokens) for s in specs]
        tokens = sampler(session.prefill(prepared.input_ids))
        first_token_s = None
        while True:
            now = time.perf_counter() - t0
            for stream, token in zip(streams, tokens.tolist(), strict=True):
                stream.push(token, token in self.stop_ids, now)
            first_token_s = first_token_s if first_token_s is not None else now
            yield GenerationUpdate(
                answers=tuple(s.progress() for s in streams),
                elapsed_s=now,
                first_token_s=first_token_s,
                prompt_tokens=prepared.n_tokens,
                truncated=prepared.truncated,
                notice=prepared.notice,
                engine=engine,
            )
            if all(s.finish_reason for s in streams):
                return
            tokens = sampler(session.step(tokens))


class _AnswerStream:
    """Accumulates one row's tokens and renders its text for streaming."""

    def __init__(self, tokenizer: Any, max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.latency_s: float | None = None

    def push(self, token: int, is_stop: bool, now: float) -> None:
        if self.finish_reason:
            return
        if is_stop:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
            if len(self.ids) >= self.max_new_tokens:
                self.finish_reason = "length"
        # A NUL character is never meaningful in an answer and no database text column takes it.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).replace("\x00", "\ufffd")
        if self.finish_reason:
            self.text, self.latency_s = text.strip(), now
        elif not text.endswith("\ufffd"):  # hold back a half-decoded multi-byte character
            self.text = text

    def progress(self) -> AnswerProgress:
        return AnswerProgress(self.text, len(self.ids), self.finish_reason, self.latency_s)


def _stop_ids(lm: LoadedModel) -> set[int]:
    ids = {lm.tokenizer.eos_token_id}
    config_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return {int(i) for i in ids if i is not None}


def sample_answers(
    lm: LoadedModel, prompt: str, n: int = 2, params: SamplingParams | None = None, seed: int = 0
) -> list[str]:
    """Return `n` sampled answers to `prompt` (seeds seed, seed+1, ...), generated in one batch.

    Builds a fresh AnswerGenerator; callers that generate repeatedly should keep their own.
    """
    params = params or SamplingParams()
    specs = [AnswerSpec(params, seed + i) for i in range(n)]
    return AnswerGenerator(lm).generate(prompt, specs).texts
