"""`RemoteEngine` against a stand-in OpenAI-compatible server (the standard library's HTTP
server on loopback, in this process) for the faults a real vLLM is hard to put in: a server
that sends nothing for a while, and one started without runtime LoRA loading. The real-vLLM
tests are tests/app/test_vllm_backend.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dpo_core import remote_engine
from dpo_core.engine import Waiting
from dpo_core.generation import AnswerGenerator, AnswerSpec, GenerationUpdate, SamplingParams
from dpo_core.modeling import ModelLoadError
from dpo_core.remote_engine import RemoteEngine


@dataclass
class StandIn:
    """What the stand-in server does: hold each answer until `release` is set."""

    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""


def handler(state: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._json(200, {"data": [{"id": "stand-in", "root": "stand-in", "parent": None}]})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.endswith("/load_lora_adapter"):  # no runtime LoRA loading: no route
                return self._json(404, {"detail": "Not Found"})
            state.release.wait(60)  # a busy server: nothing until released
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunk = {"choices": [{"text": "Hello there.", "finish_reason": "stop"}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())

    return Handler


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    state = StandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


def test_a_server_that_sends_nothing_for_a_while_is_said_to_be_slow_and_still_answers(
    stand_in: StandIn, tiny_lm, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(remote_engine, "SLOW_S", 1.0)  # 15 s in the app
    engine = RemoteEngine(AnswerGenerator(tiny_lm), stand_in.url)
    assert engine.check() == "stand-in"
    spec = AnswerSpec(SamplingParams(max_new_tokens=8), seed=1)
    ticket = engine.submit("Hello?", [spec])
    notices = []
    final = None
    for event in ticket.updates():
        if isinstance(event, Waiting) and event.notice:
            notices.append(event.notice)
            assert not event.server_down  # slow is not down: Compare keeps waiting
            stand_in.release.set()  # the server answers after all
        elif isinstance(event, GenerationUpdate):
            final = event
    assert notices == [
        f"The generation server ({stand_in.url}) has sent nothing for 1 s: it is busy or slow. "
        "Your request is still waiting there."
    ]
    assert final is not None and final.done and final.answers[0].text == "Hello there."
    engine.close()


def test_a_server_without_runtime_lora_loading_is_told_how_to_start_it(
    stand_in: StandIn, tiny_lm, tmp_path
):
    engine = RemoteEngine(AnswerGenerator(tiny_lm), stand_in.url)
    with pytest.raises(ModelLoadError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        engine.add_version("v1", str(tmp_path))
    engine.close()
