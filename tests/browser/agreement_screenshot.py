"""Regenerate docs/agreement.png: `python -m tests.browser.agreement_screenshot [OUT_DIR]`.

Starts the app on a tiny random model (sign-in off), stores votes of five annotators on twenty
pairs, each judged by three of them (dave always picks the left side, so his position bias is
flagged; erin saw an AI judge's suggestion with each pair), sets the overlap to 3, opens the
Data tab's agreement panel in Debian's chromium and saves a screenshot 1280 px wide.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from storage import repo
from storage.db import open_db
from storage.overlap import set_overlap_k
from storage.runs import list_versions
from tests.app.server import start_app
from tests.browser.pages import browser_page
from tests.tiny import save_tiny_model

PAIRS = 20
# Each annotator's chance of preferring the better answer (the rest: the other, a tie, both bad);
# dave is not in it: he always picks the left side, in about 2 s.
SKILL = {"alice": 0.9, "bob": 0.85, "carol": 0.75, "erin": 0.9}
TEAM = [*SKILL, "dave"]
OVERLAP = 3
PANEL_CLIP_JS = """
() => {  // the panel down to its overlap row (not the empty download box below it)
  const panel = document.getElementById("data-agreement").getBoundingClientRect();
  const row = ["agreement-overlap", "agreement-set-overlap", "agreement-download"].map(
    (id) => document.getElementById(id).getBoundingClientRect().bottom);
  return {x: panel.left, y: panel.top, width: panel.width,
          height: Math.max(...row) + 12 - panel.top};
}
"""


def store_votes(db_url: str, seed: int = 0) -> None:
    """Each pair judged by OVERLAP annotators, in turn: 20 x 3 = 60 votes, 12 each."""
    rng = random.Random(seed)
    with open_db(db_url).begin() as s:
        version = list_versions(s)[0].id  # the base model the app registered
        for k in range(PAIRS):
            prompt = repo.add_prompt(s, f"Question {k}: explain a thing in one sentence.").id
            texts = {"good": f"A clear answer to {k}.", "bad": f"A muddled answer to {k}."}
            order = ["good", "bad"] if rng.random() < 0.5 else ["bad", "good"]  # ids vary too
            ids = {
                which: repo.record_response(
                    s, prompt_id=prompt, model_version_id=version, text=texts[which]
                ).id
                for which in order
            }
            good, bad = ids["good"], ids["bad"]
            for i in range(OVERLAP):
                name = TEAM[(k + i) % len(TEAM)]
                _vote(s, rng, name, (good, bad))
        set_overlap_k(s, OVERLAP)


def _pick(rng: random.Random, skill: float) -> str:
    """'good', 'bad', 'tie' or 'both_bad'."""
    r = rng.random()
    if r < skill:
        return "good"
    return rng.choice(["bad", "bad", "tie", "both_bad"])


def _vote(s: Session, rng: random.Random, name: str, pair: tuple[int, int]) -> None:
    good, bad = pair
    left, right = (good, bad) if rng.random() < 0.5 else (bad, good)
    if name == "dave":
        choice, seconds = "a", rng.uniform(1.5, 3)
    else:
        pick = _pick(rng, SKILL[name])
        winner = {"good": good, "bad": bad}.get(pick)
        choice = pick if winner is None else ("a" if winner == left else "b")
        seconds = rng.uniform(8, 40)
    suggestion = None
    if name == "erin":  # she saw an AI judge's suggestion: the better answer, as shown
        suggestion = repo.Suggested("a" if good == left else "b", "judge:replay")
    repo.record_preference(
        s,
        response_a_id=left,
        response_b_id=right,
        choice=choice,
        annotator=name,
        seconds_spent=seconds,
        suggestion=suggestion,
    )


def main(out_dir: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="agreement-shot-"))
    model = save_tiny_model(work / "tiny")
    app = start_app(str(model), work / "data", "--dtype", "fp32", "--device", "cpu")
    try:
        store_votes(app.db_url)
        with browser_page(app.url, 1280, 3200) as page:  # tall: no inner scrolling
            page.get_by_role("tab", name="Data").click()
            page.locator("#data-agreement").get_by_text("Agreement between annotators").click()
            summary = page.locator("#agreement-summary")
            summary.get_by_text("Krippendorff").wait_for()
            page.locator("#agreement-annotators").get_by_text("dave").wait_for()
            page.locator("#agreement-contested").get_by_text("disagreement").wait_for()
            page.locator("#agreement-contested").get_by_text("33%").first.wait_for()
            page.mouse.move(0, 0)  # no row highlighted under the pointer
            page.wait_for_timeout(1000)  # the tables' layout settles
            path = out_dir / "agreement.png"
            clip = page.evaluate(PANEL_CLIP_JS)
            page.screenshot(path=str(path), clip=clip)
            print(summary.inner_text())
    finally:
        app.stop()
        shutil.rmtree(work, ignore_errors=True)
    return path


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs")))
