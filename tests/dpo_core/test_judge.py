"""The AI judge: verdict parsing, a local model as judge, and an OpenAI-compatible endpoint.

The endpoint tests talk HTTP to a real server on 127.0.0.1 that replays recorded replies in the
shape llama.cpp's and vLLM's servers send (no model behind it: the point is our request and our
handling of each kind of reply, timeouts and errors included)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from dpo_core.judge import LocalJudge, OpenAIJudge, judge_message, parse_verdict

RECORDED = {  # what an OpenAI-compatible server answered, by the model name we asked for
    "good": {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Verdict: B\nReason: B names three planets; A names one.",
                },
                "finish_reason": "stop",
            }
        ],
    },
    "nonsense": {"choices": [{"message": {"role": "assistant", "content": "I like turtles."}}]},
    "not-openai": {"result": "B"},
}


class Replay(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Replay.seen.append({"path": self.path, "body": body, "auth": self.headers["Authorization"]})
        model = body["model"]
        if model == "slow":
            time.sleep(1.5)
        if model == "broken":
            self.send_error(500, "model crashed")
            return
        payload = json.dumps(RECORDED.get(model, RECORDED["good"])).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def replay_server() -> Iterator[str]:
    """A real loopback server replaying RECORDED; yields its API base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Replay)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Replay.seen.clear()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[str]:
    with replay_server() as url:
        yield url


@pytest.mark.parametrize(
    ("reply", "choice", "reason"),
    [
        ("Verdict: A\nReason: shorter and correct.", "a", "shorter and correct."),
        ("**Verdict:** Answer B\nReason: cites a source", "b", "cites a source"),
        ("verdict = tie", "tie", ""),
        ("Both are fine, really.", None, ""),
    ],
)
def test_parse_verdict(reply: str, choice: str | None, reason: str):
    assert parse_verdict(reply) == (choice, reason)


def test_the_endpoint_is_asked_once_with_the_pair_and_the_key(server: str):
    judge = OpenAIJudge(server, "good", api_key="sk-test")
    s = judge.suggest("Name three planets.", "Mars.", "Mars, Venus, Earth.")
    assert (s.choice, s.reason, s.judge) == ("b", "B names three planets; A names one.", "good")
    [request] = Replay.seen
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["temperature"] == 0
    content = request["body"]["messages"][0]["content"]
    assert "## Answer A\nMars." in content and "## Answer B\nMars, Venus, Earth." in content


@pytest.mark.parametrize(
    ("model", "timeout", "message"),
    [
        ("nonsense", 5.0, "the judge's reply had no verdict: 'I like turtles.'"),
        ("slow", 0.3, "the judge did not answer within 0.3 s"),
        ("broken", 5.0, "the judge answered HTTP 500"),
        ("not-openai", 5.0, "did not answer like an OpenAI chat endpoint"),
    ],
)
def test_a_bad_judge_gives_no_suggestion_and_says_why(
    server: str, model: str, timeout: float, message: str
):
    s = OpenAIJudge(server, model, timeout_s=timeout).suggest("p", "a", "b")
    assert s.choice is None and message in s.reason


def test_an_unreachable_judge_gives_no_suggestion():
    s = OpenAIJudge("http://127.0.0.1:9/v1", "x", timeout_s=2).suggest("p", "a", "b")
    assert s.choice is None and s.reason.startswith("the judge is unreachable")


def test_long_answers_are_cut_in_the_judge_prompt():
    message = judge_message("p", "x" * 10_000, "y")
    assert len(message) < 5_000 and "[...]" in message


def test_local_judge_scores_each_answer_alone(tiny_lm):
    """A random model has no taste, but its verdict follows its two scores, with a confidence
    and a reason; swapping A and B swaps the verdict (no position bias by construction)."""
    judge = LocalJudge(tiny_lm, min_confidence=0.5)
    one = judge.suggest("Name a planet.", "Mars.", "A banana.")
    two = judge.suggest("Name a planet.", "A banana.", "Mars.")
    a, b = judge.score("Name a planet.", "Mars."), judge.score("Name a planet.", "A banana.")
    assert one.choice == ("a" if a > b else "b") and {one.choice, two.choice} == {"a", "b"}
    assert one.confidence == pytest.approx(two.confidence, abs=1e-6) and one.reason


def test_an_unsure_local_judge_makes_no_suggestion(tiny_lm):
    s = LocalJudge(tiny_lm, min_confidence=1.0).suggest("Name a planet.", "Mars.", "Venus.")
    assert s.choice is None and "cannot tell them apart" in s.reason


@pytest.mark.embedded
def test_embedded_judge_prefers_the_answer_that_answers(embedded_lm):
    s = LocalJudge(embedded_lm, name="embedded").suggest(
        "How many legs does a spider have?",
        "Spiders are scary and I hate them lol.",
        "A spider has eight legs.",
    )
    assert s.choice == "b", s
    assert s.reason and "\n" not in s.reason
