"""How the tabs look at 1280 px, in a real browser (Playwright + Debian's chromium), with no
model: the real layouts filled with fixed text. A short answer beside a long one starts at the
top of the row; the run history's headers break between words, never inside one."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from app.label.modes import PAIR
from app.label.screen import layout as label_layout
from app.label.service import LabelSettings
from app.train.tab import history_frame
from app.train.tab import layout as train_layout
from tests.app.test_train_tab import StubService
from tests.browser.pages import CHROMIUM, blocks_page

pytestmark = [pytest.mark.browser]


LONG = "\n\n".join(f"Paragraph {i}: " + "the sea is wide and deep and blue " * 6 for i in range(8))
NOTE = (
    "the training worker exited with code 1. The previous version stays active.\n"
    "Traceback: CUDA out of memory while allocating a tensor for the batch"
)
# Words per header line, counted in the browser: more lines than words means a word was split.
LINES_PER_HEADER = """
() => [...document.querySelectorAll('#train-history th')].map((th) => {
  const walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
  const tops = new Set();
  let words = 0;
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.textContent.trim();
    if (!text || node.parentElement.offsetParent === null) continue;  // hidden
    words += text.split(/\\s+/).length;
    const range = document.createRange();
    range.selectNodeContents(node);
    for (const rect of range.getClientRects()) if (rect.width > 0) tops.add(Math.round(rect.top));
  }
  return [th.innerText.trim(), words, tops.size];
}).filter(([text]) => text)
"""


class LabelStub:
    settings = LabelSettings()

    def guidelines(self) -> str:
        return "Pick the better answer."


def _history_rows() -> list[dict]:
    row = {"run": 3, "status": "failed", "version": "", "pairs": 10, "loss": "sigmoid"}
    row.update(beta=0.5, lr=0.0002, epochs=3, duration="0:00", note=NOTE)
    row.update({"final loss": "0.440", "reward acc": "0.750", "eval acc": "", "started": "x"})
    row["started"] = "2026-12-02 17:06"
    return [row, {**row, "run": 2, "status": "cancelled", "note": ""}]


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")

    with gr.Blocks() as demo:
        with gr.Tab("Label"):
            label = label_layout(LabelStub())
        with gr.Tab("Train"):
            train = train_layout(StubService())
        answers = [*label.views[PAIR].panes.answers, train.history]
        demo.load(lambda: (LONG, "Short.", history_frame(_history_rows())), outputs=answers)
    with blocks_page(demo) as page:
        yield page


def test_a_short_answer_starts_at_the_top_beside_a_long_one(page):
    from playwright.sync_api import expect

    expect(page.locator("#label-answer-b")).to_contain_text("Short.")
    a = page.locator("#label-answer-a").bounding_box()
    b = page.locator("#label-answer-b").bounding_box()
    assert a["height"] > 3 * b["height"]  # the long one really is longer
    assert abs(a["y"] - b["y"]) < 1


def test_the_run_history_headers_break_between_words_at_1280_px(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-history")).to_contain_text("sigmoid, β 0.5")
    headers = page.evaluate(LINES_PER_HEADER)
    assert [text for text, _, _ in headers][:3] == ["run", "status", "version"]
    split = [(text, lines) for text, words, lines in headers if lines > words]
    assert split == []
