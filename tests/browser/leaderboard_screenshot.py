"""Regenerate docs/leaderboard.png: `python -m tests.browser.leaderboard_screenshot [OUT_DIR]`.

Starts the app on a tiny random model with four registered versions and simulated blind votes
(true strengths base 0, v1 +0.6, v2 +1.0, v3 +0.9 in log-odds; v3 has few votes), opens the
Compare tab's Leaderboard in Debian's chromium and saves a screenshot.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from pathlib import Path

from storage import repo, runs
from storage.db import open_db
from tests.app.server import start_app
from tests.browser.pages import browser_page
from tests.tiny import save_tiny_model

STRENGTH = {"base": 0.0, "v1": 0.6, "v2": 1.0, "v3": 0.9}
MATCHES = [("v1", "base", 60), ("v2", "v1", 40), ("v2", "base", 30), ("v3", "v2", 8)]


def simulate_votes(db_url: str, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open_db(db_url).begin() as s:
        base = runs.list_versions(s)[0]
        ids = {"base": base.id}
        for name in ("v1", "v2", "v3"):
            version = runs.register_adapter_version(
                s, base_model=base.base_model, adapter_path=f"/demo/{name}", activate=False
            )
            ids[name] = version.id
        for a, b, n in MATCHES:
            for k in range(n):
                prompt = repo.add_prompt(s, f"{a} vs {b}, prompt {k}").id
                left, right = (a, b) if rng.random() < 0.5 else (b, a)
                answers = [
                    repo.record_response(s, prompt_id=prompt, model_version_id=ids[v], text=v)
                    for v in (left, right)
                ]
                repo.record_comparison_vote(
                    s,
                    response_left_id=answers[0].id,
                    response_right_id=answers[1].id,
                    winner=_winner(rng, STRENGTH[left] - STRENGTH[right]),
                    annotator=f"annotator{k % 3}",
                )


def _winner(rng: random.Random, gap: float) -> str:
    if rng.random() < 0.1:
        return "tie"
    return "left" if rng.random() < 1 / (1 + 2.718281828 ** (-gap)) else "right"


def main(out_dir: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="leaderboard-shot-"))
    model = save_tiny_model(work / "tiny")
    app = start_app(str(model), work / "data", "--dtype", "fp32", "--device", "cpu")
    try:
        simulate_votes(app.db_url)
        with browser_page(app.url, 1280, 900) as page:
            page.get_by_role("tab", name="Compare").click()
            page.get_by_role("tab", name="Leaderboard").click()
            page.locator("#leaderboard-summary").get_by_text("Compare next").wait_for()
            path = out_dir / "leaderboard.png"
            page.screenshot(path=str(path), full_page=True)
            print(page.locator("#leaderboard-summary").inner_text())
    finally:
        app.stop()
        shutil.rmtree(work, ignore_errors=True)
    return path


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs")))
