"""Export and the leaderboard through the app's HTTP API (gradio_client), with sign-in on:
/export_version is for admins and writes under <data-dir>/exports/; /leaderboard is for all."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app.auth.users import UserStore
from storage import repo, runs
from storage.db import open_db
from tests.app.server import start_app
from tests.tiny import save_random_adapter

pytestmark = pytest.mark.slow

ACCOUNTS = {"boss": ("admin", "boss-password-1"), "ann": ("annotator", "ann-password-1")}


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("export-app")
    store = UserStore(work / "users.toml")
    for name, (role, password) in ACCOUNTS.items():
        store.add(name, role, password)
    server = start_app(
        str(tiny_model_dir), work / "data", "--dtype", "fp32", "--device", "cpu",
        "--auth-file", str(work / "users.toml"),
    )  # fmt: skip
    adapter = save_random_adapter(tiny_model_dir, work / "data" / "adapters" / "v1")
    with open_db(server.db_url).begin() as s:
        base = runs.list_versions(s)[0]
        runs.register_adapter_version(
            s,
            base_model=base.base_model,
            adapter_path=str(adapter),
            parent_id=base.id,
            activate=False,
        )
    yield server
    server.stop()


def client(app, name: str) -> Client:
    return Client(app.url, auth=(name, ACCOUNTS[name][1]), verbose=False)


def test_an_annotator_may_not_export(app):
    with pytest.raises(AppError, match=r"Only an admin can export versions"):
        client(app, "ann").predict("v1", "merged", api_name="/export_version")
    assert not (app.data_dir / "exports").exists()


def test_admin_exports_merged_weights_with_a_card(app):
    result = client(app, "boss").predict("v1", "merged", api_name="/export_version")
    out = app.data_dir / "exports" / "v1-merged"
    assert result["ok"] is True and result["directory"] == str(out.resolve())
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(
        result["files"]
    )
    card = (Path(result["directory"]) / "README.md").read_text()
    assert "Lineage: base -> v1" in card and card.startswith("---\nbase_model:")


def test_admin_exports_gguf_with_a_modelfile(app):
    result = client(app, "boss").predict("v1", "gguf", "q8_0", api_name="/export_version")
    assert result["ok"] is True, result["message"]
    assert Path(result["directory"]).name == "v1-gguf-q8_0"
    assert "Modelfile" in result["files"] and any(f.endswith("-q8_0.gguf") for f in result["files"])
    again = client(app, "boss").predict("v1", "gguf", "q8_0", api_name="/export_version")
    assert again["ok"] is True and "already exported" in again["message"]


def test_bad_requests_get_a_message_and_write_nothing(app):
    boss = client(app, "boss")
    unknown = boss.predict("v9", "merged", api_name="/export_version")
    assert unknown["ok"] is False
    assert unknown["message"] == "unknown version 'v9'; the versions are: base, v1"
    wrong = boss.predict("v1", "safetensors", api_name="/export_version")
    assert wrong["ok"] is False and "Unknown format" in wrong["message"]
    assert sorted(p.name for p in (app.data_dir / "exports").iterdir()) == [
        "v1-gguf-q8_0",
        "v1-merged",
    ]


def test_leaderboard_for_everyone(app):
    with open_db(app.db_url).begin() as s:
        versions = {v.name: v.id for v in runs.list_versions(s)}
        for n, winner in enumerate(["left", "left", "right", "tie"]):
            prompt = repo.add_prompt(s, f"leaderboard prompt {n}").id
            left, right = (
                repo.record_response(s, prompt_id=prompt, model_version_id=versions[v], text=v)
                for v in ("v1", "base")
            )
            repo.record_comparison_vote(
                s,
                response_left_id=left.id,
                response_right_id=right.id,
                winner=winner,
                annotator="ann",
            )
    board = client(app, "ann").predict(api_name="/leaderboard")
    assert board["total_votes"] == 4 and board["anchor"] == "base = 1000"
    assert [r["version"] for r in board["ratings"]] == ["v1", "base"]
    v1 = board["ratings"][0]
    assert (v1["wins"], v1["ties"], v1["losses"]) == (2, 1, 1)
    assert v1["low"] <= v1["score"] <= v1["high"] and v1["score"] > 1000
