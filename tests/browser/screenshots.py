"""Regenerate the README screenshots: `.venv/bin/python -m tests.browser.screenshots [OUT_DIR]`.

Starts the app on the embedded model with a fresh data directory, imports a few preference
pairs, then drives Debian's chromium through the three tabs: Label (a pair being labeled),
Train (a finished run with its curves), Compare (base vs v1 side by side, a blind vote).
Writes label.png, train.png and compare.png (default OUT_DIR: docs/).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from storage.db import open_db
from storage.io import import_pairs
from tests.app.server import start_app
from tests.browser.test_train_compare_browser import PAIRS, wait_for_run_end

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LONG_MS = 15 * 60 * 1000
HELDOUT = [
    ("Name a vegetable.", "Carrots are a crunchy vegetable.", "rock"),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "A town."),
]


def _import(db_url: str, directory: Path, rows, split: str) -> None:
    path = directory / f"pairs-{split}.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows)
    )
    with open_db(db_url).begin() as s:
        import_pairs(s, path, split=split)


def shoot(page, out_dir: Path) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#label-vote-a")).to_be_enabled(timeout=LONG_MS)
    page.screenshot(path=str(out_dir / "label.png"), full_page=True)

    page.get_by_role("tab", name="Train").click()
    page.get_by_text("Advanced").click()
    page.get_by_label("Epochs").fill("2")
    page.get_by_label("Epochs").press("Tab")
    page.get_by_text("Advanced").click()
    page.locator("#train-button").click()
    wait_for_run_end(page)
    page.wait_for_timeout(2000)  # let the last points reach the plots
    page.screenshot(path=str(out_dir / "train.png"), full_page=True)

    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#compare-b input")).to_have_value("v1", timeout=30_000)
    page.locator("#compare-prompt textarea").fill("Name a fruit.")
    page.locator("#compare-button").click()
    expect(page.locator("#compare-answer-b")).to_contain_text("v1", timeout=LONG_MS)
    page.wait_for_timeout(2000)  # the answers are shown dimmed until the event has finished
    page.screenshot(path=str(out_dir / "compare.png"), full_page=True)


def main(argv: list[str]) -> int:
    from playwright.sync_api import sync_playwright

    out_dir = Path(argv[0] if argv else "docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dpo-shots-") as tmp:
        data_dir = Path(tmp)
        app = start_app("embedded", data_dir, "--device", "cpu")
        try:
            _import(app.db_url, data_dir, PAIRS, "train")
            _import(app.db_url, data_dir, HELDOUT, "heldout")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(app.url)
                shoot(page, out_dir)
                browser.close()
        finally:
            app.stop()
    print(f"wrote {', '.join(str(out_dir / n) for n in ('label.png', 'train.png', 'compare.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
