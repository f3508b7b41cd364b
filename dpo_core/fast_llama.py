"""A lean decoder for Llama-family models: packed weights, a preallocated KV cache, plain ops.

Why: on a small CPU, token-by-token decoding of a 135M model is bound by two things the Hugging
Face `generate` loop does not address: per-step Python/module overhead (hundreds of module calls,
a logits-processor pipeline, a growing cache) and memory bandwidth (every step reads all the
weights). This module runs the same maths as `LlamaForCausalLM` with a few dozen tensor ops per
layer and, on CPU, reads weights packed to 4 or 8 bits:

- `auto`: a weight already on a 4-bit grid (the embedded model is a Q4_1 GGUF, i.e. 4-bit with
  groups of 32 and a scale and minimum each) is packed to int4 *losslessly*; any other weight is
  packed to int8 per output channel (~0.8 % relative error per matmul, like bf16 rounding
  twice). On CUDA, `auto` keeps the model's own weights.
- `int4` / `int8` force one format, `none` keeps the model's own weights. `auto` also times each
  packed format against the plain weight once per shape and keeps whichever decodes faster on
  this CPU (packing wins with AVX512/AMX kernels; on AVX2-only CPUs fp32 can win).

LoRA adapters are never merged into the packed weights (a DPO delta is far smaller than a
quantization step): each adapter adds its low-rank term `(x A^T) (s B)^T` next to the packed
matmul, with one fused A/B pair per projection group, and every batch row may use a different
adapter (or none), which is how two model versions answer the same prompt in one batch.
Prefill (many tokens at once) uses the model's own weights, so the prompt is read exactly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dpo_core import packed_weights

logger = logging.getLogger(__name__)

WEIGHT_MODES = ("auto", "int4", "int8", "none")
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
RESCORE = 256  # head candidates per row recomputed exactly (see PackedHead)
QUANT_MAX_ROWS = 8  # matmuls with more rows than this (prefill) use the model's own weights
BASE = "base"  # adapter name meaning "no adapter"


def _linear_parts(module: Any) -> tuple[Any, Any]:
    """(base nn.Linear, PEFT LoRA layer or None) for a possibly LoRA-wrapped projection."""
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        return module.base_layer, module
    return module, None


def base_model_of(model: Any) -> Any:
    """The `*ForCausalLM` under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model: Any) -> str | None:
    """Why the fast decoder cannot run `model` (None when it can)."""
    base = base_model_of(model)
    config = base.config
    if config.model_type not in SUPPORTED_TYPES:
        return f"model type {config.model_type!r} is not one of {SUPPORTED_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope type {rope!r} changes with the sequence length"
    if _linear_parts(base.model.embed_tokens)[1] is not None:
        return "LoRA on the embeddings"
    for layer in base.model.layers:
        for proj in _projections(layer):
            linear, lora = _linear_parts(proj)
            if type(linear) is not torch.nn.Linear or not linear.weight.is_floating_point():
                return f"{type(linear).__name__} layers (quantized or custom)"
            if lora is not None and lora.merged:
                return "a LoRA adapter is merged into the base weights"
    return None


def _projections(layer: Any) -> list[Any]:
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]


class PackedLinear:
    """One or more projections that read the same input, fused into one matmul.

    `parts` are the model's own weights (no copy), used for prefill and in mode `none`;
    `packed` is the fused, quantized copy used for decoding.
    """

    def __init__(self, modules: list[Any], mode: str) -> None:
        linears = [_linear_parts(m)[0] for m in modules]
        self.parts = [lin.weight for lin in linears]
        self.out_sizes = [w.shape[0] for w in self.parts]
        biases = [lin.bias for lin in linears]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat(
                [
                    b if b is not None else w.new_zeros(w.shape[0])
                    for b, w in zip(biases, self.parts, strict=True)
                ]
            )
        fused = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        self.packed = packed_weights.quantize(fused, mode)

    @property
    def kind(self) -> str:
        return self.packed.kind if self.packed is not None else str(self.parts[0].dtype)

    def __call__(self, x: torch.Tensor, lora: list[LoraTerm]) -> torch.Tensor:
        """x (M, K) -> (M, sum(out_sizes)), plus each LoRA term."""
        if self.packed is not None and x.shape[0] <= QUANT_MAX_ROWS:
            y = self.packed.matmul(x)
            if self.bias is not None:
                y = y + self.bias
        elif len(self.parts) == 1:
            y = F.linear(x, self.parts[0], self.bias)
        else:
            y = torch.cat([F.linear(x, w) for w in self.parts], dim=-1)
            if self.bias is not None:
                y = y + self.bias
        for term in lora:
            y = term.add_to(y, x)
        return y


@dataclass
class LoraTerm:
    """One adapter's low-rank update for one fused projection group.

    a: (R, K); b: (N, R) already multiplied by the LoRA scaling, block-diagonal over the fused
    projections; row_scale: (M, 1) with 1 for rows that use this adapter and 0 for others, or
    None when every row does.
    """

    a: torch.Tensor
    b: torch.Tensor
    row_scale: torch.Tensor | None = None

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = x @ self.a.t()  # (M, R)
        if self.row_scale is not None:
            t = t * self.row_scale
        return torch.addmm(y, t, self.b.t())

    def for_rows(self, row_scale: torch.Tensor | None) -> LoraTerm:
        return LoraTerm(self.a, self.b, row_scale)


def lora_term(
    modules: list[Any], adapter: str, out_sizes: list[int], dtype: torch.dtype
) -> LoraTerm | None:
    """Fuse the LoRA matrices of `adapter` over `modules` (None when it touches none of them)."""
    a_parts, blocks = [], []
    for module, n in zip(modules, out_sizes, strict=True):
        lora = _linear_parts(module)[1]
        if lora is None or adapter not in lora.lora_A:
            blocks.append((n, None))
            continue
        if lora.use_dora.get(adapter) or lora.lora_bias.get(adapter):
            raise NotImplementedError("DoRA / LoRA bias adapters run on the standard path")
        a_parts.append(lora.lora_A[adapter].weight.to(dtype))
        blocks.append((n, (lora.lora_B[adapter].weight * lora.scaling[adapter]).to(dtype)))
    if not a_parts:
        return None
    a = torch.cat(a_parts)  # (R, K)
    b = a.new_zeros(sum(out_sizes), a.shape[0])  # (N, R) block-diagonal
    row, col = 0, 0
    for n, block in blocks:
        if block is not None:
            b[row : row + n, col : col + block.shape[1]] = block
            col += block.shape[1]
        row += n
    return LoraTerm(a, b)


class PackedHead:
    """The output projection (V, C). Packed, it is read as int4 (4x fewer bytes than bf16) and
    the `RESCORE` best candidates of every row are then recomputed exactly from the model's own
    weights: exact logits where sampling happens, a 4-bit estimate only in the far tail
    (measured on the embedded model: KL to the exact head 0.001, half that of an int8 head).
    """

    def __init__(self, weight: torch.Tensor, mode: str) -> None:
        self.weight = weight
        self.packed = None
        if mode != "none":
            self.packed = packed_weights.quantize(weight, "int8" if mode == "int8" else "int4")
        if (
            mode == "auto"
            and self.packed is not None
            and not packed_weights.packed_is_faster(self.packed, weight)
        ):
            self.packed = None  # this CPU reads the plain weight faster
        self.rescore = self.packed is not None and self.packed.kind == "int4"

    @property
    def kind(self) -> str:
        if self.packed is None:
            return str(self.weight.dtype)
        return f"{self.packed.kind}+exact top-{RESCORE}" if self.rescore else self.packed.kind

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C) -> logits (B, V) float32."""
        if self.packed is None:
            return F.linear(x, self.weight).float()
        logits = self.packed.matmul(x).float()
        if self.rescore:
            candidates = logits.topk(min(RESCORE, logits.shape[-1]), dim=-1).indices  # (B, K)
            rows = self.weight[candidates]  # (B, K, C)
            exact = torch.bmm(rows, x[:, :, None]).squeeze(-1).float()  # (B, K)
            logits.scatter_(1, candidates, exact)
        return logits


@dataclass
class PackedLayer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: PackedLinear
    o: PackedLinear
    gate_up: PackedLinear
    down: PackedLinear
    modules: dict[str, list[Any]]  # group name -> the model's projection modules (for LoRA)


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (None: leave the setting alone)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class FastLlama:
    """The packed form of one Llama-family model; build once, then open a session per request.

    threads: torch intra-op threads while packing, prefilling and decoding (None: torch's
    setting). On CPU one thread is the default: a decoding step is ~500 small ops on a couple of
    rows, where a second thread adds a synchronisation per op for little work, and when the
    cores are shared (a training worker next door) OpenMP's spinning threads made steps ~6-10x
    slower and the first token ~4x later in our measurements.
    """

    @torch.no_grad()
    def __init__(self, model: Any, mode: str = "auto", threads: int | None = 1) -> None:
        if mode not in WEIGHT_MODES:
            raise ValueError(f"unknown weight mode {mode!r}; choose one of {WEIGHT_MODES}")
        reason = unsupported_reason(model)
        if reason:
            raise NotImplementedError(f"fast decoding does not support {reason}")
        self.model = model
        base = base_model_of(model)
        config = base.config
        self.device = base.lm_head.weight.device
        self.mode = "none" if mode == "auto" and self.device.type != "cpu" else mode
        self.threads = threads if self.device.type == "cpu" else None
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.max_positions = config.max_position_embeddings
        self.embed = base.model.embed_tokens.weight
        self.norm = base.model.norm.weight
        self.dtype = self.embed.dtype
        self.rotary = base.model.rotary_emb
        with intra_op_threads(self.threads):
            self.layers = [self._pack_layer(layer) for layer in base.model.layers]
            self.head = PackedHead(base.lm_head.weight, self.mode)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        kinds = sorted({lin.kind for layer in self.layers for lin in _linears(layer)})
        logger.info("fast decoder ready: weights %s, head %s", "/".join(kinds), self.head.kind)

    def rebind(self, model: Any) -> None:
        """Follow a new wrapper of the same weights (e.g. PEFT just wrapped the model to load an
        adapter): the projection modules are looked up again, the packed weights are kept."""
        reason = unsupported_reason(model)
        if reason:
            raise NotImplementedError(f"fast decoding does not support {reason}")
        layers = base_model_of(model).model.layers
        for packed, layer in zip(self.layers, layers, strict=True):
            modules = _layer_modules(layer)
            if _linear_parts(modules["qkv"][0])[0].weight is not packed.qkv.parts[0]:
                raise ValueError("rebind() needs the same base weights; build a new FastLlama")
            packed.modules = modules
        self.model = model

    def _pack_layer(self, layer: Any) -> PackedLayer:
        modules = _layer_modules(layer)
        packed = {name: PackedLinear(mods, self.mode) for name, mods in modules.items()}
        return PackedLayer(
            ln1=layer.input_layernorm.weight,
            ln2=layer.post_attention_layernorm.weight,
            modules=modules,
            **packed,
        )

    def weight_kinds(self) -> dict[str, str]:
        """Which format each projection group is packed in (for logs and benchmarks)."""
        kinds = {name: getattr(self.layers[0], name).kind for name in ("qkv", "o", "gate_up")}
        return {**kinds, "down": self.layers[0].down.kind, "head": self.head.kind}

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin, each (length, D), so that rope(x) = x*cos + roll(x, D/2)*sin."""
        if self._rope_cache is None or self._rope_cache[0].shape[0] < length:
            n = max(length, 1024)
            positions = torch.arange(n, device=self.device)[None]
            probe = torch.zeros(1, device=self.device, dtype=torch.float32)
            cos, sin = self.rotary(probe, positions)  # (1, n, D) each, includes rope scaling
            half = self.head_dim // 2
            sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(self.device)
            self._rope_cache = (cos[0].to(self.dtype), (sin[0] * sign).to(self.dtype))
        return self._rope_cache

    def session(self, row_adapters: list[str], max_len: int) -> FastSession:
        """A KV cache and LoRA terms for one batch; `row_adapters[i]` is an adapter or BASE."""
        return FastSession(self, row_adapters, max_len)

    def lora_layers(self, adapter: str) -> list[dict[str, LoraTerm]]:
        """Per layer, the fused LoRA term of `adapter` for each projection group it touches."""
        out = []
        for layer in self.layers:
            terms = {}
            for name, linear in zip(layer.modules, _linears(layer), strict=True):
                term = lora_term(layer.modules[name], adapter, linear.out_sizes, self.dtype)
                if term is not None:
                    terms[name] = term
            out.append(terms)
        return out

    def batch_lora(
        self, per_adapter: dict[str, list[dict[str, LoraTerm]]], row_adapters: list[str]
    ) -> list[dict[str, list[LoraTerm]]]:
        """Per layer and group, the LoRA terms of every adapter in a batch, masked to its rows.

        per_adapter: adapter -> `lora_layers(adapter)`; rows with BASE get no term.
        """
        steps: list[dict[str, list[LoraTerm]]] = [{} for _ in self.layers]
        for adapter, layers in per_adapter.items():
            rows = [r for r, a in enumerate(row_adapters) if a == adapter]
            if not rows:
                continue
            mask = None
            if len(rows) < len(row_adapters):
                mask = torch.zeros(len(row_adapters), 1, dtype=self.dtype, device=self.device)
                mask[rows] = 1
            for step, terms in zip(steps, layers, strict=True):
                for group, term in terms.items():
                    step.setdefault(group, []).append(term.for_rows(mask))
        return steps

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        lora: list[dict[str, list[LoraTerm]]],
        attend: Attend,
    ) -> torch.Tensor:
        """x (B, T, C) -> float32 logits of the last position (B, V).

        cos/sin broadcast against (B, T, heads, D); `attend(layer_index, q, k, v)` gets q
        (B, H, T, D) and k, v (B, KV, T, D) after the rotary embedding and returns (B, H, T, D).
        """
        b, t, c = x.shape
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (c,), layer.ln1, self.eps).view(b * t, c)
            q, k, v = self._qkv(layer, h, b, t, cos, sin, lora[i].get("qkv", []))
            attn = attend(i, q, k, v).transpose(1, 2).reshape(b * t, -1)
            x = x + layer.o(attn, lora[i].get("o", [])).view(b, t, c)
            h = F.rms_norm(x, (c,), layer.ln2, self.eps).view(b * t, c)
            gu = layer.gate_up(h, lora[i].get("gate_up", []))
            half = gu.shape[-1] // 2
            mlp = layer.down(F.silu(gu[:, :half]) * gu[:, half:], lora[i].get("down", []))
            x = x + mlp.view(b, t, c)
        last = F.rms_norm(x[:, -1], (c,), self.norm, self.eps)  # (B, C)
        return self.head(last)

    def _qkv(
        self,
        layer: PackedLayer,
        h: torch.Tensor,
        b: int,
        t: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        lora: list[LoraTerm],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, KV, T, D) for h (B*T, C), rotary embedding applied."""
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        qkv = layer.qkv(h, lora).view(b, t, -1)
        qk = qkv[..., : (nh + nkv) * d].view(b, t, nh + nkv, d)
        qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)  # rotary embedding
        v = qkv[..., (nh + nkv) * d :].view(b, t, nkv, d).transpose(1, 2)
        return qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2), v

    def new_cache(self, max_len: int) -> RowCache:
        """An empty KV cache for one answer of up to `max_len` positions."""
        if max_len > self.max_positions:
            raise ValueError(f"{max_len} positions exceed the model's {self.max_positions}")
        shape = (self.n_kv, max_len, self.head_dim)
        opts = {"dtype": self.dtype, "device": self.device}
        k = [torch.empty(shape, **opts) for _ in self.layers]
        return RowCache(k, [torch.empty(shape, **opts) for _ in self.layers])

    @torch.inference_mode()
    def prefill_chunk(
        self, cache: RowCache, input_ids: torch.Tensor, lora: list[dict[str, LoraTerm]]
    ) -> torch.Tensor:
        """Feed prompt tokens (T,) at positions cache.pos..; returns next-token logits (V,)."""
        start, t = cache.pos, input_ids.shape[0]
        end = start + t
        cos, sin = self.rope_tables(end)
        x = F.embedding(input_ids.to(self.device)[None], self.embed)  # (1, T, C)
        mask = None
        if start:  # a later chunk: its queries see the whole cached prefix and their own past
            mask = torch.arange(end, device=self.device)[None] <= start + torch.arange(t)[:, None]
        groups = self.n_heads // self.n_kv

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[i][:, start:end] = k[0]
            cache.v[i][:, start:end] = v[0]
            keys = cache.k[i][None, :, :end].repeat_interleave(groups, dim=1)
            values = cache.v[i][None, :, :end].repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, is_causal=mask is None
            )

        terms = [{g: [term] for g, term in layer.items()} for layer in lora]
        with intra_op_threads(self.threads):
            logits = self.forward(x, cos[start:end, None], sin[start:end, None], terms, attend)
        cache.pos = end
        return logits[0]

    @torch.inference_mode()
    def decode(
        self, caches: list[RowCache], tokens: torch.Tensor, lora: list[dict[str, list[LoraTerm]]]
    ) -> torch.Tensor:
        """Feed one token per row (B,), each at its own cache's position; logits (B, V)."""
        b, nkv, d = len(caches), self.n_kv, self.head_dim
        pos = [c.pos for c in caches]
        cos, sin = self.rope_tables(max(pos) + 1)
        index = torch.tensor(pos, device=self.device)
        x = F.embedding(tokens.to(self.device)[:, None], self.embed)  # (B, 1, C)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            outs = []
            for row, cache in enumerate(caches):  # rows differ in length: one attention each
                p = pos[row]
                cache.k[i][:, p] = k[row, :, 0]
                cache.v[i][:, p] = v[row, :, 0]
                grouped = q[row].reshape(nkv, -1, d)  # (KV, G, D): a group's heads attend together
                keys, values = cache.k[i][:, : p + 1], cache.v[i][:, : p + 1]
                outs.append(F.scaled_dot_product_attention(grouped, keys, values))
            return torch.stack(outs).view(b, -1, 1, d)

        with intra_op_threads(self.threads):
            logits = self.forward(
                x, cos[index][:, None, None], sin[index][:, None, None], lora, attend
            )
        for cache in caches:
            cache.pos += 1
        return logits


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RowCache:
    """One answer's KV cache: per layer k and v of shape (KV, S, D), filled up to `pos`."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int = 0

    @property
    def capacity(self) -> int:
        return int(self.k[0].shape[1])

    def copy_from(self, other: RowCache) -> None:
        """Take `other`'s filled prefix (rows that share a prompt and an adapter)."""
        for mine, theirs in zip(self.k + self.v, other.k + other.v, strict=True):
            mine[:, : other.pos] = theirs[:, : other.pos]
        self.pos = other.pos


def _layer_modules(layer: Any) -> dict[str, list[Any]]:
    """The projections of one decoder layer, grouped as they are fused."""
    a, m = layer.self_attn, layer.mlp
    return {
        "qkv": [a.q_proj, a.k_proj, a.v_proj],
        "o": [a.o_proj],
        "gate_up": [m.gate_proj, m.up_proj],
        "down": [m.down_proj],
    }


def _linears(layer: PackedLayer) -> list[PackedLinear]:
    return [layer.qkv, layer.o, layer.gate_up, layer.down]


class FastSession:
    """One generation request: rows share the prompt; each row may use its own adapter."""

    def __init__(self, fast: FastLlama, row_adapters: list[str], max_len: int) -> None:
        if max_len > fast.max_positions:
            raise ValueError(f"{max_len} positions exceed the model's {fast.max_positions}")
        self.fast = fast
        self.rows = len(row_adapters)
        shape = (self.rows, fast.n_kv, max_len, fast.head_dim)
        opts = {"dtype": fast.dtype, "device": fast.device}
        self.k_cache = [torch.empty(shape, **opts) for _ in fast.layers]  # (B, KV, S, D) each
        self.v_cache = [torch.empty(shape, **opts) for _ in fast.layers]
        self.cos, self.sin = fast.rope_tables(max_len)
        self.groups: dict[str, list[int]] = {}
        for row, adapter in enumerate(row_adapters):
            self.groups.setdefault(adapter, []).append(row)
        self.group_lora = {a: fast.lora_layers(a) for a in self.groups if a != BASE}
        self.step_lora = fast.batch_lora(self.group_lora, row_adapters)
        self.pos = 0

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (T,) once per adapter group; returns next-token logits (B, V) float32."""
        n = input_ids.shape[0]
        logits = torch.empty(self.rows, self.fast.head.weight.shape[0], device=self.fast.device)
        empty: list[dict[str, list[LoraTerm]]] = [{} for _ in self.fast.layers]
        for adapter, rows in self.groups.items():
            lora = empty
            if adapter != BASE:
                lora = [{g: [t] for g, t in terms.items()} for terms in self.group_lora[adapter]]
            x = F.embedding(input_ids.to(self.fast.device)[None], self.fast.embed)  # (1, T, C)
            with intra_op_threads(self.fast.threads):
                logits[rows] = self._forward(x, 0, lora, rows)
        self.pos = n
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns next-token logits (B, V) float32."""
        x = F.embedding(tokens.to(self.fast.device)[:, None], self.fast.embed)  # (B, 1, C)
        with intra_op_threads(self.fast.threads):
            logits = self._forward(x, self.pos, self.step_lora, None)
        self.pos += 1
        return logits

    def _forward(
        self,
        x: torch.Tensor,
        start: int,
        lora: list[dict[str, list[LoraTerm]]],
        cache_rows: list[int] | None,
    ) -> torch.Tensor:
        """x (B, T, C) at positions start.. -> float32 logits of the last position (B, V)."""
        t = x.shape[1]
        cos, sin = self.cos[start : start + t, None], self.sin[start : start + t, None]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._attention(i, q, k, v, start, cache_rows)

        return self.fast.forward(x, cos, sin, lora, attend)

    def _attention(
        self,
        i: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int,
        cache_rows: list[int] | None,
    ) -> torch.Tensor:
        """Self-attention of q (B, H, T, D) over the cache after writing k, v (B, KV, T, D)."""
        b, nh, t, d = q.shape
        nkv = self.fast.n_kv
        end = start + t
        if cache_rows is None:  # decoding one token: the query heads of a KV group attend
            # together, as a "sequence" of G queries at the same position (no mask needed)
            self.k_cache[i][:, :, start:end] = k
            self.v_cache[i][:, :, start:end] = v
            keys, values = self.k_cache[i][:, :, :end], self.v_cache[i][:, :, :end]
            grouped = q.reshape(b, nkv, nh // nkv, d)  # t == 1
            return F.scaled_dot_product_attention(grouped, keys, values).view(b, nh, 1, d)
        for row in cache_rows:  # prefill from position 0 for one adapter group
            self.k_cache[i][row, :, start:end] = k[0]
            self.v_cache[i][row, :, start:end] = v[0]
        keys = k.repeat_interleave(nh // nkv, dim=1)
        values = v.repeat_interleave(nh // nkv, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
