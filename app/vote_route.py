"""`POST /api/vote`: record a vote in one plain HTTP request, outside Gradio's event queue.

Gradio runs every API call as a queued event answered over an event stream (two requests, a
queue pass, a poll for the result): about 20 ms for a 9 ms database write on an idle app, and
a tail of several hundred ms once 16 annotators stream generations through the same queue.
A vote is a short transaction that must not wait behind any of that, so this ASGI middleware
answers it directly: it reads a small JSON body, runs `LabelService.vote` in a worker thread
and writes JSON back. It sits inside `AuthGate` (sign-in, roles, cross-site refusal apply as
to every route); with sign-in on, the annotator is the signed-in user, never a field.

Request body: `{"response_a_id": int, "response_b_id": int, "choice": "a"|"b"|"tie"|"both_bad",
"rewrite": str (optional), "seconds_spent": float (optional), "annotator": str (sign-in off
only)}`. Answer: 200 `{"preference_id", "new", "progress"}`; 400 `{"detail": message}` for a
bad request (the message is what the Label tab would show); 503 for a failed write (disk full:
nothing is lost, retry).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from app.auth import USER_STATE_KEY
from app.label import LabelService
from storage.db import StorageError, WriteError

logger = logging.getLogger(__name__)

PATH = "/api/vote"
MAX_BODY = 64 * 1024  # a vote with a rewrite; anything larger is refused unread

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BadVote(ValueError):
    """The request cannot be a vote; the message says why."""


def parse_vote(body: bytes, signed_in: str | None) -> dict[str, Any]:
    """Keyword arguments for `LabelService.vote` from a request body (pure; raises BadVote)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadVote(f"The request body is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise BadVote("The request body must be a JSON object.")
    ids = []
    for key in ("response_a_id", "response_b_id"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadVote(f"{key} must be an integer (the response ids /generate_pair gave).")
        ids.append(value)
    choice = data.get("choice")
    if not isinstance(choice, str):
        raise BadVote("choice must be one of a, b, tie, both_bad.")
    rewrite = data.get("rewrite") or None
    if rewrite is not None and not isinstance(rewrite, str):
        raise BadVote("rewrite must be text.")
    seconds = data.get("seconds_spent")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float)):
        raise BadVote("seconds_spent must be a number of seconds.")
    annotator = signed_in or str(data.get("annotator") or "").strip() or "anonymous"
    return {
        "annotator": annotator,
        "response_a_id": ids[0],
        "response_b_id": ids[1],
        "choice": choice,
        "rewrite": rewrite,
        "seconds_spent": seconds,
    }


class VoteRoute:
    """ASGI middleware serving `POST /api/vote`; every other request passes through."""

    def __init__(self, app: Any, service: LabelService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await _reply(send, 405, {"detail": f"Use POST {PATH}."}, [(b"allow", b"POST")])
            return
        body = await _read_body(receive)
        if body is None:
            await _reply(send, 413, {"detail": f"A vote is at most {MAX_BODY} bytes."})
            return
        signed_in = scope.get("state", {}).get(USER_STATE_KEY)
        try:
            kwargs = parse_vote(body, signed_in)
            result = await anyio.to_thread.run_sync(lambda: self.service.vote(**kwargs))
        except WriteError as err:
            await _reply(send, 503, {"detail": str(err)})
            return
        except (ValueError, StorageError) as err:
            await _reply(send, 400, {"detail": str(err)})
            return
        answer = {
            "preference_id": result.preference_id,
            "new": result.new,
            "progress": result.progress.to_dict(),
        }
        await _reply(send, 200, answer)


async def _read_body(receive: Receive) -> bytes | None:
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            return None
        if not message.get("more_body", False):
            return bytes(body)


async def _reply(send: Send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})
