"""Rankings in a real browser (Playwright + Debian's chromium) on the tiny model: choose
"3 (rank)", three answers stream in, the keys `B` then `A` order them (C is then the worst),
the ranking and its three implied pairs are stored, and the next three answers start."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from storage.db import open_db
from storage.models import Preference, Ranking
from tests.app.server import start_app
from tests.browser.pages import CHROMIUM, browser_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ANSWERS_TIMEOUT_MS = 3 * 60 * 1000  # a ceiling that only keeps a broken build from hanging


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    data_dir = tmp_path_factory.mktemp("rank-browser")
    server = start_app(str(tiny_model_dir), data_dir, "--dtype", "fp32", "--device", "cpu")
    yield server
    server.stop()


def test_rank_three_answers_with_the_keys_and_the_pairs_are_stored(app):
    from playwright.sync_api import expect

    with browser_page(app.url) as page:
        expect(page.locator("#label-vote-a")).to_be_enabled(timeout=ANSWERS_TIMEOUT_MS)
        page.get_by_role("radio", name="3 (rank)").check()
        expect(page.locator("#label-vote-a")).to_be_hidden()
        pick_a = page.locator("#rank-pick-a")
        expect(pick_a).to_be_enabled(timeout=ANSWERS_TIMEOUT_MS)  # all three are complete
        for fourth in ("#rank-pick-d", "#rank-answer-d"):  # three answers, not four
            expect(page.locator(fourth)).to_be_hidden()
        for pane in "abc":
            expect(page.locator(f"#rank-count-{pane}")).to_contain_text("tokens")
        first_prompt = page.inner_text("#label-prompt")
        annotator = page.input_value("#label-annotator textarea")

        page.keyboard.press("b")
        expect(page.locator("#rank-order")).to_contain_text("B > …", timeout=60_000)
        page.keyboard.press("a")
        status = page.locator("#label-status")
        expect(status).to_contain_text("Recorded: B > A > C (3 pairs)", timeout=60_000)
        expect(page.locator("#label-progress")).to_contain_text("Labeled by you: 3")
        expect(page.locator("#label-prompt")).not_to_have_text(first_prompt, timeout=60_000)
        expect(pick_a).to_be_enabled(timeout=ANSWERS_TIMEOUT_MS)  # the next three

    with open_db(app.db_url).begin() as s:
        [ranking] = s.scalars(select(Ranking).where(Ranking.annotator == annotator)).all()
        assert len(ranking.response_ids) == 3 and ranking.seconds_spent > 0
        votes = s.scalars(select(Preference).where(Preference.ranking_id == ranking.id)).all()
        best, middle, worst = ranking.response_ids
        won = {(v.response_a_id if v.choice == "a" else v.response_b_id) for v in votes}
        lost = {(v.response_b_id if v.choice == "a" else v.response_a_id) for v in votes}
        assert len(votes) == 3 and won == {best, middle} and lost == {middle, worst}
