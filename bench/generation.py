"""Paired generation on the embedded model: naive baseline vs DPO Studio's AnswerGenerator.

    .venv/bin/python bench/generation.py [--runs 5] [--tokens 128] [--threads N]

Measured side by side in one process, runs interleaved so that machine load hits every variant
alike; medians over the runs. Every variant produces exactly `--tokens` tokens per answer
(end-of-sequence is ignored) for the same prompt:

- naive:   two sequential fp32 `model.generate` calls (one per pane), sampling;
- batched: one bf16 `model.generate` call with num_return_sequences=2 (reference point);
- ours:    `AnswerGenerator.stream` (bf16 model, fast decoder, packed weights), both panes
           in one batch, streamed.

Time to first token is until *both* panes show a token. Peak RSS covers the whole process
(both model copies are resident).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_core.generation import AnswerGenerator, AnswerSpec, SamplingParams, chat_input_ids
from dpo_core.modeling import load_model

PROMPT = "Write a short story about a robot who learns to paint."
TEMPERATURE, TOP_P = 0.8, 0.95


class FirstTokenTimer:
    """A `generate` streamer that records when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_naive(lm: Any, tokens: int) -> tuple[float, float]:
    ids = chat_input_ids(lm.tokenizer, PROMPT)
    t0 = time.perf_counter()
    first = 0.0
    for pane in range(2):
        timer = FirstTokenTimer()
        torch.manual_seed(pane)
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            pad_token_id=lm.tokenizer.pad_token_id,
            streamer=timer,
        )
        assert out.shape[1] - ids.shape[1] == tokens
        first = timer.first - t0  # the second pane's first token
    return time.perf_counter() - t0, first


def run_batched(lm: Any, tokens: int) -> tuple[float, float]:
    ids = chat_input_ids(lm.tokenizer, PROMPT)
    timer = FirstTokenTimer()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=TEMPERATURE,
        top_p=TOP_P,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        num_return_sequences=2,
        pad_token_id=lm.tokenizer.pad_token_id,
        streamer=timer,
    )
    return time.perf_counter() - t0, timer.first - t0


def run_ours(generator: AnswerGenerator, tokens: int, run: int) -> tuple[float, float]:
    params = SamplingParams(TEMPERATURE, TOP_P, tokens)
    specs = [AnswerSpec(params, seed=2 * run), AnswerSpec(params, seed=2 * run + 1)]
    t0 = time.perf_counter()
    first = None
    for update in generator.stream(PROMPT, specs):  # noqa: B007 (the last one is checked)
        if first is None:
            first = time.perf_counter() - t0
    assert update.token_counts == [tokens, tokens], update.token_counts
    return time.perf_counter() - t0, first


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--weights", default="auto", help="AnswerGenerator weight mode")
    parser.add_argument("--skip-batched", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rss0 = rss_mb()
    naive_lm = load_model("embedded", device="cpu", dtype="fp32")
    rss1 = rss_mb()
    lm = load_model("embedded", device="cpu", dtype="auto")
    t0 = time.perf_counter()
    generator = AnswerGenerator(lm, weights=args.weights)
    pack_s = time.perf_counter() - t0
    generator.stop_ids = set()  # exactly --tokens per answer, like min_new_tokens below
    rss2 = rss_mb()
    kinds = generator.fast.weight_kinds() if generator.fast else {"engine": "standard"}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model dtype {lm.dtype}")
    print("load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    threads = generator.fast.threads if generator.fast else None
    print(f"ours: weights {kinds}; packing took {pack_s:.1f} s; its threads {threads}")
    print(f"RSS: start {rss0:.0f} MB, +fp32 model {rss1 - rss0:.0f} MB, ", end="")
    print(f"+{lm.dtype} model and packed weights {rss2 - rss1:.0f} MB")

    variants = {"naive": lambda r: run_naive(naive_lm, args.tokens)}
    if not args.skip_batched:
        variants["batched"] = lambda r: run_batched(lm, args.tokens)
    variants["ours"] = lambda r: run_ours(generator, args.tokens, r)
    for fn in variants.values():  # warm-up
        fn(-1)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for r in range(args.runs):
        for name, fn in variants.items():
            results[name].append(fn(r))
            total, first = results[name][-1]
            print(f"  run {r + 1}/{args.runs} {name:8s} {total:6.2f} s  first token {first:.3f} s")

    naive_total = statistics.median(t for t, _ in results["naive"])
    print(f"\npair of {args.tokens}-token answers, medians of {args.runs} runs:")
    print(f"{'variant':8s} {'total s':>8s} {'first token':>12s} {'tokens/s':>9s} {'speed-up':>9s}")
    for name, runs in results.items():
        total = statistics.median(t for t, _ in runs)
        first = statistics.median(f for _, f in runs)
        tps = 2 * args.tokens / total
        print(f"{name:8s} {total:8.2f} {first:12.3f} {tps:9.1f} {naive_total / total:8.1f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")
    print("load average at end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
