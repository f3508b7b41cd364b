"""Rounds in the Train tab, in a real browser (Playwright + Debian's chromium): after two runs
(v1 on the base's answers, v2 on v1's answers only) the tab says how many pairs were labeled on
v2's answers and invites the next round; choosing Train on: parent recounts the pairs on the
active version's answers, a fresh adapter counts the base's; the run history shows lineage.
A real TrainingService on SQLite, the worker launch left out (no model, no training)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from app.train.service import TrainingService, TrainRequest
from app.train.tab import build_train_tab
from storage import runs
from storage.db import open_db
from tests.app.test_train_rounds import MODEL, finish, label
from tests.browser.pages import CHROMIUM, blocks_page

pytestmark = [pytest.mark.browser]


def rounds_service(tmp_path: Path) -> TrainingService:
    """Round 1 made v1 from 3 pairs of the base's answers; round 2 made v2 from the 2 pairs on
    v1's answers (train on parent); 1 pair labeled on v2's answers since."""
    url = f"sqlite:///{tmp_path / 'studio.db'}"
    sm = open_db(url)
    service = TrainingService(
        sm, db_url=url, data_dir=tmp_path, base_model=MODEL, model_settings={"model": MODEL}
    )
    service._launch = lambda run_id, devices=1: None  # type: ignore[method-assign]
    with sm.begin() as s:
        runs.ensure_base_version(s, MODEL)
    label(sm, "base", "base one", "base two", "base three")
    finish(sm, service.start(TrainRequest()).run_id, "v1")
    label(sm, "v1", "v1 one", "v1 two")
    finish(sm, service.start(TrainRequest(train_on="parent")).run_id, "v2")
    label(sm, "v2", "v2 one")
    return service


@pytest.fixture
def page(tmp_path: Path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    service = rounds_service(tmp_path)
    with gr.Blocks() as demo, gr.Tab("Train") as tab:
        build_train_tab(service, tab)
    with blocks_page(demo) as page:
        yield page


def test_the_tab_counts_the_new_versions_pairs_and_recounts_for_the_round_chosen(page):
    from playwright.sync_api import expect

    summary = page.locator("#train-summary")
    expect(summary).to_contain_text("1 pair labeled on v2's answers since v2 was made.")
    expect(summary).to_contain_text("label ~2 pairs of its answers (1 so far)")
    expect(page.locator("#train-progress")).to_contain_text("v2 is now serving in Label")
    expect(page.locator("#train-history")).to_contain_text("v2 ← v1 ← base")
    expect(page.locator("#train-history")).to_contain_text("train on parent: 2 on v1's answers")
    page.get_by_role("button", name="Advanced").click()
    page.locator("#setting-train_on input").click()
    page.get_by_role("option", name="parent").click()
    expect(summary).to_contain_text("1 usable preference pairs on v2's answers")
    page.locator("#setting-continue_from_active input").click()  # a fresh adapter: the base's
    expect(summary).to_contain_text("3 usable preference pairs on base's answers")
