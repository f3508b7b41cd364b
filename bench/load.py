"""Many annotators at once: N signed-in clients each generate a pair and vote, in a loop.

    .venv/bin/python bench/load.py                          # 16 annotators, 120 s, tiny model
    .venv/bin/python bench/load.py --annotators 4 --seconds 20
    .venv/bin/python bench/load.py --replicas 2             # one replica, then two, same run

The app runs as a real process (`python -m app` with sign-in on) on the tests' tiny model;
each annotator is a `gradio_client.Client` in its own thread (or process, `--processes`):
it streams a pair from `/generate_pair` and votes with `POST /api/vote` (`--vote-via gradio`:
through Gradio's queued `/vote` endpoint instead, the comparison). Afterwards the database (a
fresh connection) is compared with the clients' log of acknowledged votes: lost votes
(acknowledged, not stored), duplicated votes (stored twice), and votes stored without an
acknowledgement (the client gave up first) are counted.
Also printed: every HTTP status the clients received (5xx counted), vote-recording latency
percentiles (client round trip) under load and, as the baseline measured in the same run, with
a single annotator; generation latency; throughput; the app's peak memory.

Targets (issue 7): 0 lost, 0 duplicated, 0 5xx, p99 vote latency < 100 ms under 16 annotators.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness
from bench.label_api import LabelApi

TARGET_P99_MS = 100.0


@dataclass
class Log:
    """One annotator's client-side record."""

    name: str
    acked: list[tuple[str, str]] = field(default_factory=list)  # (prompt, choice)
    vote_s: list[float] = field(default_factory=list)
    generate_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    codes: dict[int, int] = field(default_factory=dict)  # HTTP statuses (process mode)


def connect(url: str, name: str, password: str, log: Log) -> LabelApi | None:
    from gradio_client import Client

    try:  # sign in, read the config and API description (slow while 16 sign in at once)
        client = Client(url, auth=(name, password), verbose=False, httpx_kwargs={"timeout": 120})
        return LabelApi(client)
    except Exception as err:
        log.errors.append(f"connect: {type(err).__name__}: {err}")
        return None


def annotate(
    label: LabelApi, deadline: float, log: Log, seed: int, phase: str, via: str = "api"
) -> None:
    """Generate a pair, vote, repeat until `deadline`; every outcome goes into `log`."""
    rng = random.Random(seed)
    i = 0
    while time.monotonic() < deadline:
        prompt = f"[{phase} {log.name} #{i}] Name a colour and say why in one sentence."
        i += 1
        try:
            t0 = time.perf_counter()
            pair = label.generate(prompt)
            log.generate_s.append(time.perf_counter() - t0)
        except Exception as err:
            log.errors.append(f"generate: {type(err).__name__}: {err}")
            continue
        choice = rng.choice(["a", "b", "a", "b", "tie", "both_bad"])
        try:
            t0 = time.perf_counter()
            (label.vote if via == "api" else label.vote_gradio)(pair, choice)
            log.vote_s.append(time.perf_counter() - t0)
            log.acked.append((prompt, choice))
        except Exception as err:
            log.errors.append(f"vote: {type(err).__name__}: {err}")


def run_phase(
    urls: list[str], accounts: dict[str, str], seconds: float, phase: str, via: str = "api"
) -> list[Log]:
    """All annotators sign in first; the clock starts when every one of them is connected.
    Annotator i uses replica `urls[i % len(urls)]` throughout (as a sticky proxy does)."""
    logs = [Log(name) for name in accounts]
    connected = threading.Barrier(len(logs) + 1)
    go = threading.Event()
    clock: dict[str, float] = {}

    def worker(log: Log, seed: int) -> None:
        label = connect(urls[seed % len(urls)], log.name, accounts[log.name], log)
        connected.wait()
        go.wait()
        if label is not None:
            annotate(label, clock["deadline"], log, seed, phase, via)

    threads = [threading.Thread(target=worker, args=(log, i)) for i, log in enumerate(logs)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    connected.wait()
    print(f"\n{phase}: {len(logs)} annotator(s) signed in after {time.monotonic() - t0:.1f} s")
    clock["deadline"] = time.monotonic() + seconds
    go.set()
    for t in threads:
        t.join()
    return logs


def _process_worker(
    url: str,
    name: str,
    password: str,
    seed: int,
    phase: str,
    seconds: float,
    sync: Any,
    via: str = "api",
) -> None:
    """One annotator in its own process (as a browser would be): no GIL shared with the others."""
    barrier, go, conn = sync
    http = harness.HttpStatus().install()
    log = Log(name)
    label = connect(url, name, password, log)
    barrier.wait()
    go.wait()
    if label is not None:
        annotate(label, time.monotonic() + seconds, log, seed, phase, via)
    log.codes = dict(http.codes)
    conn.send(log)
    conn.close()


def run_phase_processes(
    urls: list[str], accounts: dict[str, str], seconds: float, phase: str, via: str = "api"
) -> list[Log]:
    """`run_phase` with one process per annotator (fork)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, go = ctx.Barrier(len(accounts) + 1), ctx.Event()
    procs, conns = [], []
    for i, (name, password) in enumerate(accounts.items()):
        parent, child = ctx.Pipe(duplex=False)
        args = (urls[i % len(urls)], name, password, i, phase, seconds, (barrier, go, child), via)
        procs.append(ctx.Process(target=_process_worker, args=args))
        conns.append(parent)
    t0 = time.monotonic()
    for proc in procs:
        proc.start()
    barrier.wait()
    print(f"\n{phase}: {len(procs)} annotator process(es) signed in after "
          f"{time.monotonic() - t0:.1f} s")  # fmt: skip
    go.set()
    logs = [conn.recv() for conn in conns]
    for proc in procs:
        proc.join()
    return logs


def compare_with_db(logs: list[Log], db_url: str) -> dict[str, int]:
    stored = Counter((v.annotator, v.prompt) for v in harness.stored_votes(db_url))
    acked = Counter((log.name, prompt) for log in logs for prompt, _ in log.acked)
    names = {log.name for log in logs}
    ours = Counter({k: n for k, n in stored.items() if k[0] in names})
    return {
        "acknowledged": sum(acked.values()),
        "stored": sum(ours.values()),
        "lost": sum(1 for k in acked if k not in ours),
        "duplicated": sum(n - 1 for n in ours.values() if n > 1),
        "stored_unacknowledged": sum(1 for k in ours if k not in acked),
    }


def ms(values: list[float], q: float) -> str:
    return f"{1000 * harness.percentile(values, q):8.1f}"


def report_latency(title: str, logs: list[Log], seconds: float) -> list[float]:
    votes = [v for log in logs for v in log.vote_s]
    gens = [g for log in logs for g in log.generate_s]
    print(f"{title}: {len(logs)} annotator(s), {seconds:.0f} s")
    print(f"  pairs generated {len(gens)}, votes acknowledged {len(votes)}, "
          f"{len(votes) / seconds:.1f} votes/s")  # fmt: skip
    print("  latency ms        p50      p90      p99      max")
    print(f"  vote          {ms(votes, 50)} {ms(votes, 90)} {ms(votes, 99)} {ms(votes, 100)}")
    print(f"  generate pair {ms(gens, 50)} {ms(gens, 90)} {ms(gens, 99)} {ms(gens, 100)}")
    errors = Counter(e[:160] for log in logs for e in log.errors)
    for text, n in errors.most_common(5):
        print(f"  error x{n}: {text}")
    return votes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--annotators", type=int, default=16)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--baseline-seconds", type=float, default=20.0)
    p.add_argument("--model", default=None, help="default: the tests' tiny random model")
    p.add_argument(
        "--processes",
        action="store_true",
        help="one client process per annotator (as separate browsers are), not threads "
        "sharing one Python process",
    )
    p.add_argument(
        "--vote-via",
        choices=("api", "gradio"),
        default="api",
        help="api: POST /api/vote (the default); gradio: Gradio's queued /vote endpoint",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="app processes on one data directory and database; with 2 or more, the load "
        "runs on one replica, then spread over all of them (annotator i on replica i mod N)",
    )
    p.add_argument("--db", default=None, help="database URL for every replica (default SQLite)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="dpo-load-"))
    model = args.model or str(harness.tiny_model(work / "tiny-model"))
    accounts = harness.make_users(work / "users.toml", args.annotators)
    annotators = {k: v for k, v in accounts.items() if k != harness.ADMIN}
    extra = ["--db", args.db] if args.db else []
    apps = [
        harness.serve(model, work / "data", work / "users.toml", *extra)
        for _ in range(args.replicas)
    ]
    urls = [app.url for app in apps]
    http = harness.HttpStatus().install()
    print(f"apps {urls}, model {model}, data {work / 'data'}")
    phases = [("load", urls[:1])] + (
        [(f"load-{len(urls)}-replicas", urls)] if len(urls) > 1 else []
    )
    try:
        first = dict([next(iter(annotators.items()))])
        base_logs = run_phase(urls[:1], first, args.baseline_seconds, "baseline", args.vote_via)
        base_votes = report_latency("baseline", base_logs, args.baseline_seconds)
        all_logs = list(base_logs)
        phase = run_phase_processes if args.processes else run_phase
        for name, on in phases:
            load_logs = phase(on, annotators, args.seconds, name, args.vote_via)
            for log in load_logs:
                http.codes.update(log.codes)
            load_votes = report_latency(f"{name} ({len(on)} replica(s))", load_logs, args.seconds)
            all_logs += load_logs
        peak = max(harness.peak_rss_mib(app.proc.pid) for app in apps)
    finally:
        http.uninstall()
        for app in apps:
            app.stop()
    counts = compare_with_db(all_logs, args.db or apps[0].db_url)  # every phase's votes
    return report(counts, http, load_votes, base_votes, peak)


def report(
    counts: dict[str, int],
    http: harness.HttpStatus,
    load_votes: list[float],
    base_votes: list[float],
    peak: float,
) -> int:
    """Print the database check and the latency figures; 0 when every target is met."""
    p99 = 1000 * harness.percentile(load_votes, 99)
    ratio = harness.percentile(load_votes, 50) / harness.percentile(base_votes, 50)
    print("\ndatabase vs client log (fresh connection after the app stopped):")
    for key, value in counts.items():
        print(f"  {key:22s} {value}")
    print(f"HTTP statuses seen by the clients: {dict(sorted(http.codes.items()))}")
    print(f"5xx responses: {http.server_errors}")
    print(f"vote p50 under load / single annotator: {ratio:.2f}x "
          f"(medians {1000 * statistics.median(load_votes):.1f} ms vs "
          f"{1000 * statistics.median(base_votes):.1f} ms)")  # fmt: skip
    print(f"app peak RSS: {peak:.0f} MiB")
    print(f"machine: {os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f}")
    ok = (
        counts["lost"] == 0
        and counts["duplicated"] == 0
        and http.server_errors == 0
        and p99 < TARGET_P99_MS
    )
    print(f"\nTARGETS: lost 0, duplicated 0, 5xx 0, vote p99 < {TARGET_P99_MS:.0f} ms "
          f"(measured {p99:.1f} ms): {'MET' if ok else 'NOT MET'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
