"""`app.label.route.parse_vote`: what a `POST /api/vote` body must hold, and who votes."""

from __future__ import annotations

import json

import pytest

from app.label.route import BadVote, parse_vote


def _body(**fields) -> bytes:
    return json.dumps({"response_a_id": 3, "response_b_id": 4, "choice": "a", **fields}).encode()


def test_a_vote_body_becomes_the_service_call():
    assert parse_vote(_body(rewrite="Better.", seconds_spent=2.5, annotator=" zoe "), None) == {
        "annotator": "zoe",
        "response_a_id": 3,
        "response_b_id": 4,
        "choice": "a",
        "rewrite": "Better.",
        "seconds_spent": 2.5,
    }


def test_the_signed_in_user_is_the_annotator_whatever_the_body_claims():
    assert parse_vote(_body(annotator="mallory"), "ann")["annotator"] == "ann"
    assert parse_vote(_body(), None)["annotator"] == "anonymous"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (_body(response_a_id="3"), "response_a_id must be an integer"),
        (_body(response_b_id=True), "response_b_id must be an integer"),
        (_body(response_b_id=None), "response_b_id must be an integer"),
        (_body(choice=1), "choice must be one of"),
        (_body(rewrite=["x"]), "rewrite must be text"),
        (_body(seconds_spent="soon"), "seconds_spent must be a number"),
    ],
)
def test_a_bad_body_is_refused_with_a_reason(body, message):
    with pytest.raises(BadVote, match=message):
        parse_vote(body, None)
