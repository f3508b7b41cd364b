"""Sample answers to a chat prompt (first version: one batched `generate` call)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dpo_core.modeling import LoadedModel


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def chat_input_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """Render one user turn with the chat template and the generation prompt. Shape (1, T)."""
    messages = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return enc["input_ids"]


@torch.inference_mode()
def sample_answers(
    lm: LoadedModel, prompt: str, n: int = 2, params: SamplingParams | None = None, seed: int = 0
) -> list[str]:
    """Return `n` independently sampled answers to `prompt`, generated in one batch."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    params = params or SamplingParams()
    input_ids = chat_input_ids(lm.tokenizer, prompt).to(lm.device)
    torch.manual_seed(seed)
    out = lm.model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        temperature=params.temperature,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
        num_return_sequences=n,
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    completions = out[:, input_ids.shape[1] :]  # (n, new_tokens)
    return [lm.tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
