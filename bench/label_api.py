"""The Label tab's HTTP API as the benchmarks drive it (`/generate_pair`, `/vote`).

Generation goes through `gradio_client` (it streams, as the page does). The vote is timed as
the two HTTP requests of Gradio's API (`POST /gradio_api/call/vote`, then the result stream),
on the same signed-in session and a kept-alive connection, like a browser tab: gradio_client's
own per-call overhead (a worker thread and result polling, ~0.1-0.2 s here even for an echo
endpoint) would otherwise swamp the 100 ms being measured.
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

    def vote(self, pair: tuple[int, int], choice: str, annotator: str = "") -> dict[str, Any]:
        """Record a vote on (A, B); returns the app's answer, raises VoteError on an error."""
        r = self.http.post(
            "gradio_api/call/vote", json={"data": [pair[0], pair[1], choice, annotator, "", None]}
        )
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
