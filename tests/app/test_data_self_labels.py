"""The Data tab with a version's own labels in the database (`self:<version>` votes): the
agreement panel says how often people agreed with them and never lists the model as an
annotator, the counts keep people's votes apart, and the export takes them only when asked,
with their weight. In-process, on a real SQLite database."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.data.agreement import AgreementService
from app.data.service import DataService
from app.data.tab import DataHandlers, layout
from storage.db import open_db
from storage.models import Prompt, Response
from storage.repo import record_preference
from storage.runs import ensure_base_version, register_adapter_version
from storage.self_labels import SelfLabel, add_self_labels

ADMIN = None  # auth off: the local user acts as admin


def _ids(s: Session, prompt: str) -> dict[str, int]:
    query = select(Response.text, Response.id).join(Prompt).where(Prompt.text == prompt)
    return dict(s.execute(query).all())


@pytest.fixture
def data(tmp_path: Path) -> DataService:
    """v2 labeled three pairs of its own answers (weight 0.5); ann judged two of them, agreeing
    on one; bob judged one too."""
    service = DataService(open_db(f"sqlite:///{tmp_path / 'studio.db'}"), tmp_path / "exports")
    with service.sm.begin() as s:
        ensure_base_version(s, "m")
        for name in ("v1", "v2"):
            register_adapter_version(s, base_model="m", adapter_path=f"/a/{name}")
        labels = [
            SelfLabel(f"Q{i}?", f"good {i}", f"bad {i}", 1.0, "implicit", 0.5) for i in range(3)
        ]
        add_self_labels(s, "v2", labels)
        for i, who, winner, loser in (
            (0, "ann", "good", "bad"),
            (1, "ann", "bad", "good"),
            (1, "bob", "bad", "good"),
        ):
            ids = _ids(s, f"Q{i}?")
            a, b = ids[f"{winner} {i}"], ids[f"{loser} {i}"]
            record_preference(s, response_a_id=a, response_b_id=b, choice="a", annotator=who)
    return service


def test_the_agreement_panel_says_how_often_people_agreed_with_the_models_own_labels(data):
    view = AgreementService(data.sm, lambda: None).view()
    assert "People agreed with v2's own labels (implicit) on 1 of 2 pairs they also judged." in (
        view.summary()
    )
    assert [q.annotator for q in view.report.annotators] == ["ann", "bob"]
    assert view.report.units_with_overlap == 1  # Q1 by ann and bob; the model is no annotator
    [row] = view.to_dict()["self_labels"]
    assert (row["version"], row["judged"], row["agreed"], row["rate"]) == ("v2", 2, 1, 0.5)


def test_no_self_label_sentence_without_self_labels(tmp_path: Path):
    sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
    view = AgreementService(sm, lambda: None).view()
    assert "own labels" not in view.summary() and view.to_dict()["self_labels"] == []


def test_counts_keep_peoples_votes_apart_and_export_takes_self_labels_when_asked(data):
    stats = data.stats()
    assert (stats["votes"]["votes"], stats["by_annotator"]["self:v2"]["votes"]) == (6, 3)
    assert stats["default_pairs"] == 2  # Q0 (ann), Q1 (ann and bob agree): people's only
    with gr.Blocks():
        tab = layout(data)
    h = DataHandlers(data, tab)
    assert (
        "**Votes:** 6 (4 a, 2 b, 0 tie, 0 both-bad); 3 by people, 3 by models"
        in (h.refresh()[tab.summary])
    )

    def exported(include_self: bool) -> list[dict]:
        out = h.export("standard", ".jsonl", "all", ADMIN, "majority", [], False, include_self)
        return [json.loads(line) for line in Path(out[tab.export_file]).read_text().splitlines()]

    assert [(r["prompt"], r["chosen"]) for r in exported(False)] == [
        ("Q0?", "good 0"),
        ("Q1?", "bad 1"),
    ]
    with_self = exported(True)
    assert [(r["prompt"], r["chosen"], r["weight"]) for r in with_self] == [
        ("Q2?", "good 2", 0.5),  # the model's label: no person judged Q2
        ("Q0?", "good 0", 1.0),  # ann's vote replaces the model's
        ("Q1?", "bad 1", 1.0),
    ]
