"""The #6 acceptance walk-through, in a real browser, which also regenerates the README
screenshots: `.venv/bin/python -m tests.browser.screenshots [OUT_DIR]`.

Starts the app as `make run` does (embedded model, fresh data directory) and does what a new
user does, without a terminal: label 10 pairs with the keyboard (1 = A is better, 2 = B),
click Train with the default settings, watch the progress and curves until v1 is serving, then
compare base vs v1 side by side. Writes label.png, train.png, compare.png and data.png
(default OUT_DIR: docs/) and prints what it saw at each step.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from storage.db import open_db
from storage.io import import_pairs
from tests.app.server import start_app
from tests.browser.test_train_compare_browser import wait_for_run_end

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LONG_MS = 40 * 60 * 1000  # a busy 2-core machine trains slowly; no timing is asserted
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


def label_pairs(page, n: int) -> None:
    """Vote on `n` pairs with the keys 1 and 2, as a person would, waiting for each pair."""
    from playwright.sync_api import expect

    progress = page.locator("#label-progress")
    for i in range(n):
        expect(page.locator("#label-vote-a")).to_be_enabled(timeout=LONG_MS)
        page.evaluate("document.activeElement && document.activeElement.blur()")
        page.keyboard.press("1" if i % 3 else "2")
        expect(progress).to_contain_text(f"Labeled by you: {i + 1}", timeout=LONG_MS)
        print(f"  labeled pair {i + 1}", flush=True)


def shoot(page, out_dir: Path, pairs: int = 10) -> None:
    from playwright.sync_api import expect

    t0 = time.monotonic()
    expect(page.locator("#label-vote-a")).to_be_enabled(timeout=LONG_MS)
    page.screenshot(path=str(out_dir / "label.png"), full_page=True)
    label_pairs(page, pairs)
    print(f"labeled {pairs} pairs in {time.monotonic() - t0:.0f} s", flush=True)

    page.get_by_role("tab", name="Train").click()
    usable = pairs + len(HELDOUT)  # the labeled pairs and the imported held-out ones
    expect(page.locator("#train-summary")).to_contain_text(f"{usable} usable preference pairs")
    t1 = time.monotonic()
    page.locator("#train-button").click()  # the defaults
    expect(page.locator("#train-progress progress")).to_be_visible(timeout=LONG_MS)
    print("training: the progress bar is up", flush=True)
    lines = page.locator('#plot-loss g.mark-line path[stroke][d*="L"]')
    expect(lines).not_to_have_count(0, timeout=LONG_MS)
    print(f"training: the loss curve is drawn after {time.monotonic() - t1:.0f} s", flush=True)
    wait_for_run_end(page, LONG_MS)
    page.wait_for_timeout(2000)  # let the last points reach the plots
    print("training: " + page.inner_text("#train-progress").replace("\n", " | "), flush=True)
    page.screenshot(path=str(out_dir / "train.png"), full_page=True)

    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#compare-a input")).to_have_value("base", timeout=30_000)
    expect(page.locator("#compare-b input")).to_have_value("v1", timeout=30_000)
    page.locator("#compare-prompt textarea").fill("Suggest a name for a small bakery.")
    page.locator("#compare-button").click()
    expect(page.locator("#compare-answer-b")).to_contain_text("v1", timeout=LONG_MS)
    page.wait_for_timeout(2000)  # the answers are shown dimmed until the event has finished
    for pane in ("a", "b"):
        text = page.inner_text(f"#compare-answer-{pane}").replace("\n", " ")
        print(f"compare {pane}: {text[:160]}", flush=True)
    page.screenshot(path=str(out_dir / "compare.png"), full_page=True)

    page.get_by_role("tab", name="Data").click()
    page.wait_for_timeout(2000)
    page.screenshot(path=str(out_dir / "data.png"), full_page=True)
    print(f"walk-through done in {time.monotonic() - t0:.0f} s", flush=True)


def main(argv: list[str]) -> int:
    from playwright.sync_api import sync_playwright

    out_dir = Path(argv[0] if argv else "docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dpo-shots-") as tmp:
        data_dir = Path(tmp)
        app = start_app("embedded", data_dir, "--device", "cpu")
        try:
            _import(app.db_url, data_dir, HELDOUT, "heldout")  # for the Compare drop-down
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
                )
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(app.url)
                shoot(page, out_dir)
                browser.close()
        finally:
            app.stop()
    names = ("label.png", "train.png", "compare.png", "data.png")
    print(f"wrote {', '.join(str(out_dir / n) for n in names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
