"""Two app replicas (`python -m app`, tiny model) on one PostgreSQL database and one data
directory, as behind a reverse proxy: sign-in sessions and the login back-off are shared, votes
count once whichever replica takes them, a run started on A is served by B, a rollback on B
reaches A, and a run whose replica died (app and worker killed) is failed by the other one.

The replicas get different `DPO_STUDIO_HOST_ID`s, so each treats the other's worker as one on
another machine (its pid means nothing there): only the heartbeat can fail it.
Runs only when `DPO_STUDIO_TEST_PG_URL` names a database the tests may wipe (`.ci/run`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from sqlalchemy import create_engine, func, select

from app.auth.users import UserStore
from app.train.worker import pid_file
from bench.label_api import LabelApi
from storage.db import open_db
from storage.io import import_pairs
from storage.models import Preference
from tests.app.server import AppProcess, start_app, wait_until

PG_URL = os.environ.get("DPO_STUDIO_TEST_PG_URL")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PG_URL, reason="DPO_STUDIO_TEST_PG_URL is not set (.ci/run sets it)"),
]

ADMIN = ("boss", "boss-password-1")
ANNOTATORS = {f"ann{i}": f"ann{i}-password" for i in range(8)}
VOTES_EACH = 3
PAIRS = [
    {"prompt": f"Tell me about {t}.", "chosen": f"{t.title()} are lovely.", "rejected": "meh"}
    for t in ("cats", "rain", "tea", "maps", "jazz", "salt", "moss", "kites", "owls", "figs")
]
QUICK = {"epochs": 1, "batch_size": 2, "max_length": 96, "lora_r": 4, "lora_alpha": 8}
LONG = {**QUICK, "epochs": 500}
TIMEOUT_S = 600  # only keeps a broken build from hanging; no timing is asserted
SHARED_WITHIN_S = 10  # "every replica within a few seconds": the watchers poll every second


def _wipe(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()


def _start(model: Path, data_dir: Path, users: Path, host_id: str) -> AppProcess:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_STUDIO_HOST_ID", host_id)
        mp.setenv("OMP_NUM_THREADS", "1")
        return start_app(
            str(model), data_dir, "--dtype", "fp32", "--device", "cpu",
            "--db", PG_URL, "--auth-file", str(users),
        )  # fmt: skip


@pytest.fixture(scope="module")
def replicas(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    _wipe(PG_URL)
    work = tmp_path_factory.mktemp("replicas")
    users = UserStore(work / "users.toml")
    users.add(ADMIN[0], "admin", ADMIN[1])
    for name, password in {**ANNOTATORS, "sam": "sam-password", "rem": "rem-password"}.items():
        users.add(name, "annotator", password)
    started: list[AppProcess] = []
    try:
        for host_id in ("host-a", "host-b"):
            started.append(_start(tiny_model_dir, work / "data", work / "users.toml", host_id))
        yield started[0], started[1], users
    finally:
        for app in started:
            app.stop()


@pytest.fixture(scope="module")
def sm(replicas):
    return open_db(PG_URL)


def _login(app: AppProcess, name: str, password: str) -> httpx.Response:
    return httpx.post(f"{app.url}login", data={"username": name, "password": password})


def _signed_in(app: AppProcess, cookies: httpx.Cookies) -> bool:
    return httpx.get(f"{app.url}config", cookies=cookies).status_code == 200


def test_a_session_from_a_works_on_b_and_a_sign_out_on_b_ends_it_on_a(replicas):
    a, b, _ = replicas
    r = _login(a, "sam", "sam-password")
    assert r.status_code == 200, r.text
    assert _signed_in(a, r.cookies) and _signed_in(b, r.cookies)
    assert not _signed_in(b, httpx.Cookies())
    httpx.get(f"{b.url}logout", cookies=r.cookies)
    assert not _signed_in(b, r.cookies)
    wait_until(lambda: not _signed_in(a, r.cookies), SHARED_WITHIN_S, what="sign-out on A")


def test_a_removed_user_is_signed_out_on_both(replicas):
    a, b, users = replicas
    cookies = _login(b, "rem", "rem-password").cookies
    assert _signed_in(a, cookies)
    users.remove("rem")
    for app in (a, b):
        wait_until(lambda app=app: not _signed_in(app, cookies), SHARED_WITHIN_S, what="refusal")


def test_failed_sign_ins_on_a_throttle_b(replicas):
    a, b, _ = replicas
    for _ in range(5):  # LoginThrottle.user_free
        assert _login(a, "sam", "wrong-password").status_code == 400
    r = _login(b, "sam", "sam-password")
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text


def _annotate(app: AppProcess, name: str, acked: list, errors: list) -> None:
    try:
        label = LabelApi(Client(app.url, auth=(name, ANNOTATORS[name]), verbose=False))
        for i in range(VOTES_EACH):
            pair = label.generate(None)  # the next prompt from this annotator's queue
            # Ties and both-bad: the tiny model's answers (sometimes empty) stay out of training.
            label.vote(pair, "tie" if i % 2 else "both_bad")
            acked.append((name, pair))
    except Exception as err:  # reported by the test
        errors.append(f"{name}: {type(err).__name__}: {err}")


def test_eight_annotators_on_both_replicas_every_vote_stored_once(replicas, sm):
    a, b, _ = replicas
    acked: list[tuple[str, tuple[int, int]]] = []
    errors: list[str] = []
    threads = [
        threading.Thread(target=_annotate, args=((a, b)[i % 2], name, acked, errors))
        for i, name in enumerate(ANNOTATORS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    name, pair = acked[0]  # the same vote again, through the other replica
    other = LabelApi(Client(b.url, auth=(name, ANNOTATORS[name]), verbose=False))
    assert other.vote(pair, "a")["new"] is False
    with sm.begin() as s:
        rows = s.execute(select(Preference.annotator, Preference.prompt_id)).all()
        assert len(rows) == len(acked) == len(ANNOTATORS) * VOTES_EACH
        for name in ANNOTATORS:  # least labeled first: no prompt twice while others wait
            prompts = [p for who, p in rows if who == name]
            assert len(set(prompts)) == len(prompts) == VOTES_EACH
        assert s.scalar(select(func.count()).select_from(Preference)) == len(acked)


def _admin(app: AppProcess) -> Client:
    return Client(app.url, auth=ADMIN, verbose=False)


def _served(app: AppProcess) -> str:
    label = LabelApi(Client(app.url, auth=ADMIN, verbose=False))
    return label.client.predict("Say hi.", "", api_name="/generate_pair")["version"]


def _status(client: Client, run_id: int) -> dict:
    return client.predict(run_id=run_id, api_name="/train_status")


def test_run_started_on_a_is_served_by_b_and_a_rollback_on_b_reaches_a(replicas, sm, tmp_path):
    a, b, _ = replicas
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    with sm.begin() as s:
        import_pairs(s, path)
    started = _admin(a).predict(**QUICK, api_name="/train_start")
    assert started["ok"], started["message"]
    on_b = _admin(b)
    done = wait_until(
        lambda: (
            (st := _status(on_b, started["run_id"]))["status"] not in ("queued", "running") and st
        ),
        TIMEOUT_S,
        interval_s=1,
        what="the run to end",
    )
    assert done["status"] == "succeeded", done  # B never judged A's worker by its pid
    wait_until(lambda: _served(b) == "v1", SHARED_WITHIN_S, what="B to serve v1")
    result = on_b.predict(name="base", api_name="/activate_version")
    assert result["ok"], result
    wait_until(lambda: _served(a) == "base", SHARED_WITHIN_S, what="A to serve base")


def test_killing_replica_a_mid_run_fails_the_run_from_b(replicas):
    a, b, _ = replicas
    started = _admin(a).predict(**LONG, api_name="/train_start")
    assert started["ok"], started["message"]
    run_id, on_b = started["run_id"], _admin(b)
    wait_until(lambda: _status(on_b, run_id)["step"], TIMEOUT_S, what="the first step")
    worker = int(pid_file(a.data_dir, run_id).read_text())
    for pid in (worker, a.proc.pid):  # the machine is gone: app and worker with it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    a.proc.wait()
    # STALE_AFTER_S (60 s) without a heartbeat; B's watcher checks every second.
    failed = wait_until(
        lambda: (st := _status(on_b, run_id))["status"] == "failed" and st, TIMEOUT_S, interval_s=2
    )
    assert "no heartbeat" in (failed["error"] or ""), failed
