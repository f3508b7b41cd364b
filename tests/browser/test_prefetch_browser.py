"""Prefetch in a real browser (Playwright + Debian's chromium) on the tiny model: while the
person reads a pair, their next pair is written; after the vote it appears complete at once.

What the page shows tells the two apart: a pair generated after the vote streams in, so its
token counts read "N tokens …" while it is written; a prefetched pair arrives finished, so the
counts go from empty straight to "N tokens". A MutationObserver records every count text the
page showed between the key press and the next complete pair."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.server import start_app
from tests.browser.test_label_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PAIR_TIMEOUT_MS = 3 * 60 * 1000  # a ceiling that only keeps a broken build from hanging
VOTES = 4
READING_MS = 3000  # a person reading the pair: the time the prefetch has to finish
WATCH_COUNTS_JS = """
() => {
  window.__dpoCounts = [];
  if (window.__dpoCountObserver) window.__dpoCountObserver.disconnect();
  const watched = ["label-count-a", "label-count-b"].map((id) => document.getElementById(id));
  const note = () => watched.forEach((el) => window.__dpoCounts.push(el.innerText.trim()));
  window.__dpoCountObserver = new MutationObserver(note);
  watched.forEach((el) => window.__dpoCountObserver.observe(
    el, {subtree: true, childList: true, characterData: true}));
}
"""


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    data_dir = tmp_path_factory.mktemp("prefetch-browser")
    server = start_app(str(tiny_model_dir), data_dir, "--dtype", "fp32", "--device", "cpu")
    yield server
    server.stop()


def wait_for_complete_pair(page) -> None:
    """Both answers finished: the vote buttons enabled, both counts final."""
    from playwright.sync_api import expect

    expect(page.locator("#label-vote-a")).to_be_enabled(timeout=PAIR_TIMEOUT_MS)
    for pane in ("a", "b"):
        count = page.locator(f"#label-count-{pane}")
        expect(count).to_contain_text("tokens", timeout=PAIR_TIMEOUT_MS)
        expect(count).not_to_contain_text("…", timeout=PAIR_TIMEOUT_MS)


def test_after_each_vote_the_next_pair_is_already_complete(app):
    from playwright.sync_api import expect, sync_playwright

    streamed_after_vote = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(app.url)
        wait_for_complete_pair(page)
        for n in range(1, VOTES + 1):
            page.wait_for_timeout(READING_MS)
            prompt = page.inner_text("#label-prompt")
            page.evaluate(WATCH_COUNTS_JS)
            page.evaluate("document.activeElement && document.activeElement.blur()")
            page.keyboard.press("1")
            progress = page.locator("#label-progress")
            expect(progress).to_contain_text(f"Labeled by you: {n}", timeout=60_000)
            expect(page.locator("#label-prompt")).not_to_have_text(prompt, timeout=PAIR_TIMEOUT_MS)
            wait_for_complete_pair(page)
            seen = page.evaluate("window.__dpoCounts")
            streamed_after_vote.append([c for c in seen if c.endswith("…")])
        browser.close()
    prefetched = sum(not partial for partial in streamed_after_vote)
    assert prefetched >= VOTES - 1, streamed_after_vote
