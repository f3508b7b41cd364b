"""Checking the model's own labels in a real browser (Playwright + Debian's chromium) on the
tiny model: with self-labels in the database, "Check the model's labels" in the Label tab shows
one as a normal A/B pair; the person's vote is recorded, and the Data tab's agreement sentence
changes from "not yet judged" to how often people agreed with the model."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from app.data.agreement import AgreementService, build_agreement_panel
from app.label.service import LabelService, LabelSettings
from app.label.tab import build_label_tab
from app.serving.service import ModelService
from app.serving.versions import VersionedModel
from storage import repo, runs
from storage.db import open_db
from storage.self_labels import SelfLabel, add_self_labels
from tests.browser.pages import CHROMIUM, blocks_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ANSWER_TIMEOUT_MS = 3 * 60 * 1000  # a ceiling that only keeps a broken build from hanging


@pytest.fixture(scope="module")
def page(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    from dpo_core.modeling import load_model

    sm = open_db(f"sqlite:///{tmp_path_factory.mktemp('self-labels-browser') / 'studio.db'}")
    with sm.begin() as s:
        runs.ensure_base_version(s, "tiny")
        runs.register_adapter_version(s, base_model="tiny", adapter_path="/a/v1", activate=False)
        repo.add_prompts(s, ["First prompt", "Second prompt"], source="t")
        label = SelfLabel("Name a fruit.", "An apple.", "A brick.", 2.5, "margin", 1.0)
        add_self_labels(s, "v1", [label])
    lm = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    models = ModelService(VersionedModel(lm))
    service = LabelService(sm, models, "tiny", settings=LabelSettings(max_new_tokens=16))
    with gr.Blocks() as demo:
        with gr.Tab("Label"):
            build_label_tab(service, demo)
        with gr.Tab("Data") as data_tab:
            build_agreement_panel(AgreementService(sm, lambda: None), demo, data_tab)
    with blocks_page(demo) as page:
        yield page


def agreement_sentence(page, text: str) -> None:
    """Open the Data tab's agreement panel and wait for `text` in its summary."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Data").click()
    summary = page.locator("#agreement-summary")
    if not summary.is_visible():
        page.locator("#data-agreement").get_by_text("Agreement between annotators").click()
    expect(summary).to_contain_text(text, timeout=60_000)


def test_a_person_checks_a_self_label_and_the_agreement_sentence_changes(page):
    from playwright.sync_api import expect

    agreement_sentence(page, "People have not yet judged any of the 1 pairs of v1's own labels")
    page.get_by_role("tab", name="Label").click()
    page.locator("#label-answers").get_by_text("Check the model's labels").click()
    status = page.locator("#label-status")
    expect(status).to_contain_text("One of v1's own labels", timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#label-prompt")).to_contain_text("Name a fruit.")
    apple = "a" if "An apple." in page.inner_text("#label-answer-a") else "b"
    page.locator(f"#label-vote-{apple}").click()  # the side the model chose: agrees with it
    expect(status).to_contain_text("No labels of the model's to check", timeout=60_000)
    agreement_sentence(page, "People agreed with v1's own labels (margin) on 1 of 1 pairs")
