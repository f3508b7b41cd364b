"""The Label tab in a real browser (Playwright + Debian's chromium) on the embedded model:
both answers stream in, `1` votes for A, the counter goes up and the next pair starts; keys do
nothing while a text box has focus; HTML in a prompt is shown as text, never run."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from storage.db import open_db
from storage.models import Preference
from tests.app.server import start_app

pytestmark = [pytest.mark.browser, pytest.mark.embedded, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAIR_TIMEOUT_MS = 5 * 60 * 1000  # a ceiling that only keeps a broken build from hanging
XSS = '<img src=x onerror="window.__xss = 1"> <script>window.__xss = 2</script> **bold**'


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    server = start_app("embedded", tmp_path_factory.mktemp("label-browser"), "--device", "cpu")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(app.url)
        yield page
        browser.close()


def test_vote_with_the_keyboard_then_the_next_pair_starts(page, app):
    from playwright.sync_api import expect

    vote_a = page.locator("#label-vote-a")
    progress = page.locator("#label-progress")
    expect(vote_a).to_be_enabled(timeout=PAIR_TIMEOUT_MS)  # both answers are complete
    expect(progress).to_contain_text("Labeled by you: 0")
    for pane in ("a", "b"):
        expect(page.locator(f"#label-count-{pane}")).to_contain_text("tokens")
        assert page.inner_text(f"#label-answer-{pane}").strip() not in ("", "…")
    first_prompt = page.inner_text("#label-prompt")
    annotator = page.input_value("#label-annotator textarea")
    assert annotator.startswith("guest-")

    rewrite = page.locator("#label-rewrite textarea")
    rewrite.click()
    page.keyboard.press("1")  # typing in a text box: not a vote
    expect(rewrite).to_have_value("1")
    page.wait_for_timeout(1000)
    expect(progress).to_contain_text("Labeled by you: 0")
    rewrite.fill("")
    page.evaluate("document.activeElement.blur()")

    page.keyboard.press("1")
    expect(progress).to_contain_text("Labeled by you: 1", timeout=60_000)
    expect(page.locator("#label-prompt")).not_to_have_text(first_prompt, timeout=60_000)
    expect(page.locator("#label-status")).to_contain_text("Writing", timeout=60_000)
    with open_db(app.db_url).begin() as s:
        votes = s.scalars(select(Preference)).all()
    assert [(v.annotator, v.rewrite) for v in votes] == [(annotator, None)]


def test_html_in_a_prompt_is_shown_as_text(page):
    from playwright.sync_api import expect

    page.get_by_role("button", name="Your own prompt").click()
    page.locator("#label-typed textarea").fill(XSS)
    page.locator("#label-ask").click()
    prompt = page.locator("#label-prompt")
    expect(prompt).to_contain_text('<img src=x onerror="window.__xss = 1">', timeout=60_000)
    expect(prompt).to_contain_text("<script>window.__xss = 2</script>")
    assert prompt.locator("img").count() == 0
    assert prompt.locator("strong").inner_text() == "bold"  # Markdown still renders
    assert page.evaluate("window.__xss") is None
