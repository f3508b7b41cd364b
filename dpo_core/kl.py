"""Monte Carlo estimate of KL(policy || base) per answer, on a set of prompts.

KL(pi || ref) = E_{y ~ pi}[log pi(y|x) - log ref(y|x)]: sample answers y from the policy (the
LoRA model) and average over them. The base is the same PEFT model with its adapter disabled,
so no second copy of the weights is needed. The answers are sampled from the full distribution
(temperature 1, no top-p); each is capped at `max_new_tokens`, which makes it the KL of the
answers' first tokens.

Each answer contributes the sum, over its positions t (the end token's included when the
answer ended), of the exact KL between the two next-token distributions given y_<t, computed
over the whole vocabulary (`stepwise_kl`). By the chain rule its mean is the same sequence KL
as the mean of log pi(y) - log ref(y) over the sampled tokens (`answer_logps`, which the tests
use as the reference), but it does not depend on which token was drawn at each position: it is
never negative and a little less noisy (about 10% lower standard error on the embedded model;
most of the noise is between answers, docs/defaults.md).

    completions = sample_completions(lm, model, prompts, max_new_tokens=64, seed=0)
    estimate = kl_from_completions(lm, model, completions)   # KLEstimate(kl=..., stderr=...)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from dpo_core.data import PairBatch
from dpo_core.generation import chat_input_ids
from dpo_core.logprobs import CHUNK_ELEMENTS, completion_logps, lm_head, scored_hidden
from dpo_core.modeling import LoadedModel


@dataclass(frozen=True)
class Completion:
    """One sampled answer: its prompt and answer token ids, decoded text, and whether it ended
    (with the end token, which is then the last of `answer_ids`) or hit `max_new_tokens`."""

    prompt: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    text: str
    finished: bool


@dataclass(frozen=True)
class KLEstimate:
    """Mean and standard error of the per-answer KL over the sampled answers, in nats."""

    kl: float
    stderr: float
    per_answer: tuple[float, ...]
    mean_tokens: float

    @property
    def n(self) -> int:
        return len(self.per_answer)


@contextmanager
def _autocast(lm: LoadedModel) -> Iterator[None]:
    half = lm.dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(lm.device.type, dtype=lm.dtype) if half else nullcontext():
        yield


def _stop_ids(lm: LoadedModel, model: Any) -> list[int]:
    ids = {lm.tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted(int(i) for i in ids if i is not None)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """One user turn rendered with the chat template and the generation prompt."""
    return chat_input_ids(tokenizer, prompt)[0].tolist()


def sample_completions(
    lm: LoadedModel,
    model: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[Completion]:
    """Sample one answer per prompt (one user turn each) from `model`; see `sample_from_ids`."""
    completions = sample_from_ids(
        lm,
        model,
        [prompt_ids(lm.tokenizer, p) for p in prompts],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
    )
    return [replace(c, prompt=p) for c, p in zip(completions, prompts, strict=True)]


@torch.no_grad()
def sample_from_ids(
    lm: LoadedModel,
    model: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[Completion]:
    """Sample one answer per chat-templated prompt (token ids) from `model` as it is (adapter
    on or off), in left-padded batches of different prompts, keeping the sampled token ids.

    The defaults (temperature 1, top_p 1) sample the model's own distribution, which an
    unbiased KL estimate needs. The global torch RNG is left as it was.
    """
    from transformers import GenerationConfig

    stop = _stop_ids(lm, model)
    pad = lm.tokenizer.pad_token_id
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop,
        pad_token_id=pad,
    )
    was_training = model.training
    model.eval()
    out: list[Completion] = []
    with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            out += _sample_batch(lm, model, chunk, config, set(stop), pad)
    model.train(was_training)
    return out


def _sample_batch(
    lm: LoadedModel, model: Any, rows: list[list[int]], config: Any, stop: set[int], pad: int
) -> list[Completion]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):  # left padding: every prompt ends at the same column
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention_mask[i, width - len(r) :] = 1
    with _autocast(lm):
        generated = model.generate(
            input_ids=input_ids.to(lm.device),
            attention_mask=attention_mask.to(lm.device),
            generation_config=config,
        )[:, width:].cpu()  # (B, new tokens)
    out = []
    for ids, row in zip(rows, generated.tolist(), strict=True):
        end = next((i for i, t in enumerate(row) if t in stop), None)
        answer = row if end is None else row[: end + 1]
        text = lm.tokenizer.decode(answer, skip_special_tokens=True).strip()
        prompt = lm.tokenizer.decode(ids, skip_special_tokens=True)
        out.append(Completion(prompt, tuple(ids), tuple(answer), text, end is not None))
    return out


def answer_batch(completions: list[Completion], pad_token_id: int) -> PairBatch:
    """Right-padded rows `prompt + answer`, one per completion, scored on the answer tokens.

    Sequence k is completion k. (A `PairBatch` counts 2 sequences per entry of `indices`;
    only the first n are used here, the rest stay empty.)
    """
    width = max(len(c.prompt_ids) + len(c.answer_ids) for c in completions)
    input_ids = torch.full((len(completions), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    rows, cols, labels = [], [], []
    for k, c in enumerate(completions):
        n, m = len(c.prompt_ids), len(c.answer_ids)
        input_ids[k, : n + m] = torch.tensor(c.prompt_ids + c.answer_ids)
        attention_mask[k, : n + m] = 1
        rows += [k] * m
        cols += range(n - 1, n + m - 1)  # token t is predicted at position t - 1
        labels += c.answer_ids
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=torch.arange(width).expand(len(completions), width),
        score_rows=torch.tensor(rows),
        score_cols=torch.tensor(cols),
        score_labels=torch.tensor(labels),
        score_seqs=torch.tensor(rows),
        indices=list(range(len(completions))),
    )


def answer_logps(
    lm: LoadedModel, model: Any, completions: list[Completion], batch_size: int = 8
) -> Tensor:
    """Summed log-probs (n,) of each completion's answer tokens under `model` as it is."""

    def score(batch: PairBatch, n: int) -> Tensor:
        return completion_logps(model, batch)[0][:n]

    return _per_answer(lm, model, completions, batch_size, score)


def base_logps(lm: LoadedModel, model: Any, completions: list[Completion]) -> Tensor:
    """`answer_logps` under the base: the adapter disabled (a plain model is its own base)."""
    with _base(model):
        return answer_logps(lm, model, completions)


def _base(model: Any) -> Any:
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


Reference = Callable[[], AbstractContextManager[Any]]  # puts the reference's weights in place


def answer_kls(
    lm: LoadedModel,
    model: Any,
    completions: list[Completion],
    batch_size: int = 8,
    reference: Reference | None = None,
) -> Tensor:
    """Per answer (n,), the sum over its positions of KL(policy || reference) between the
    next-token distributions (`stepwise_kl`): `model` as it is, then inside `reference()`
    (default: the base, its adapter disabled)."""
    reference = reference or (lambda: _base(model))
    head = lm_head(model)
    weight = head.weight.float()  # once per call: 0.1 GB for a 49k x 576 head, 2 GB for 128k x 4k
    bias = None if head.bias is None else head.bias.float()

    def score(batch: PairBatch, n: int) -> Tensor:
        policy = scored_hidden(model, batch)
        with reference():
            base = scored_hidden(model, batch)
        per_position = stepwise_kl(policy, base, weight, bias)
        return torch.zeros(n, device=per_position.device).index_add(
            0, batch.score_seqs, per_position
        )

    return _per_answer(lm, model, completions, batch_size, score)


@torch.no_grad()
def _per_answer(
    lm: LoadedModel,
    model: Any,
    completions: list[Completion],
    batch_size: int,
    score: Callable[[PairBatch, int], Tensor],
) -> Tensor:
    """`score(batch, n)` -> (n,) for the answers in batches of `batch_size`, the model in eval
    mode (no LoRA dropout) and autocast: (len(completions),) float32 on the CPU."""
    out = torch.zeros(len(completions))
    was_training = model.training
    model.eval()
    for start in range(0, len(completions), batch_size):
        chunk = completions[start : start + batch_size]
        batch = answer_batch(chunk, lm.tokenizer.pad_token_id).to(lm.device)
        with _autocast(lm):
            out[start : start + len(chunk)] = score(batch, len(chunk)).float().cpu()
    model.train(was_training)
    return out


def stepwise_kl(
    policy_hidden: Tensor, base_hidden: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """KL(softmax(W p + b) || softmax(W q + b)) for each row of the hidden states p, q (M, H):
    (M,) float32 >= 0, in chunks of rows. Pass a float32 head, so that the two distributions'
    rounding does not show up as a divergence."""
    out = torch.empty(policy_hidden.shape[0], dtype=torch.float32, device=policy_hidden.device)
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    for s in range(0, policy_hidden.shape[0], rows):
        p, q = (
            torch.log_softmax(torch.nn.functional.linear(h[s : s + rows].float(), weight, bias), -1)
            for h in (policy_hidden, base_hidden)
        )
        out[s : s + rows] = (p.exp() * (p - q)).sum(-1).clamp_(min=0.0)
    return out


def kl_from_completions(
    lm: LoadedModel,
    model: Any,
    completions: list[Completion],
    reference: Reference | None = None,
) -> KLEstimate:
    """KL(policy || reference) from answers sampled from the policy (`model` with its adapter
    on); the reference is the base unless `reference` says otherwise (`answer_kls`)."""
    if not completions:
        raise ValueError("no sampled answers to estimate the KL from")
    kls = answer_kls(lm, model, completions, reference=reference).tolist()
    return summarise(kls, [len(c.answer_ids) for c in completions])


def summarise(diffs: list[float], lengths: list[int]) -> KLEstimate:
    """Mean and standard error of per-answer KL estimates."""
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return KLEstimate(
        kl=mean,
        stderr=math.sqrt(var / n),
        per_answer=tuple(diffs),
        mean_tokens=sum(lengths) / n,
    )


def estimate_kl(
    lm: LoadedModel,
    model: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
) -> KLEstimate:
    """Sample one answer per prompt from the policy and estimate KL(policy || base)."""
    completions = sample_completions(
        lm, model, prompts, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size
    )
    return kl_from_completions(lm, model, completions)
