"""Weights packed to int4 or int8 for the CPU's weight-only matmul kernels (`torch.ops.aten`),
as `dpo_core.fast_llama` decodes with them: how a weight is packed, a self-check of each packed
kernel against the plain matmul, and a timing that keeps the plain weight where packing would
decode slower on this CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

INT4_GROUP = 32
LOSSLESS_INT4 = 0.01  # mean relative error below this: the weight was on a 4-bit grid


@dataclass
class QuantizedWeight:
    """A weight (N, K) packed for the CPU weight-only kernels of `torch.ops.aten`."""

    kind: str  # "int4" or "int8"
    data: torch.Tensor
    scales: torch.Tensor

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N)."""
        if self.kind == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.data, INT4_GROUP, self.scales)
        return torch.ops.aten._weight_int8pack_mm(x, self.data, self.scales)


def _int4_levels(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit levels of w (N, K) in groups of 32 along K: (levels, scale, low), with
    w ~= levels * scale + low per group."""
    n, k = w.shape
    groups = w.float().view(n, k // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)  # (N, K/32)
    levels = ((groups - low[..., None]) / scale[..., None]).round_().clamp_(0, 15)
    return levels, scale, low


def int4_error(w: torch.Tensor, sample_rows: int = 256) -> float:
    """Mean relative error of 4-bit groups of 32 on a sample of rows: ~0 for a weight that is
    already on such a grid (a Q4_1 GGUF), ~0.08 for a dense one."""
    rows = w[:: max(1, w.shape[0] // sample_rows)]
    levels, scale, low = _int4_levels(rows)
    scale, low = scale.to(w.dtype).float(), low.to(w.dtype).float()  # as the kernel stores them
    rebuilt = levels * scale[..., None] + low[..., None]
    groups = rows.float().view_as(rebuilt)
    return float((rebuilt - groups).abs().mean() / groups.abs().mean().clamp(min=1e-12))


def quantize_int4(w: torch.Tensor) -> QuantizedWeight:
    """Pack w (N, K) for `_weight_int4pack_mm_for_cpu` (groups of 32, a scale and zero each)."""
    n, k = w.shape
    levels, scale, low = _int4_levels(w)
    # The kernel dequantizes as (q - 8) * scale + zero, so zero = low + 8 * scale.
    scales = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous().to(w.dtype)
    q = levels.view(n, k).to(torch.int32)
    return QuantizedWeight("int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), scales)


def quantize_int8(w: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8 with one scale per output channel."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-12)  # (N,)
    q = (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q, scale.to(w.dtype))


def quantize(w: torch.Tensor, mode: str) -> QuantizedWeight | None:
    """Pack `w` (N, K) as `mode` asks; None keeps the original (mode `none`, or no kernel)."""
    if mode == "none" or w.device.type != "cpu":
        return None
    n, k = w.shape
    candidates: list[QuantizedWeight] = []
    if mode in ("auto", "int4") and k % INT4_GROUP == 0 and n % 16 == 0:
        try:
            if mode == "int4" or int4_error(w) < LOSSLESS_INT4:
                candidates.append(quantize_int4(w))
        except RuntimeError as err:  # no int4 kernel for this shape or build
            logger.debug("int4 packing unavailable: %s", err)
    if mode in ("auto", "int8") or (mode == "int4" and not candidates):
        candidates.append(quantize_int8(w))
    for q in candidates:
        if _kernel_agrees(q, w):
            return q if mode != "auto" or packed_is_faster(q, w) else None
    return None


_FASTER: dict[tuple[str, tuple[int, ...], torch.dtype], bool] = {}  # one timing per shape


def packed_is_faster(q: QuantizedWeight, w: torch.Tensor) -> bool:
    """Whether decoding (2 rows) reads `q` faster than the plain weight, timed once per shape
    and format in this process. Packing pays where the CPU has fast int4/int8 kernels (AVX512,
    AMX); on an AVX2-only EPYC the plain fp32 matmul measured 2.3x faster than int4 (1.5x
    than int8) on the embedded model, so `auto` keeps the model's own weights there."""
    key = (q.kind, tuple(w.shape), w.dtype)
    if key not in _FASTER:
        x = torch.randn(2, w.shape[1], dtype=w.dtype)
        packed = _median_seconds(lambda: q.matmul(x))
        plain = _median_seconds(lambda: F.linear(x, w))
        _FASTER[key] = packed < plain
        logger.debug("%s %s: packed %.3g s, plain %.3g s", q.kind, key[1], packed, plain)
    return _FASTER[key]


def _median_seconds(fn: Callable[[], Any], repeats: int = 5, calls: int = 10) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2]


def _kernel_agrees(q: QuantizedWeight, w: torch.Tensor) -> bool:
    """Self-check the packed kernel against a plain matmul (guards against layout surprises)."""
    x = torch.randn(3, w.shape[1], dtype=w.dtype, generator=torch.Generator().manual_seed(0))
    try:
        got = q.matmul(x).float()
    except RuntimeError as err:
        logger.debug("%s kernel unavailable: %s", q.kind, err)
        return False
    want = F.linear(x, w).float()
    tolerance = 0.2 if q.kind == "int4" else 0.05
    return bool((got - want).norm() <= tolerance * want.norm() + 1e-6)
