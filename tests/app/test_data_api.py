"""The Data tab's endpoints and version switching, through the real app's HTTP API
(gradio_client) on the tiny model with a real SQLite database.

One app process serves the whole module; the tests run in file order and build on each other:
imports fill the database, exports read it back, then versions are switched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from sqlalchemy.orm import Session, sessionmaker

from storage import repo, runs
from storage.db import open_db
from storage.models import Preference, Prompt, Response
from tests.app.server import AppProcess, start_app
from tests.tiny import save_random_adapter

pytestmark = pytest.mark.slow

PAIRS = [
    {"prompt": f"Tell me about {t}.", "chosen": f"{t.title()} are lovely.", "rejected": "meh"}
    for t in ("cats", "rain", "tea")
]


@dataclass
class Studio:
    server: AppProcess
    client: Client
    sm: sessionmaker[Session]


@pytest.fixture(scope="module")
def studio(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("data-tab")
    server = start_app(str(tiny_model_dir), data_dir, "--dtype", "fp32", "--device", "cpu")
    try:
        yield Studio(server, Client(server.url, verbose=False), open_db(server.db_url))
    finally:
        server.stop()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _counts(sm: sessionmaker[Session]) -> tuple[int, int]:
    with sm.begin() as s:
        return s.query(Prompt).count(), s.query(Preference).count()


def test_import_pairs_adds_votes_and_a_second_import_adds_nothing(studio, tmp_path):
    prompts_before, _ = _counts(studio.sm)  # the app seeds its default prompts
    rows = [*PAIRS, {"prompt": "Same?", "chosen": "yes", "rejected": "yes"}]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    result = studio.client.predict(handle_file(str(path)), "train", api_name="/import_pairs")
    assert result["added"] == 3 and result["skipped"] == 1
    assert result["message"].startswith("pairs.jsonl: 4 pairs read, 3 added to train")
    with studio.sm.begin() as s:
        pairs = repo.preference_pairs(s).pairs
        assert sorted((p.prompt, p.chosen, p.rejected) for p in pairs) == sorted(
            (r["prompt"], r["chosen"], r["rejected"]) for r in PAIRS
        )
        assert {p.annotator for p in pairs} == {"import"}
        sources = {p.text: p.source for p in s.query(Prompt)}
        assert {sources[r["prompt"]] for r in PAIRS} == {"pairs.jsonl"}
    again = studio.client.predict(handle_file(str(path)), "train", api_name="/import_pairs")
    assert again["added"] == 0 and "3 already there" in again["message"]
    assert _counts(studio.sm) == (prompts_before + 3, 3)


def test_import_prompts_counts_added_repeated_and_blank(studio, tmp_path):
    path = tmp_path / "questions.txt"
    path.write_text("How do bees dance?\n\nTell me about cats.\nHow do bees dance?\n   \n")
    result = studio.client.predict(handle_file(str(path)), "heldout", api_name="/import_prompts")
    assert (result["added"], result["skipped"]) == (1, 4)  # 1 already there, 1 repeated, 2 blank
    with studio.sm.begin() as s:
        new = s.query(Prompt).filter_by(text="How do bees dance?").one()
        assert (new.split, new.source) == ("heldout", "questions.txt")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "wrong.jsonl",
            b'{"question": "q", "answer": "a"}\n',
            "wrong.jsonl: missing column(s) chosen, rejected; found question, answer",
        ),
        (
            "latin1.jsonl",
            b'{"prompt": "caf\xe9"}\n',
            "latin1.jsonl: not UTF-8 text (byte 15, line 1)",
        ),
        (
            "second-row.jsonl",
            b'{"prompt": "new q", "chosen": "good", "rejected": "bad"}\n'
            b'{"prompt": "q2", "chosen": "", "rejected": "bad"}\n',
            "second-row.jsonl: row 2: 'chosen' is empty",
        ),
        ("table.xlsx", b"PK\x03\x04", "table.xlsx: unsupported file type"),
    ],
    ids=["wrong columns", "invalid UTF-8", "empty answer on row 2", "unsupported type"],
)
def test_bad_file_is_refused_with_a_clear_message_and_no_rows(
    studio, tmp_path, name, content, message
):
    before = _counts(studio.sm)
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AppError, match=r"Nothing imported: ") as info:
        studio.client.predict(handle_file(str(path)), "train", api_name="/import_pairs")
    assert message in str(info.value)
    assert "/gradio" not in str(info.value)  # the name the user chose, not the upload's path
    assert _counts(studio.sm) == before


def test_import_without_a_file_or_of_a_server_path_is_refused(studio):
    before = _counts(studio.sm)
    with pytest.raises(AppError, match="Choose a file to import first"):
        studio.client.predict({"path": ""}, "train", api_name="/import_prompts")
    server_file = {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}
    with pytest.raises(AppError):  # gradio refuses it, or the handler does: never read
        studio.client.predict(server_file, "train", api_name="/import_prompts")
    assert _counts(studio.sm) == before


@pytest.mark.parametrize(
    ("fmt", "file_type"), [("standard", ".jsonl"), ("conversational", ".parquet")]
)
def test_export_is_a_file_that_datasets_loads(studio, fmt, file_type):
    path = studio.client.predict(fmt, file_type, "all", api_name="/export_preferences")
    assert Path(path).name == f"preferences-{fmt}{file_type}"
    builder = "json" if file_type == ".jsonl" else "parquet"
    rows = datasets.load_dataset(builder, data_files=path, split="train").to_list()
    if fmt == "conversational":
        assert rows[0]["chosen"][0]["role"] == "assistant"
        rows = [{k: r[k][0]["content"] for k in ("prompt", "chosen", "rejected")} for r in rows]
    got = sorted((r["prompt"], r["chosen"], r["rejected"]) for r in rows)
    assert got == sorted((p["prompt"], p["chosen"], p["rejected"]) for p in PAIRS)


def test_export_of_an_empty_split_or_unknown_format_says_so(studio):
    with pytest.raises(AppError, match="no usable preference pairs to export yet"):
        studio.client.predict("standard", ".jsonl", "heldout", api_name="/export_preferences")
    with pytest.raises(AppError, match="unknown export format 'yaml'"):
        studio.client.predict("yaml", ".jsonl", "all", api_name="/export_preferences")


def test_data_stats(studio):
    stats = studio.client.predict(api_name="/data_stats")
    assert stats["prompts"]["heldout"] == 1
    assert stats["prompts"]["train"] == _counts(studio.sm)[0] - 1
    assert stats["votes"]["votes"] == 3 and stats["votes"]["usable_pairs"] == 3
    assert stats["by_annotator"]["import"]["by_choice"]["a"] == 3


# --- version switching -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(studio) -> str:
    with studio.sm.begin() as s:
        return runs.list_versions(s)[0].base_model


def _register(sm: sessionmaker[Session], base_model: str, path: Path) -> None:
    with sm.begin() as s:
        runs.register_adapter_version(
            s, base_model=base_model, adapter_path=str(path), activate=False
        )


def _label_version(studio, prompt: str) -> str:
    pair = studio.client.predict(prompt, "tester", api_name="/generate_pair")
    with studio.sm.begin() as s:
        stored = s.get(Response, pair["answers"][0]["response_id"]).model_version.name
    assert stored == pair["version"]
    return pair["version"]


def test_activate_an_adapter_then_roll_back_to_base(studio, base_model):
    save_random_adapter(base_model, studio.server.data_dir / "adapters" / "v1")
    _register(studio.sm, base_model, studio.server.data_dir / "adapters" / "v1")
    listed = studio.client.predict(api_name="/list_versions")
    assert [(v["version"], v["active"]) for v in listed] == [("base", True), ("v1", False)]
    assert _label_version(studio, "Tell me about moss.") == "base"

    result = studio.client.predict("v1", api_name="/activate_version")
    assert result == {
        "ok": True,
        "message": "v1 is now the active version (was base).",
        "active": "v1",
    }
    assert studio.client.predict(api_name="/train_status")["status"] == "idle"
    assert _label_version(studio, "Tell me about owls.") == "v1"
    answers = studio.client.predict("base", "v1", "Tell me about figs.", 0, api_name="/compare")
    assert answers["answers"][0]["text"] != answers["answers"][1]["text"]  # v1's weights answer

    result = studio.client.predict("base", api_name="/activate_version")
    assert result["ok"] and result["active"] == "base"
    assert _label_version(studio, "Tell me about kites.") == "base"


def test_missing_adapter_directory_or_unknown_version_is_refused(studio, base_model):
    _register(studio.sm, base_model, studio.server.data_dir / "adapters" / "gone")
    result = studio.client.predict("v2", api_name="/activate_version")
    assert result["ok"] is False and result["active"] == "base"
    assert "adapters/gone is missing or incomplete (no adapter_config.json)" in result["message"]
    assert result["message"].endswith("base stays active.")
    result = studio.client.predict("v9", api_name="/activate_version")
    assert result["message"] == "No version named 'v9'; the versions are base, v1, v2."
    assert _label_version(studio, "Tell me about salt.") == "base"


def test_switching_is_refused_while_a_run_is_live(studio, base_model):
    with studio.sm.begin() as s:  # a queued run (no worker yet): what a click on Train leaves
        base = runs.active_version(s, base_model)
        run_id = runs.create_run(
            s, base_model=base_model, config={}, num_pairs=3, parent_version_id=base.id
        ).id
    try:
        result = studio.client.predict("v1", api_name="/activate_version")
        assert result["ok"] is False and result["active"] == "base"
        assert result["message"].startswith(f"Run #{run_id} is queued: versions cannot be switched")
    finally:
        studio.client.predict(api_name="/train_cancel")
    assert studio.client.predict("v1", api_name="/activate_version")["ok"] is True
