"""Many writers at once: every vote lands exactly once, nobody sees "database is locked"."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Preference, TrainingRun
from storage.repo import add_prompt, record_preference, record_response, store_stats
from storage.runs import RunStateError, create_run, ensure_base_version

THREADS = 8
VOTES_PER_THREAD = 200


def run_threads(n: int, work: Callable[[int], None]) -> list[BaseException]:
    """Start `n` threads together on `work(i)`; return what they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def target(i: int) -> None:
        barrier.wait()
        try:
            work(i)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    return errors


def test_concurrent_votes_land_exactly_once(db: sessionmaker[Session]):
    with db.begin() as session:
        prompt = add_prompt(session, "one prompt, many answers")
        base = ensure_base_version(session, "m")
        responses = [
            record_response(session, prompt_id=prompt.id, model_version_id=base.id, text=f"a{i}").id
            for i in range(VOTES_PER_THREAD + 1)
        ]
    stop_reading = threading.Event()
    read_errors: list[BaseException] = []

    def reader() -> None:  # progress displays poll while people vote
        try:
            while not stop_reading.is_set():
                with db.begin() as session:
                    store_stats(session)
        except BaseException as err:
            read_errors.append(err)

    def annotator(t: int) -> None:
        for i in range(VOTES_PER_THREAD):
            for _ in range(2 if i % 4 == 0 else 1):  # some votes twice, like a double click
                with db.begin() as session:
                    record_preference(
                        session,
                        response_a_id=responses[i],
                        response_b_id=responses[i + 1],
                        choice="ab"[(i + t) % 2],
                        annotator=f"annotator-{t}",
                    )

    poller = threading.Thread(target=reader)
    poller.start()
    t0 = time.perf_counter()
    errors = run_threads(THREADS, annotator)
    elapsed = time.perf_counter() - t0
    stop_reading.set()
    poller.join()
    assert errors == [] and read_errors == []
    with db() as session:
        total = session.scalar(select(func.count()).select_from(Preference))
        per_annotator = session.execute(
            select(Preference.annotator, func.count()).group_by(Preference.annotator)
        ).all()
    assert total == THREADS * VOTES_PER_THREAD
    assert sorted(n for _, n in per_annotator) == [VOTES_PER_THREAD] * THREADS
    print(f"{total} votes (+{total // 4} repeated) from {THREADS} threads in {elapsed:.2f} s")


def test_racing_train_clicks_queue_one_run(db: sessionmaker[Session]):
    with db.begin() as session:
        base_id = ensure_base_version(session, "m").id
    refused: list[int] = []

    def click(i: int) -> None:
        try:
            with db.begin() as session:
                create_run(
                    session, base_model="m", config={}, num_pairs=1, parent_version_id=base_id
                )
        except RunStateError:
            refused.append(i)

    assert run_threads(THREADS, click) == []
    assert len(refused) == THREADS - 1
    with db() as session:
        assert session.scalar(select(func.count()).select_from(TrainingRun)) == 1
