"""Per-sequence completion log-probs, computing logits only where a completion token is scored.

A causal LM's logits tensor is (N, T, V); with Llama 3's V = 128k and T = 1024 that is 0.5 GB
per sequence in fp32. Only completion positions are ever needed, so the backbone's hidden
states are gathered at those positions first and the LM head is applied to them in chunks of
rows. `_TokenLogps` also computes d logp / d hidden while each chunk's logits are at hand, so
the backward pass needs neither the logits nor a second head matmul.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 23  # logits held at once: 8 M floats (32 MB), e.g. 170 rows of 49k


def completion_logps(
    model: Any, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the completion tokens of each row, and how many there are.

    Args:
        model: a causal LM (`transformers` or a `peft` wrapper) whose head is a plain linear.
        input_ids, attention_mask, completion_mask: (N, T), right padded.
    Returns:
        (logps, lengths), each (N,); logps is float32 and differentiable.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # (N, T, H)
    return sequence_logps(hidden, base.get_output_embeddings(), input_ids, completion_mask)


def sequence_logps(
    hidden: Tensor, head: torch.nn.Linear, input_ids: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-row summed log-probs of the completion tokens given final hidden states.

    Token t is scored from the hidden state at t - 1, so the masks are shifted by one.
    hidden (N, T, H); input_ids, completion_mask (N, T). Returns (logps, lengths), each (N,).
    """
    target = completion_mask[:, 1:].bool()  # (N, T-1): position t-1 predicts a completion token
    rows = torch.nonzero(target)[:, 0]  # (M,) row of each scored token
    token_logps = token_logps_from_hidden(
        hidden[:, :-1][target], head.weight, input_ids[:, 1:][target], head.bias
    )  # (M,)
    n = input_ids.shape[0]
    logps = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add(
        0, rows, token_logps
    )
    return logps, target.sum(dim=1)


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
