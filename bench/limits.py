"""The shared decode loop's limits, measured: `--max-rows` and `--max-prompt-tokens`.

    .venv/bin/python bench/limits.py [--rows 2,4,8,16,32] [--tokens 256,...,7000] [--runs 3]

The app's own path: the embedded model, `AnswerGenerator` as `python -m app` builds it, one
`GenerationEngine`. Medians of `--runs`, sizes interleaved within each run so that load changes
hit every size alike; each table's baseline is its first size, in the same run.

- rows: R answers of `--new-tokens` tokens each to one short prompt, decoded together: the
  generated tokens per second of the whole batch. Decoding reads every weight once per step
  whatever the rows, so throughput grows with rows until compute, not memory, is the limit;
  `--max-rows` should sit where it stops growing.
- prompt tokens: one answer of one token to a prompt of about N tokens: the prefill (chunked as
  the engine chunks it) plus one step. The largest N within `--budget` seconds is the longest
  prompt one person can send before the others notice.
- a long prompt beside others (`--long-prompt N`): 8 rows decode 400-token answers; after 6 s
  one more request sends an N-token prompt. The others' generated tokens/s while it prefills
  against before it arrived (the baseline, same run): the engine alternates prefill and decode
  steps by time, so the others should keep about half their pace or more, not stop.

A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.concurrency import long_prompt
from bench.harness import peak_rss_mib
from dpo_core.engine import EngineLimits, GenerationEngine, Ticket
from dpo_core.generation import (
    AnswerGenerator,
    AnswerSpec,
    GenerationUpdate,
    SamplingParams,
    chat_input_ids,
)
from dpo_core.modeling import load_model

SHORT_PROMPT = "Write a short story about a robot who learns to paint."


def prompt_of(tokenizer: object, tokens: int) -> str:
    """A prompt whose chat rendering has about `tokens` tokens."""
    chars = tokens * 4
    while True:
        text = long_prompt(chars)
        n = chat_input_ids(tokenizer, text).shape[1]
        if n >= tokens:
            return text
        chars = int(chars * tokens / n) + 64


def time_one(engine: GenerationEngine, prompt: str, seed: int) -> float:
    """Seconds to prefill `prompt` and sample one token."""
    spec = AnswerSpec(SamplingParams(temperature=0.0, max_new_tokens=1), seed=seed)
    t0 = time.perf_counter()
    engine.generate(prompt, [spec])
    return time.perf_counter() - t0


def rows_table(engine: GenerationEngine, sizes: list[int], new: int, runs: int) -> None:
    times: dict[int, list[float]] = {n: [] for n in sizes}
    tokens: dict[int, list[int]] = {n: [] for n in sizes}
    for run in range(runs):
        for n in sizes:
            params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=new)
            specs = [AnswerSpec(params, seed=run * 100 + r) for r in range(n)]
            t0 = time.perf_counter()
            update = engine.generate(SHORT_PROMPT, specs)
            times[n].append(time.perf_counter() - t0)
            tokens[n].append(sum(a.token_count for a in update.answers))
    rate = {
        n: statistics.median(t / s for t, s in zip(tokens[n], times[n], strict=True)) for n in sizes
    }
    print("| rows decoded together | generated tokens/s, median | x the first |")
    print("|---|---|---|")
    for n in sizes:
        print(f"| {n} | {rate[n]:.1f} | {rate[n] / rate[sizes[0]]:.2f} |")


def long_prompt_share(engine: GenerationEngine, tokenizer: object, tokens: int) -> None:
    """The others' tokens/s before and while a `tokens`-token prompt prefills beside them."""
    stamps: list[tuple[float, str, int]] = []  # (time, whose, new tokens)

    def watch(ticket: Ticket, whose: str) -> None:
        seen = 0
        for event in ticket.updates():
            if isinstance(event, GenerationUpdate):
                n = sum(a.token_count for a in event.answers)
                stamps.append((time.perf_counter(), whose, n - seen))
                seen = n

    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=400)
    tickets = [
        engine.submit(SHORT_PROMPT, [AnswerSpec(params, seed=2 * i + r) for r in range(2)])
        for i in range(4)
    ]
    threads = [threading.Thread(target=watch, args=(t, "others")) for t in tickets]
    for t in threads:
        t.start()
    time.sleep(6)
    arrived = time.perf_counter()
    long = engine.submit(
        prompt_of(tokenizer, tokens), [AnswerSpec(SamplingParams(max_new_tokens=4))]
    )
    threads.append(threading.Thread(target=watch, args=(long, "long")))
    threads[-1].start()
    for t in threads:
        t.join()
    prefilled = min(t for t, whose, _ in stamps if whose == "long")
    start = min(t for t, _, _ in stamps) + 1  # after the others' own prefill

    def rate(a: float, b: float) -> float:
        n = sum(k for t, whose, k in stamps if whose == "others" and a <= t < b)
        return n / (b - a)

    before, during = rate(start, arrived), rate(arrived, prefilled)
    took = prefilled - arrived
    head = f"while a {tokens}-token prompt prefills ({took:.0f} s)"
    print(f"| others' tokens/s before | {head} | ratio |")
    print("|---|---|---|")
    print(f"| {before:.1f} | {during:.1f} | {during / before:.2f} |")


def prefill_table(
    engine: GenerationEngine, tokenizer: object, sizes: list[int], runs: int, budget: float
) -> None:
    prompts = {n: prompt_of(tokenizer, n) for n in sizes}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for run in range(runs):
        for n in sizes:
            times[n].append(time_one(engine, prompts[n], run))
    base = statistics.median(times[sizes[0]])
    print("| prompt tokens | prefill + 1 token, median s | prompt tokens/s | x the first |")
    print("|---|---|---|---|")
    for n in sizes:
        med = statistics.median(times[n])
        print(f"| {n} | {med:.2f} | {n / med:.0f} | {med / base:.1f} |")
    within = [n for n in sizes if statistics.median(times[n]) <= budget]
    print(f"\nlongest prompt prefilled within {budget:.0f} s: {max(within, default=0)} tokens")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--rows", default="2,4,8,16,32", help="batch sizes to decode")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per answer, rows table")
    p.add_argument("--tokens", default="256,512,1024,2048,4096,7000", help="prompt sizes")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--budget", type=float, default=5.0, help="seconds a prefill may take")
    p.add_argument("--threads", type=int, default=1, help="decoder threads (the app uses 1)")
    p.add_argument("--long-prompt", type=int, default=7000, help="tokens; 0: skip that table")
    args = p.parse_args(argv)
    lm = load_model(args.model)
    rows = [int(n) for n in args.rows.split(",")]
    limits = EngineLimits(max_rows=max(rows), max_cached_tokens=1 << 20)
    engine = GenerationEngine(AnswerGenerator(lm, threads=args.threads), limits=limits)
    try:
        time_one(engine, SHORT_PROMPT, 0)  # warm-up
        rows_table(engine, rows, args.new_tokens, args.runs)
        print()
        sizes = [int(n) for n in args.tokens.split(",")]
        prefill_table(engine, lm.tokenizer, sizes, args.runs, args.budget)
        if args.long_prompt:
            print()
            long_prompt_share(engine, lm.tokenizer, args.long_prompt)
    finally:
        engine.close()
    print(f"peak RSS {peak_rss_mib(os.getpid()):.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
