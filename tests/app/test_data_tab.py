"""The Data tab's handlers (what its buttons do) on a real SQLite database, in-process: an import
reports what it added or why nothing was, an export gives a file to download, and a signed-in
annotator is refused both while still seeing the counts."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from gradio.utils import get_upload_folder

from app.auth.users import ROLE_STATE_KEY
from app.data.service import DataService
from app.data.tab import DataHandlers, layout
from storage.db import open_db
from storage.repo import store_stats
from tests.storage.test_repo import answers
from tests.storage.test_selection import three_annotators, vote

ADMIN = None  # auth off: the local user acts as admin
ANNOTATOR = SimpleNamespace(username="ann", state=SimpleNamespace(**{ROLE_STATE_KEY: "annotator"}))


@pytest.fixture
def upload_dir():
    """A directory inside gradio's upload folder: where a browser upload lands."""
    path = Path(get_upload_folder()) / f"test-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tab(tmp_path):
    service = DataService(open_db(f"sqlite:///{tmp_path / 'studio.db'}"), tmp_path / "exports")
    with gr.Blocks():
        tab = layout(service)
    return service, tab, DataHandlers(service, tab)


def _votes(service: DataService) -> int:
    with service.sm.begin() as s:
        return store_stats(s).overall.votes


def test_import_reports_what_was_added_or_why_nothing_was(tab, upload_dir):
    service, view, h = tab
    bad = upload_dir / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    out = h.import_pairs_file(str(bad), "train", ADMIN)
    assert out[view.import_message] == (
        "⚠️ Nothing imported: bad.jsonl: missing column(s) chosen, rejected; found question, answer"
    )
    assert _votes(service) == 0
    good = upload_dir / "good.jsonl"
    good.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "no"}) + "\n")
    out = h.import_pairs_file(str(good), "train", ADMIN)
    assert out[view.import_message].startswith("✅ good.jsonl: 1 pairs read, 1 added to train")
    assert "**Usable training pairs:** 1" in out[view.summary]
    assert list(out[view.annotators]["annotator"]) == ["import"]
    assert h.import_prompts_file(None, "train", ADMIN)[view.import_message] == (
        "⚠️ Choose a file to import first."
    )


def test_export_gives_a_file_to_download(tab, upload_dir):
    _, view, h = tab
    out = h.export("standard", ".jsonl", "all", ADMIN)
    assert out[view.export_message].startswith("⚠️ Nothing exported: there are no usable")
    assert out[view.export_file] is None
    pairs = upload_dir / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "no"}) + "\n")
    h.import_pairs_file(str(pairs), "train", ADMIN)
    out = h.export("standard", ".jsonl", "all", ADMIN)
    path = Path(out[view.export_file])
    assert out[view.export_message] == "✅ preferences-standard.jsonl is ready."
    assert json.loads(path.read_text())["chosen"] == "Hello!"


def test_annotator_sees_the_counts_but_cannot_import_or_export(tab, upload_dir):
    service, view, h = tab
    pairs = upload_dir / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "no"}) + "\n")
    with pytest.raises(gr.Error, match=r"Only an admin can import pairs; .*'ann' \(annotator\)"):
        h.import_pairs_file(str(pairs), "train", ANNOTATOR)
    with pytest.raises(gr.Error, match="Only an admin can export data"):
        h.export("standard", ".jsonl", "all", ANNOTATOR)
    assert _votes(service) == 0
    shown = h.show_admin_area(ANNOTATOR)
    assert shown[view.admin_area].visible is False and shown[view.admin_note].visible is True
    assert "**Votes:** 0" in h.refresh()[view.summary]


def test_export_follows_the_votes_chosen(tab):
    service, view, h = tab
    with service.sm.begin() as s:
        three_annotators(s)
        vote(s, answers(s, "judged", "j-A", "j-B"), "a", "judge:qwen")
    summary = h.refresh()[view.summary]
    assert "**Usable training pairs:** 13 (each vote its own pair); 3 by the majority" in summary
    assert [c[0] for c in h.refresh()[view.export_leave_out].choices] == [
        "ann",
        "bob",
        "cat",
        "judge:qwen",
    ]

    def exported(*chosen: object) -> list[str]:
        out = h.export("standard", ".jsonl", "all", ADMIN, *chosen)
        lines = Path(out[view.export_file]).read_text().splitlines()
        return [json.loads(line)["prompt"] for line in lines]

    assert exported() == ["split", "same", "tie minority"]  # majority of human votes
    assert exported("unanimous") == ["same"]
    assert exported("majority", ["bob", "cat"], True) == [
        "split",
        "same",
        "three-way",
        "even",
        "tie minority",
        "judged",
    ]
    out = h.export("standard", ".jsonl", "all", ADMIN, "most")
    assert out[view.export_message] == (
        "⚠️ unknown votes mode 'most'; choose one of majority, unanimous, every"
    )
