"""Bad prompts typed in the Label tab, through the app's HTTP API (`/generate_pair`) on the tiny
model: refused with a message a person can act on, or answered and stored exactly as typed,
and shown with any HTML as text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app.safe_text import safe_markdown
from storage.db import open_db
from storage.models import Prompt
from tests.app.server import start_app

pytestmark = pytest.mark.slow

HTML = '<script>alert("x")</script><img src=x onerror=alert(1)> & <b>bold</b>'


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    server = start_app(
        str(tiny_model_dir), tmp_path_factory.mktemp("prompts"), "--dtype", "fp32",
        "--device", "cpu",
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.url, verbose=False)


def _generate(client: Client, prompt: str) -> dict:
    return client.predict(prompt, "robustness", api_name="/generate_pair")


def _stored(app, text: str) -> bool:
    sm = open_db(app.db_url)
    try:
        with sm.begin() as s:
            return s.query(Prompt).filter(Prompt.text == text).count() == 1
    finally:
        sm.kw["bind"].dispose()


@pytest.mark.parametrize("prompt", ["", "   \t\n  "], ids=["empty", "whitespace"])
def test_empty_prompt_is_refused(client, prompt):
    with pytest.raises(AppError, match="The prompt is empty: type a question or an instruction"):
        _generate(client, prompt)


def test_nul_in_a_prompt_is_refused(client):
    with pytest.raises(AppError, match=r"NUL character \(U\+0000\)"):
        _generate(client, "a\x00b")


@pytest.mark.parametrize(
    "prompt",
    ["word " * 20_000, "bell\x07 escape\x1b[31m red\x1b[0m\r\nnext", HTML],
    ids=["100k chars", "control characters", "HTML and script"],
)
def test_unusual_prompt_is_answered_and_stored_verbatim(app, client, prompt):
    pair = _generate(client, prompt)
    assert pair["done"] and len(pair["answers"]) == 2
    assert all(a["response_id"] for a in pair["answers"])
    assert _stored(app, prompt.strip())
    if len(prompt) > 50_000:  # the person is told that the model read only the start
        # (the model's context, or on a CPU host the server's default prompt limit)
        assert re.search(r"is longer than (the model can read|this server's limit)", pair["notice"])
        assert "only its first" in pair["notice"]


def test_html_in_prompts_and_answers_is_shown_as_text():
    shown = safe_markdown(HTML)
    assert "<script>" not in shown and "<img" not in shown
    assert "&lt;script&gt;" in shown and "&amp;" in shown
