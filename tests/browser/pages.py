"""Browser plumbing shared by the browser tests and the screenshot scripts: a page in Debian's
headless chromium (never a downloaded browser), on a running app or on Blocks served here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]


@contextmanager
def browser_page(url: str, width: int = 1400, height: int = 1100) -> Iterator[Any]:
    """A Playwright page on `url` in Debian's headless chromium, closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            yield page
        finally:
            browser.close()


@contextmanager
def blocks_page(demo: Any, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """Serve `demo` (gr.Blocks) on a free loopback port and open it; both closed on exit."""
    from tests.app.server import free_port

    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        with browser_page(f"http://127.0.0.1:{port}/", width, height) as page:
            yield page
    finally:
        demo.close()
