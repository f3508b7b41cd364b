"""Train and Compare through the app's HTTP API (gradio_client) on the tiny model.

One app process serves the whole module; the tests run in file order and build on each other:
no pairs -> refused; a run succeeds (v1); a run is cancelled; a worker is killed; blind votes.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app.compare.stats import WinRate, format_rate
from app.train.worker import pid_file
from storage import repo, runs
from storage.db import open_db
from storage.io import import_pairs
from storage.models import Response
from tests.app.server import start_app, wait_until

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 600  # only keeps a broken build from hanging; no timing is asserted
TOPICS = ["cats", "rain", "tea", "maps", "jazz", "salt", "moss", "kites", "owls", "figs"]
# Small settings: the tiny model trains a step in well under a second.
QUICK = {"epochs": 2, "batch_size": 2, "max_length": 96, "lora_r": 4, "lora_alpha": 8}
LONG = {**QUICK, "epochs": 200}


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("studio")
    server = start_app(str(tiny_model_dir), data_dir, "--dtype", "fp32", "--device", "cpu")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def sm(app):
    return open_db(app.db_url)


def _import(app, tmp_path: Path, rows: list[dict[str, str]], split: str = "train") -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open_db(app.db_url).begin() as s:
        import_pairs(s, path, split=split)


def _wait_done(client: Client, run_id: int) -> dict:
    def done():
        status = client.predict(run_id=run_id, api_name="/train_status")
        return status if status["status"] not in ("queued", "running") else None

    return wait_until(done, RUN_TIMEOUT_S, what=f"run {run_id} to end")


def _active(sm, app) -> str:
    with sm.begin() as s:
        return runs.active_version(s, _base_model(s)).name


def _base_model(s) -> str:
    return runs.list_versions(s)[0].base_model


def test_zero_usable_pairs_is_refused_and_creates_no_run(client, sm, app):
    with sm.begin() as s:  # a tie only: nothing DPO can use
        prompt_id = repo.add_prompt(s, "Is water wet?").id
        a, b = (
            repo.record_response(s, prompt_id=prompt_id, model_version_id=None, text=t)
            for t in ("Yes.", "No.")
        )
        repo.record_preference(
            s, response_a_id=a.id, response_b_id=b.id, choice="tie", annotator="x"
        )
    result = client.predict(api_name="/train_start")
    assert result["ok"] is False
    assert result["message"].startswith("No usable preference pairs yet (1 ties")
    assert "Label tab" in result["message"]
    with sm.begin() as s:
        assert runs.list_runs(s) == []


def test_run_goes_queued_running_succeeded_and_v1_answers(client, sm, app, tmp_path):
    pairs = [
        {"prompt": f"Tell me about {t}.", "chosen": f"{t.title()} are lovely.", "rejected": "meh"}
        for t in TOPICS
    ]
    _import(app, tmp_path, pairs)
    started = client.predict(**QUICK, api_name="/train_start")
    assert started["ok"], started["message"]
    run_id = started["run_id"]
    seen = []

    def finished():
        status = client.predict(run_id=run_id, api_name="/train_status")
        if not seen or seen[-1] != status["status"]:
            seen.append(status["status"])
        return status if status["status"] not in ("queued", "running") else None

    status = wait_until(finished, RUN_TIMEOUT_S, interval_s=0.05, what="the run to end")
    # Polled every 50 ms: "queued" lasts until the worker process is up, "running" for the
    # model load and every step; a status never goes backwards.
    assert seen in (["queued", "running", "succeeded"], ["running", "succeeded"]), status
    assert status["version"] == "v1"
    assert status["step"] == status["total_steps"] > 0
    steps = [m["step"] for m in status["metrics"] if "loss" in m]
    assert steps == list(range(1, status["total_steps"] + 1))
    with sm.begin() as s:
        series = runs.run_metrics(s, run_id)
        assert {"loss", "rewards/margins", "rewards/accuracies"} <= set(series)
        assert len(series["loss"]) == status["total_steps"]
    assert _active(sm, app) == "v1"
    history = client.predict(api_name="/train_history")
    assert history[0]["run"] == run_id and history[0]["status"] == "succeeded"
    assert history[0]["version"] == "v1" and history[0]["final loss"]
    # The served model switched: the Label tab's answers now come from v1.
    pair = client.predict("Tell me about jazz.", "tester", api_name="/generate_pair")
    assert pair["version"] == "v1"
    with sm.begin() as s:
        response = s.get(Response, pair["answers"][0]["response_id"])
        assert response.model_version.name == "v1"
    # Compare: v1 answers next to the base, with the same seed.
    answers = client.predict("base", "v1", "Tell me about tea.", 3, api_name="/compare")["answers"]
    assert [a["version"] for a in answers] == ["base", "v1"]
    assert all(a["text"] for a in answers)


def test_second_run_is_refused_then_cancel_keeps_the_previous_version(client, sm, app):
    started = client.predict(**LONG, api_name="/train_start")
    assert started["ok"], started["message"]
    run_id = started["run_id"]
    again = client.predict(**QUICK, api_name="/train_start")
    assert again["ok"] is False
    assert "one training job at a time" in again["message"]
    wait_until(
        lambda: client.predict(run_id=run_id, api_name="/train_status")["step"] >= 1,
        RUN_TIMEOUT_S,
        what="the first step",
    )
    assert "cancelled" in client.predict(api_name="/train_cancel")["message"]
    status = _wait_done(client, run_id)
    assert status["status"] == "cancelled"
    assert status["step"] < status["total_steps"]
    assert _active(sm, app) == "v1"
    with sm.begin() as s:
        assert [v.name for v in runs.list_versions(s)] == ["base", "v1"]


def test_killed_worker_fails_the_run_and_v1_stays_loadable(client, sm, app):
    from peft import PeftModel

    from dpo_core.modeling import load_model

    started = client.predict(**LONG, api_name="/train_start")
    assert started["ok"], started["message"]
    run_id = started["run_id"]
    wait_until(
        lambda: client.predict(run_id=run_id, api_name="/train_status")["step"] >= 1,
        RUN_TIMEOUT_S,
        what="the first step",
    )
    os.kill(int(pid_file(app.data_dir, run_id).read_text()), signal.SIGKILL)
    status = _wait_done(client, run_id)
    assert status["status"] == "failed"
    assert "killed by signal 9" in status["error"]
    assert "previous version stays active" in status["error"]
    assert _active(sm, app) == "v1"
    with sm.begin() as s:
        v1 = next(v for v in runs.list_versions(s) if v.name == "v1")
    lm = load_model(_base_model_path(sm), dtype="fp32", device="cpu", adapter=v1.adapter_path)
    assert isinstance(lm.model, PeftModel)
    trained = [p for n, p in lm.model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # v1's trained weights, intact
    answers = client.predict("base", "v1", "Tell me about owls.", 0, api_name="/compare")
    assert answers["answers"][1]["text"]


def _base_model_path(sm) -> str:
    with sm.begin() as s:
        return _base_model(s)


def test_blind_votes_give_the_expected_win_rate_table(client, sm, app):
    # v1 wins 3, base wins 1, one tie (ties count half).
    wanted = ["v1", "v1", "v1", "base", "tie"]
    for i, want in enumerate(wanted):
        shown = client.predict("base", "v1", f"Blind question {i}?", i, api_name="/blind_pair")
        assert "version" not in json.dumps(shown)  # nothing says which side is which
        with sm.begin() as s:
            left = s.get(Response, shown["left_response_id"]).model_version.name
        winner = "tie" if want == "tie" else ("left" if left == want else "right")
        args = (shown["left_response_id"], shown["right_response_id"], winner, "blind-tester")
        result = client.predict(*args, api_name="/blind_vote")
        assert f"was **{left}**" in result["reveal"]
        if i == 0:  # the same vote again (double click) is one vote
            client.predict(*args, api_name="/blind_vote")
    table = client.predict(api_name="/win_rates")
    rate, interval = format_rate(WinRate(wins=3, ties=1, both_bad=0, losses=1))
    assert table == [
        {
            "version": "v1",
            "vs": "base",
            "wins": 3,
            "ties": 1,
            "losses": 1,
            "votes": 5,
            "win rate": rate,
            "95% CI": interval,
        }
    ]
    assert rate == "70.0%"


def test_batch_before_after_and_heldout_accuracy(client, app, tmp_path):
    with pytest.raises(AppError, match="no held-out prompts yet"):
        client.predict("base", "v1", 2, 0, api_name="/compare_batch")
    heldout = [
        {"prompt": "Tell me about figs and owls.", "chosen": "Both are lovely.", "rejected": "no"},
        {"prompt": "Describe moss briefly.", "chosen": "Moss is soft and green.", "rejected": "eh"},
    ]
    _import(app, tmp_path, heldout, split="heldout")
    rows = client.predict("base", "v1", 5, 0, api_name="/compare_batch")
    assert sorted(r["prompt"] for r in rows) == sorted(p["prompt"] for p in heldout)
    assert all(set(r) == {"prompt", "A: base", "B: v1"} for r in rows)
    table = client.predict(["base", "v1"], api_name="/reward_accuracy")
    assert [r["version"] for r in table] == ["base", "v1"]
    assert table[0]["reward accuracy"] == "— (reference)"
    assert table[1]["held-out pairs"] == 2
    assert 0.0 <= float(table[1]["reward accuracy"]) <= 1.0
