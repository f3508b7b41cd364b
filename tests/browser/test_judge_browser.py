"""The AI judge in a real browser (Playwright + Debian's chromium) on the tiny model: a loopback
OpenAI-compatible server replays a recorded verdict for A; once the pair is complete the status
line shows the suggestion, the person presses `2` (B) anyway, and the database keeps both what
was suggested and what the person chose."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.agreement import judge_followed
from storage.db import open_db
from storage.models import Preference
from tests.app.server import start_app
from tests.browser.test_label_browser import CHROMIUM, CHROMIUM_ARGS
from tests.dpo_core.test_judge import RECORDED, Replay, replay_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PAIR_TIMEOUT_MS = 3 * 60 * 1000  # a ceiling that only keeps a broken build from hanging
REPLY = {  # what an OpenAI-compatible server answered (the shape llama.cpp and vLLM send)
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Verdict: A\nReason: A is more direct."},
            "finish_reason": "stop",
        }
    ],
}


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    """test_judge's replaying server, answering REPLY to the model name `replay`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(RECORDED, "replay", REPLY)
        with replay_server() as url:
            yield url


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, judge_url: str):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    data_dir = tmp_path_factory.mktemp("judge-browser")
    extra = ("--dtype", "fp32", "--device", "cpu", "--judge-url", judge_url)
    server = start_app(str(tiny_model_dir), data_dir, *extra, "--judge-model", "replay")
    yield server
    server.stop()


def test_the_judges_suggestion_is_shown_and_the_persons_vote_decides(app):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(app.url)
        status = page.locator("#label-status")
        expect(page.locator("#label-vote-b")).to_be_enabled(timeout=PAIR_TIMEOUT_MS)
        expect(status).to_contain_text("replay suggests: A is better", timeout=PAIR_TIMEOUT_MS)
        expect(status).to_contain_text("A is more direct")
        annotator = page.input_value("#label-annotator textarea")
        page.evaluate("document.activeElement && document.activeElement.blur()")
        page.keyboard.press("2")  # B, against the suggestion
        expect(page.locator("#label-progress")).to_contain_text("Labeled by you: 1", timeout=60_000)
        browser.close()

    assert Replay.seen and {seen["body"]["model"] for seen in Replay.seen} == {"replay"}
    with open_db(app.db_url).begin() as s:
        (vote,) = s.scalars(select(Preference)).all()
        right = (
            vote.response_b_id
            if vote.left_response_id == vote.response_a_id
            else vote.response_a_id
        )
        winner = vote.response_a_id if vote.choice == "a" else vote.response_b_id
        suggested = vote.response_a_id if vote.suggested_choice == "a" else vote.response_b_id
        assert vote.annotator == annotator
        assert vote.choice in ("a", "b") and winner == right  # B as shown: the right answer
        assert suggested == vote.left_response_id  # the judge picked A as shown
        assert vote.suggested_by == "judge:replay"
        followed = judge_followed(s)
    assert [(j.judge, j.shown, j.followed) for j in followed] == [("judge:replay", 1, 0)]
