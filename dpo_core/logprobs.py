"""Per-sequence completion log-probs, computing logits only where a completion token is scored.

A causal LM's logits tensor is (N, T, V); with Llama 3's V = 128k and T = 1024 that is 0.5 GB
per sequence in fp32. Only completion positions are ever needed, so the backbone's hidden
states are gathered at the positions a `PairBatch` scores and the LM head is applied to them
in chunks of rows. `_TokenLogps` also computes d logp / d hidden while each chunk's logits
are at hand, so the backward pass needs neither the logits nor a second head matmul.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpo_core.data import PairBatch
from dpo_core.fast_llama import base_model_of

CHUNK_ELEMENTS = 1 << 23  # logits held at once: 8 M floats (32 MB), e.g. 170 rows of 49k


def completion_logps(model: Any, batch: PairBatch) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each sequence's completion tokens, and how many there are.

    Args:
        model: a causal LM (`transformers`, or a `peft` wrapper) whose head is a plain linear.
        batch: either layout of `dpo_core.data`, already on the model's device.
    Returns:
        (logps, lengths), each (2B,) in the `[chosen; rejected]` order; logps is float32 and
        differentiable.
    """
    scored = scored_hidden(model, batch)
    head = lm_head(model)
    token_logps = token_logps_from_hidden(scored, head.weight, batch.score_labels, head.bias)
    n = batch.num_sequences
    logps = torch.zeros(n, dtype=torch.float32, device=scored.device)
    logps = logps.index_add(0, batch.score_seqs, token_logps)
    lengths = torch.bincount(batch.score_seqs, minlength=n)
    return logps, lengths


def lm_head(model: Any) -> Any:
    """The output layer of a causal LM or of a `peft` wrapper around one."""
    return base_model_of(model).get_output_embeddings()


def scored_hidden(model: Any, batch: PairBatch) -> Tensor:
    """The backbone's last hidden states (M, H) at the positions `batch` scores, in order."""
    decoder = base_model_of(model).get_decoder()
    hidden = decoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state  # (R, L, H)
    return hidden[batch.score_rows, batch.score_cols]


def token_logps_from_hidden(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None
) -> Tensor:
    """log softmax(hidden @ weight.T + bias)[labels], chunked. hidden (M, H), weight (V, H),
    labels (M,) -> (M,) float32. Gradients flow to `hidden` only (the head is frozen)."""
    head_trains = weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and head_trains:
        raise ValueError("training the LM head is not supported; keep lm_head out of LoRA targets")
    return _TokenLogps.apply(hidden, weight, labels, bias)


class _TokenLogps(torch.autograd.Function):
    """Chunked log-softmax-gather whose forward also stores d logp / d hidden.

    For one row, logp = z[y] - logsumexp(z) with z = W h + b, so d logp / d h = W^T (e_y - p),
    p = softmax(z). Storing it (M, H) costs far less than the logits (M, V) it replaces.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None):
        want_grad = ctx.needs_input_grad[0]
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if want_grad else None
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for s in range(0, hidden.shape[0], rows):
            h, y = hidden[s : s + rows], labels[s : s + rows]
            logits = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).float()
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            out[s : s + rows] = logits.gather(1, y[:, None]).squeeze(1) - lse
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(y), device=y.device), y] -= 1.0  # p - e_y
                grad[s : s + rows] = -(probs.to(weight.dtype) @ weight)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None, None, None
