"""The Train tab's choice of votes in a real browser (Playwright + Debian's chromium), with no
model: a real training service on SQLite with three annotators' votes. Choosing `every`, or
leaving an annotator out, changes the pair count shown above Train at once."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from app.train.service import TrainingService
from app.train.tab import build_train_tab
from storage.db import open_db
from tests.browser.pages import CHROMIUM, blocks_page
from tests.storage.test_selection import three_annotators

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")

    data_dir = tmp_path_factory.mktemp("votes-browser")
    url = f"sqlite:///{data_dir / 'studio.db'}"
    sm = open_db(url)
    with sm.begin() as s:
        three_annotators(s)
    service = TrainingService(
        sm, db_url=url, data_dir=data_dir, base_model="tiny", model_settings={"model": "tiny"}
    )
    with gr.Blocks() as demo, gr.Tab("Train") as tab:
        build_train_tab(service, tab)
    with blocks_page(demo) as page:
        yield page


def test_the_pair_count_follows_the_votes_chosen(page):
    from playwright.sync_api import expect

    summary = page.locator("#train-summary")
    expect(summary).to_contain_text("3 usable preference pairs")
    expect(summary).to_contain_text("2 answer pairs whose votes do not agree enough")
    page.get_by_text("Advanced").click()
    page.locator("#setting-votes input").click()
    page.get_by_role("option", name="every").click()
    expect(summary).to_contain_text("12 usable preference pairs")
    page.locator("#setting-leave_out input").click()
    page.get_by_role("option", name="cat").click()
    expect(summary).to_contain_text("9 usable preference pairs")
    expect(summary).to_contain_text("4 votes left out")
