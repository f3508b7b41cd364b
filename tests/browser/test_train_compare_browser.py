"""End to end in a real browser (Playwright + Debian's chromium) on the embedded model:
import a few preference pairs, click Train, watch the progress bar and a curve, then Compare."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from storage.db import open_db
from storage.io import import_pairs
from tests.app.server import start_app

pytestmark = [pytest.mark.browser, pytest.mark.embedded, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TRAIN_TIMEOUT_MS = 15 * 60 * 1000  # a generous ceiling; no timing is asserted
ENDED = re.compile("succeeded|failed|cancelled")
PAIRS = [
    ("Name a fruit.", "Apples are a crisp, sweet fruit.", "idk"),
    ("What is the capital of France?", "The capital of France is Paris.", "Some city."),
    ("Give me a colour.", "Blue, the colour of a clear sky.", "no"),
    ("How many legs does a spider have?", "A spider has eight legs.", "Many."),
    ("Name a planet.", "Mars, the red planet.", "a rock"),
    ("What do bees make?", "Bees make honey from nectar.", "stuff"),
    ("Say hello in Spanish.", "Hola!", "hello"),
    ("What is 2 + 2?", "2 + 2 = 4.", "5"),
    ("Name a musical instrument.", "The violin.", "noise"),
    ("What colour is grass?", "Grass is green.", "purple"),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    data_dir = tmp_path_factory.mktemp("studio-browser")
    server = start_app("embedded", data_dir, "--device", "cpu")
    path = data_dir / "pairs.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS)
    )
    with open_db(server.db_url).begin() as s:
        import_pairs(s, path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(app.url)
        yield page
        browser.close()


def wait_for_run_end(page, timeout_ms: int = TRAIN_TIMEOUT_MS) -> None:
    """Wait until the progress block shows a finished run; fail with its message otherwise."""
    from playwright.sync_api import expect

    block = page.locator("#train-progress .train-progress")
    expect(block).to_have_attribute("data-status", ENDED, timeout=timeout_ms)
    assert block.get_attribute("data-status") == "succeeded", block.inner_text()


def test_train_then_compare(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-summary")).to_contain_text("10 usable preference pairs")
    page.get_by_text("Advanced").click()
    epochs = page.get_by_label("Epochs")
    epochs.fill("1")
    epochs.press("Tab")
    page.locator("#train-button").click()
    expect(page.locator("#train-message")).to_contain_text("started on")
    progress = page.locator("#train-progress progress")
    expect(progress).to_be_visible(timeout=60_000)
    wait_for_run_end(page)
    # The curves are drawn: Vega renders SVG, a line is a stroked path through several points,
    # and the legend names every curve of the plot.
    for plot, curve in (("#plot-loss", "loss"), ("#plot-rewards", "rewards/margins")):
        lines = page.locator(f'{plot} g.mark-line path[stroke][d*="L"]')
        expect(lines).not_to_have_count(0, timeout=30_000)
        legend = page.locator(f"{plot} g.role-legend-label text")
        expect(legend.filter(has_text=re.compile(f"^{re.escape(curve)}$"))).to_have_count(1)
    expect(page.locator("#train-progress")).to_contain_text("v1 is the new version")
    expect(page.locator("#train-history")).to_contain_text("succeeded")

    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#compare-b input")).to_have_value("v1", timeout=30_000)
    page.locator("#compare-prompt textarea").fill("Name a fruit.")
    page.locator("#compare-button").click()
    expect(page.locator("#compare-answer-a")).to_contain_text("base", timeout=300_000)
    expect(page.locator("#compare-answer-b")).to_contain_text("v1", timeout=300_000)
    for pane in ("#compare-answer-a", "#compare-answer-b"):
        assert len(page.locator(pane).inner_text().strip()) > len("base")
