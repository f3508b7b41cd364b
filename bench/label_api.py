"""The Label tab's HTTP API as the benchmarks drive it (`/generate_pair`, `POST /api/vote`).

Generation goes through `gradio_client` (it streams, as the page does). A vote is one plain
HTTP request to `POST /api/vote` (app/label/route.py) on the same signed-in session and a
kept-alive connection. `vote_gradio` sends it through Gradio's queued `/vote` endpoint instead
(`POST /gradio_api/call/vote`, then the result stream), the path every Gradio API call takes,
for comparison; gradio_client's own per-call overhead (a worker thread and result polling,
~0.1-0.2 s here even for an echo endpoint) would swamp the 100 ms being measured, so neither
goes through it.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class VoteError(RuntimeError):
    """The app answered the vote with an error; the message is what the page would show."""


class LabelApi:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.http = httpx.Client(
            base_url=client.src, cookies=client.cookies, headers=client.headers, timeout=60
        )

    def generate(self, prompt: str, annotator: str = "") -> tuple[int, int]:
        """Stream a pair for `prompt`; returns the stored response ids (A, B). `annotator`
        is only used without sign-in (with it, the signed-in user is the annotator)."""
        final = self.client.predict(prompt, annotator, api_name="/generate_pair")
        a, b = final["answers"]
        return a["response_id"], b["response_id"]

    def vote(
        self, pair: tuple[int, int], choice: str, annotator: str = "", rewrite: str = ""
    ) -> dict[str, Any]:
        """Record a vote on (A, B) with `POST /api/vote` (one plain HTTP request); returns the
        app's answer, raises VoteError on an error."""
        body = {"response_a_id": pair[0], "response_b_id": pair[1], "choice": choice}
        body.update(annotator=annotator, rewrite=rewrite)
        try:
            r = self.http.post("api/vote", json=body)
        except httpx.RemoteProtocolError:
            # The server closed the kept-alive connection as we reused it (uvicorn drops idle
            # connections after 5 s, about one generation's wait). A browser resends; a vote
            # is idempotent per annotator and pair, so resending cannot count it twice.
            r = self.http.post("api/vote", json=body)
        if r.status_code in (400, 503):
            raise VoteError(r.json()["detail"])
        r.raise_for_status()
        return r.json()

    def vote_gradio(
        self, pair: tuple[int, int], choice: str, annotator: str = "", rewrite: str = ""
    ) -> dict[str, Any]:
        """`vote` through Gradio's queued `/vote` endpoint (the event stream), for comparison."""
        data = [pair[0], pair[1], choice, annotator, rewrite, None]
        r = self.http.post("gradio_api/call/vote", json={"data": data})
        r.raise_for_status()
        event_id = r.json()["event_id"]
        with self.http.stream("GET", f"gradio_api/call/vote/{event_id}") as stream:
            stream.raise_for_status()
            event = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: ") and event in ("complete", "error"):
                    data = json.loads(line[len("data: ") :])
                    if event == "error":
                        raise VoteError(str(data))
                    return data[0]
        raise VoteError("the vote stream ended without a result")
