"""Per-row sampling from next-token logits: temperature, nucleus (top-p), one RNG per row.

Each row has its own `torch.Generator`, so an answer depends only on its own seed and
parameters, never on the other answers in the batch. Nucleus sampling is exact but works on a
small tensor: the nucleus is looked for among the `CANDIDATES` most likely tokens, and only a row
whose nucleus is wider than that falls back to sorting the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CANDIDATES = 64


class RowSampler:
    """Draw one token per row from logits of shape (B, V).

    `temperatures[i] == 0` means greedy decoding for row i; `top_ps[i] == 1` samples from the
    full distribution.
    """

    def __init__(
        self, temperatures: Sequence[float], top_ps: Sequence[float], seeds: Sequence[int]
    ) -> None:
        if not len(temperatures) == len(top_ps) == len(seeds):
            raise ValueError("temperatures, top_ps and seeds must have one entry per row")
        self.greedy = [t == 0 for t in temperatures]
        self.temperature = torch.tensor([[t if t > 0 else 1.0] for t in temperatures])  # (B, 1)
        self.top_p = list(top_ps)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) float32 on CPU -> token ids (B,) int64."""
        probs = torch.softmax(logits / self.temperature, dim=-1)  # (B, V)
        k = min(CANDIDATES, probs.shape[-1])
        top_probs, top_ids = probs.topk(k, dim=-1)  # (B, k), sorted descending
        cum = top_probs.cumsum(dim=-1)
        tokens = top_ids[:, 0].clone()  # greedy choice
        for row in range(probs.shape[0]):
            if self.greedy[row]:
                continue
            u = torch.rand((), generator=self.generators[row]).item()
            p = self.top_p[row]
            if p < 1.0 and cum[row, -1] >= p:
                tokens[row] = top_ids[row, _nucleus_index(top_probs[row], cum[row], p, u)]
            else:
                tokens[row] = _full_sample(probs[row], p, u)
        return tokens


def _nucleus_index(sorted_probs: torch.Tensor, cum: torch.Tensor, top_p: float, u: float) -> int:
    """Index into `sorted_probs` (descending, (k,)) drawn from the top-p nucleus with uniform u.

    The nucleus is the smallest prefix whose mass reaches `top_p` (always at least one token).
    """
    size = int((cum - sorted_probs < top_p).sum())  # tokens whose preceding mass is below top_p
    nucleus_cum = cum[:size]
    target = u * float(nucleus_cum[-1])
    return min(int((nucleus_cum <= target).sum()), size - 1)


def _full_sample(probs: torch.Tensor, top_p: float, u: float) -> int:
    """Sample from the whole vocabulary (top_p == 1) or from a nucleus wider than CANDIDATES."""
    if top_p >= 1.0:
        cum = probs.cumsum(dim=-1)
        return min(int((cum <= u * float(cum[-1])).sum()), probs.shape[-1] - 1)
    sorted_probs, ids = probs.sort(descending=True)
    return int(ids[_nucleus_index(sorted_probs, sorted_probs.cumsum(dim=-1), top_p, u)])
