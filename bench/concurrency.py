"""Many annotators, one model: the shared decode loop against today's one-at-a-time line.

    .venv/bin/python bench/concurrency.py                       # embedded model, 1..16 annotators
    .venv/bin/python bench/concurrency.py --seconds 30 --read 4 --annotators 1,4,8

For each serving mode (`serial`: `--serial-generation --no-prefetch`, the baseline;
`batched`: the decode loop without prefetch; `prefetch`: the loop with prefetch, the default
app) the app runs as `make run` would run it (a real `python -m app` process), and for each N
simulated annotators each loop: ask the next queue pair (streamed, as the page does), read R
seconds, vote (`POST /api/vote`), for T seconds. Printed per mode and N: time from the vote to
the next complete pair (p50, p95), first token after asking (p50, p95), pairs per minute (all
annotators together), generated tokens per second, and the app's peak RSS so far. With
`--long-prompt CHARS` each level runs again beside one more client that asks for answers to a
CHARS-character prompt back to back; its rows are the annotators' figures only.
With `--backend vllm` the same levels run once more (mode `vllm`: the default app, prefetch on)
with every answer written by a vLLM server serving the same model (`--generation-url`; the
server from .venv-vllm, as the tests start it: `make .venv-vllm/.stamp` installs it):

    .venv/bin/python bench/concurrency.py --backend vllm --modes prefetch --annotators 1,4,8 \
        --read 0
A benchmark, not a test: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness
from bench.label_api import LabelApi

MODES = {
    "serial": ["--serial-generation", "--no-prefetch"],
    "batched": ["--no-prefetch"],
    "prefetch": [],
}


@dataclass
class Log:
    """One annotator's timings (seconds)."""

    name: str
    vote_to_pair: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    tokens: int = 0
    pairs: int = 0
    errors: list[str] = field(default_factory=list)


def ask_pair(client: Any, name: str, typed: str | None = None) -> tuple[dict[str, Any], float]:
    """Stream a pair (the next queue prompt, or `typed`); returns the final pair and the
    first token's delay."""
    t0 = time.perf_counter()
    first = None
    final: dict[str, Any] | None = None
    job = client.submit(typed, name, api_name="/generate_pair")
    for pair in job:
        if first is None and any(a["num_tokens"] for a in pair.get("answers") or []):
            first = time.perf_counter() - t0
        final = pair
    final = job.outputs()[-1] if job.outputs() else final
    if not final or not final.get("done"):
        raise RuntimeError("the pair did not complete")
    return final, first if first is not None else time.perf_counter() - t0


def annotate(
    url: str, log: Log, clock: dict[str, float], read_s: float, ready: threading.Barrier
) -> None:
    """Connect, wait for everyone, then ask / read / vote until the clock's deadline."""
    from gradio_client import Client

    client = Client(url, verbose=False, httpx_kwargs={"timeout": 300})
    label = LabelApi(client)
    ready.wait()
    ready.wait()  # the deadline is set between the two
    deadline = clock["deadline"]
    voted_at = time.perf_counter()
    while time.monotonic() < deadline:
        try:
            pair, first = ask_pair(client, log.name)
        except Exception as err:
            log.errors.append(f"{type(err).__name__}: {err}")
            continue
        log.vote_to_pair.append(time.perf_counter() - voted_at)
        log.first_token.append(first)
        log.tokens += sum(a["num_tokens"] for a in pair["answers"])
        log.pairs += 1
        time.sleep(read_s)
        voted_at = time.perf_counter()
        ids = tuple(a["response_id"] for a in pair["answers"])
        try:
            label.vote(ids, "a", annotator=log.name)
        except Exception as err:
            log.errors.append(f"vote: {type(err).__name__}: {err}")


def send_long(
    url: str, log: Log, clock: dict[str, float], chars: int, ready: threading.Barrier
) -> None:
    """The long-prompt client: ask pairs for a `chars`-character typed prompt (cut by the app
    to its prompt limit, as designed) back to back until the deadline."""
    from gradio_client import Client

    client = Client(url, verbose=False, httpx_kwargs={"timeout": 900})
    text = long_prompt(chars)
    ready.wait()
    ready.wait()
    while time.monotonic() < clock["deadline"]:
        try:
            pair, first = ask_pair(client, log.name, typed=text)
        except Exception as err:
            log.errors.append(f"{type(err).__name__}: {err}")
            return
        log.first_token.append(first)
        log.tokens += sum(a["num_tokens"] for a in pair["answers"])
        log.pairs += 1


def long_prompt(chars: int) -> str:
    """A context-filling prompt: varied sentences (not one repeated token), then a question."""
    w = [
        "the",
        "river",
        "city",
        "market",
        "bridge",
        "winter",
        "garden",
        "letter",
        "station",
        "music",
        "harbour",
        "lamp",
    ]
    lines, size, i = [], 0, 0
    while size < chars:
        lines.append(f"Note {i}: the {w[i % 12]} near the {w[i * 7 % 12]} was {i % 97} steps away.")
        size += len(lines[-1]) + 1
        i += 1
    return "\n".join(lines)[:chars] + "\nSummarise the notes above in two sentences."


def run_level(
    url: str, n: int, seconds: float, read_s: float, long_chars: int = 0
) -> tuple[list[Log], float]:
    """N annotators for `seconds`; with `long_chars`, one more client sends a long prompt
    meanwhile (its log is the last one returned)."""
    logs = [Log(f"ann{n:02d}-{i:02d}") for i in range(n)]
    ready = threading.Barrier(n + 1 + (1 if long_chars else 0))
    clock: dict[str, float] = {}

    threads = [
        threading.Thread(target=annotate, args=(url, log, clock, read_s, ready)) for log in logs
    ]
    if long_chars:
        logs.append(Log("long-prompt"))
        threads.append(
            threading.Thread(target=send_long, args=(url, logs[-1], clock, long_chars, ready))
        )
    for t in threads:
        t.start()
    ready.wait()  # everyone is connected
    t0 = time.monotonic()
    clock["deadline"] = t0 + seconds
    ready.wait()
    for t in threads:
        t.join()
    return logs, time.monotonic() - t0


def row(mode: str, n: int, logs: list[Log], wall_s: float, rss: float) -> str:
    def pct(values: list[float], q: float) -> str:
        return f"{harness.percentile(values, q):.2f}" if values else "-"

    waits = [v for log in logs for v in log.vote_to_pair[1:]]  # the first pair has no vote
    firsts = [v for log in logs for v in log.first_token]
    pairs, tokens = sum(log.pairs for log in logs), sum(log.tokens for log in logs)
    errors = sum(len(log.errors) for log in logs)
    return (
        f"| {mode} | {n} | {pct(waits, 50)} | {pct(waits, 95)} | {pct(firsts, 50)} | "
        f"{pct(firsts, 95)} | {pairs / wall_s * 60:.1f} | {tokens / wall_s:.1f} | {rss:.0f} | "
        f"{errors} |"
    )


def run_mode(
    mode: str, args: argparse.Namespace, levels: list[int], flags: list[str] | None = None
) -> list[str]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"concurrency-{mode}-"))
    flags = MODES[mode] if flags is None else flags
    app = harness.start_app(args.model, data_dir, *flags, *args.app_args)
    rows = []
    try:
        from gradio_client import Client

        ask_pair(Client(app.url, verbose=False), "warm-up")  # first-call costs out of the way
        scenarios = [(n, 0) for n in levels] if not args.only_long else []
        scenarios += [(n, args.long_prompt) for n in levels if args.long_prompt]
        for n, long_chars in scenarios:
            logs, wall = run_level(app.url, n, args.seconds, args.read, long_chars)
            rss = harness.peak_rss_mib(app.proc.pid)
            label = f"{mode} + long prompt" if long_chars else mode
            rows.append(row(label, n, logs[:n], wall, rss))
            print(rows[-1], flush=True)
            for log in logs:
                for err in log.errors[:2]:
                    print(f"  {log.name}: {err}", flush=True)
            if long_chars:
                print(f"  the long-prompt client: {describe_long(logs[-1])}", flush=True)
    finally:
        app.stop()
    return rows


def run_vllm(args: argparse.Namespace, levels: list[int]) -> list[str]:
    """The levels with answers from a vLLM server serving `args.model` (its safetensors
    directory: the embedded model's cache), started here on loopback."""
    from dpo_core.modeling import resolve_source
    from tests.vllm_server import VllmServer

    log = Path(tempfile.mkdtemp(prefix="concurrency-vllm-")) / "vllm.log"
    server = VllmServer(Path(resolve_source(args.model)), log, kv_cache_gib=2)
    server.start()
    print(f"\nvllm: server up in {server.start_s[0]:.0f} s (log {log})", flush=True)
    try:
        return run_mode("vllm", args, levels, ["--generation-url", server.url])
    finally:
        server.stop()


def describe_long(log: Log) -> str:
    if not log.first_token:
        return "no pair completed within the level's time"
    firsts = ", ".join(f"{v:.1f}" for v in log.first_token)
    return f"{log.pairs} pairs, first token after {firsts} s (its prefill, in line)"


HEADER = (
    "| mode | annotators | vote to next pair p50 s | p95 s | first token p50 s | p95 s | "
    "pairs/min | generated tokens/s | peak RSS MiB | errors |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded, tiny (the tests' model), a dir")
    p.add_argument("--annotators", default="1,2,4,8,16", help="comma-separated levels")
    p.add_argument("--seconds", type=float, default=60.0, help="T: seconds per level")
    p.add_argument("--read", type=float, default=8.0, help="R: seconds reading each pair")
    p.add_argument("--modes", default="serial,batched,prefetch")
    p.add_argument(
        "--long-prompt",
        type=int,
        default=0,
        metavar="CHARS",
        help="also run each level with one more client sending a CHARS-character prompt "
        "(e.g. 100000: cut to the app's prompt limit) back to back",
    )
    p.add_argument("--only-long", action="store_true", help="only the --long-prompt levels")
    p.add_argument(
        "--backend",
        choices=("app", "vllm"),
        default="app",
        help="vllm: after --modes, the same levels with a vLLM server writing every answer",
    )
    p.add_argument("app_args", nargs="*", help="extra `python -m app` flags (after --)")
    args = p.parse_args(argv)
    levels = [int(n) for n in args.annotators.split(",")]
    if args.model == "tiny":
        args.model = str(harness.tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        print(f"\n{mode}: python -m app {' '.join(MODES[mode])}", flush=True)
        rows += run_mode(mode, args, levels)
    if args.backend == "vllm":
        rows += run_vllm(args, levels)
    print("\n" + HEADER)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
