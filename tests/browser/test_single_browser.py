"""The Label tab's one-answer mode in a real browser (Playwright + Debian's chromium) on the
tiny model: "Answers to judge: 1" hides the pair and shows one answer; the keys U and D store a
thumbs up and a thumbs down (also right after the click on the mode, which leaves the radio
button focused), and the next answer follows each."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from sqlalchemy import select

from app.label.service import LabelService, LabelSettings
from app.label.tab import build_label_tab
from app.serving.service import ModelService
from app.serving.versions import VersionedModel
from storage import repo, runs
from storage.db import open_db
from storage.models import AnswerVerdict
from tests.browser.pages import CHROMIUM, blocks_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ANSWER_TIMEOUT_MS = 3 * 60 * 1000  # a ceiling that only keeps a broken build from hanging


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    from dpo_core.modeling import load_model

    sm = open_db(f"sqlite:///{tmp_path_factory.mktemp('single-browser') / 'studio.db'}")
    with sm.begin() as s:
        runs.ensure_base_version(s, "tiny")
        repo.add_prompts(s, ["First prompt", "Second prompt", "Third prompt"], source="t")
    lm = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    models = ModelService(VersionedModel(lm))
    label = LabelService(sm, models, "tiny", settings=LabelSettings(max_new_tokens=32))
    with gr.Blocks() as demo, gr.Tab("Label"):
        build_label_tab(label, demo)
    with blocks_page(demo) as page:
        yield page, sm


def judge_with_key(page, key: str, judged: int) -> None:
    """Wait for a complete answer, press `key` (whatever has focus: the mode's radio button
    right after the switch), wait for the count and the next answer."""
    from playwright.sync_api import expect

    expect(page.locator("#label-verdict-up")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    prompt = page.inner_text("#label-prompt")
    page.keyboard.press(key)
    progress = page.locator("#label-progress")
    expect(progress).to_contain_text(f"Single answers judged by you: {judged}", timeout=60_000)
    expect(page.locator("#label-prompt")).not_to_have_text(prompt, timeout=ANSWER_TIMEOUT_MS)


def test_keys_u_and_d_store_verdicts_on_single_answers(app):
    from playwright.sync_api import expect

    page, sm = app
    expect(page.locator("#label-vote-a")).to_be_visible()  # the pair screen by default
    page.get_by_text("1 (thumbs up/down)").click()
    expect(page.locator("#label-answer-single")).to_be_visible()
    expect(page.locator("#label-vote-a")).to_be_hidden()
    expect(page.locator("#label-answer-a")).to_be_hidden()
    judge_with_key(page, "u", 1)  # the radio button just clicked has focus: keys still work
    page.evaluate("document.activeElement && document.activeElement.blur()")
    judge_with_key(page, "d", 2)
    with sm.begin() as s:
        verdicts = s.scalars(select(AnswerVerdict).order_by(AnswerVerdict.id)).all()
    assert [v.verdict for v in verdicts] == ["up", "down"]
    assert verdicts[0].annotator.startswith("guest-")
    assert verdicts[0].prompt_id != verdicts[1].prompt_id  # the next answer, another prompt
