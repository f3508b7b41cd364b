"""The next pair before the vote (in process, tiny model, real SQLite): prefetched after a pair
is complete, stored only when shown, dropped on a version change, off with prefetch=False."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.label.service import LabelService
from app.serving.service import ModelService
from app.serving.versions import VersionedModel
from storage import repo, runs
from storage.db import open_db
from storage.models import Response
from tests.tiny import save_random_adapter


@pytest.fixture
def label(tiny_lm, tmp_path: Path):
    def make(prefetch: bool = True) -> LabelService:
        sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
        with sm.begin() as s:
            runs.ensure_base_version(s, "tiny")
            repo.add_prompts(s, ["First prompt", "Second prompt", "Third prompt"], source="t")
        versions = VersionedModel(tiny_lm)
        return LabelService(sm, ModelService(versions), "tiny", prefetch=prefetch)

    return make


def _responses(service: LabelService) -> int:
    with service.sm.begin() as s:
        return s.scalar(select(func.count()).select_from(Response))


def test_the_next_pair_is_ready_when_asked_and_stored_only_when_shown(label):
    service = label()
    first = list(service.generate_pair("ann"))[-1]
    held = service._prefetched["ann"]
    assert held.pair.prompt_id != first.prompt_id
    held.ticket.result()  # the annotator reads; the next pair finishes meanwhile
    assert _responses(service) == 2  # generated, not stored: nobody has seen it
    events = list(service.generate_pair("ann"))
    assert events[1].done  # after the initial event, the complete pair at once
    assert events[-1].prompt_id == held.pair.prompt_id
    assert _responses(service) == 4


def test_a_version_change_drops_the_prefetched_pair(label, tiny_model_dir, tmp_path):
    service = label()
    list(service.generate_pair("ann"))
    held = service._prefetched["ann"]
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "v1")
    with service.sm.begin() as s:
        runs.register_adapter_version(
            s, base_model="tiny", adapter_path=str(adapter), activate=False
        )
    service.models.activate_version("v1", str(adapter))
    nxt = list(service.generate_pair("ann"))[-1]
    assert held.ticket.cancelled.is_set()
    assert nxt.version == "v1" and nxt.done


def test_no_prefetch_when_it_is_off(label):
    service = label(prefetch=False)
    list(service.generate_pair("ann"))
    assert service._prefetched == {}
