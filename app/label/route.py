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
from typing import Any

import anyio

from app.asgi import Receive, Scope, Send, read_body, send_json
from app.auth.users import USER_STATE_KEY, annotator_for
from app.label.service import LabelService
from storage.db import StorageError, WriteError

PATH = "/api/vote"
MAX_BODY = 64 * 1024  # a vote with a rewrite; anything larger is refused unread


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
    return {
        "annotator": annotator_for(signed_in, str(data.get("annotator") or "")),
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
            await send_json(send, 405, {"detail": f"Use POST {PATH}."}, [(b"allow", b"POST")])
            return
        body = await read_body(receive, MAX_BODY)
        if body is None:
            await send_json(send, 413, {"detail": f"A vote is at most {MAX_BODY} bytes."})
            return
        signed_in = scope.get("state", {}).get(USER_STATE_KEY)
        try:
            kwargs = parse_vote(body, signed_in)
            result = await anyio.to_thread.run_sync(lambda: self.service.vote(**kwargs))
        except WriteError as err:
            await send_json(send, 503, {"detail": str(err)})
            return
        except (ValueError, StorageError) as err:
            await send_json(send, 400, {"detail": str(err)})
            return
        await send_json(send, 200, result.to_dict())
