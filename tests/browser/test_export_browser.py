"""Export from the Train tab in a real browser (Playwright + Debian's chromium), tiny model:
the admin picks v1, exports merged weights, then a q8_0 GGUF; both land under
<data-dir>/exports/. The Compare tab's Leaderboard shows the versions once there are votes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from storage import runs
from tests.app.server import start_app
from tests.browser.leaderboard_screenshot import simulate_votes
from tests.browser.pages import browser_page
from tests.tiny import save_random_adapter

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EXPORT_TIMEOUT_MS = 5 * 60 * 1000  # a generous ceiling on a busy machine; no timing is asserted


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    data_dir = tmp_path_factory.mktemp("export-browser")
    server = start_app(str(tiny_model_dir), data_dir, "--dtype", "fp32", "--device", "cpu")
    simulate_votes(server.db_url)  # registers v1..v3 (no adapter files) and blind votes
    adapter = save_random_adapter(tiny_model_dir, data_dir / "adapters" / "v4")
    from storage.db import open_db

    with open_db(server.db_url).begin() as s:
        base = runs.list_versions(s)[0]
        runs.register_adapter_version(
            s, base_model=base.base_model, adapter_path=str(adapter), activate=False
        )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(app):
    with browser_page(app.url) as page:
        yield page


def choose(page, elem_id: str, option: str) -> None:
    from playwright.sync_api import expect

    box = page.locator(f"#{elem_id} input")
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(box).to_have_value(option)


def test_admin_exports_merged_and_gguf_from_the_train_tab(app, page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    page.get_by_text("Export a version").click()
    # the page's load filled the list (the active version); a pick made now is not overwritten
    expect(page.locator("#export-version input")).to_have_value("base")
    choose(page, "export-version", "v4")
    page.locator("#export-button").click()
    message = page.locator("#export-message")
    expect(message).to_contain_text("✅ Exported v4 (merged)", timeout=EXPORT_TIMEOUT_MS)
    assert (app.data_dir / "exports" / "v4-merged" / "model.safetensors").is_file()
    page.get_by_role("radio", name="gguf").check()
    choose(page, "export-gguf-type", "q8_0")
    page.locator("#export-button").click()
    expect(message).to_contain_text("✅ Exported v4 (gguf)", timeout=EXPORT_TIMEOUT_MS)
    files = {p.name for p in (app.data_dir / "exports" / "v4-gguf-q8_0").iterdir()}
    assert "Modelfile" in files and any(f.endswith("-q8_0.gguf") for f in files)


def test_a_version_without_its_adapter_gets_a_message(app, page):
    from playwright.sync_api import expect

    page.get_by_role("radio", name="merged").check()
    choose(page, "export-version", "v1")
    page.locator("#export-button").click()
    expect(page.locator("#export-message")).to_contain_text("The adapter of v1 is gone")


def test_leaderboard_in_the_compare_tab(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("tab", name="Leaderboard").click()
    expect(page.locator("#leaderboard-summary")).to_contain_text("138 blind votes")
    expect(page.locator("#leaderboard-summary")).to_contain_text("No votes yet: v4")
    table = page.locator("#leaderboard-table")
    for version in ("base", "v1", "v2", "v3"):
        expect(table).to_contain_text(version)
