"""An AI judge that suggests which of two answers is better, with one line of reason.

A suggestion is only a suggestion: a person still decides, and a judge that is slow, down or
talks nonsense yields "no suggestion" with a note, never an invented verdict.

Two kinds of judge:
- `LocalJudge`: a local chat model (the embedded one, a hub id or a directory). It parses no
  free text: it asks of each answer alone "is this a good, relevant answer?" and reads the
  log-odds of "yes" against "no". Scoring each answer alone has no position bias, and on the
  embedded 135M model it ranked 4 of 5 obvious pairs right, where asking "A or B?" was a coin
  flip (it said "B" to all five, at 50-52%). Below `min_confidence` it makes no suggestion.
- `OpenAIJudge`: any OpenAI-compatible chat endpoint (`/v1/chat/completions`: llama.cpp's
  server, vLLM, Ollama, a hosted API). The key comes from an environment variable and is never
  stored. The reply must contain a line `Verdict: A|B|tie` (parsed by `parse_verdict`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dpo_core.modeling import LoadedModel

logger = logging.getLogger(__name__)

JUDGE_CHOICES = ("a", "b", "tie")
MAX_ANSWER_CHARS = 4000  # each answer is cut to this in the judge's prompt
MAX_REASON_CHARS = 200
INSTRUCTIONS = (
    "You are judging two answers to the same request. Decide which answer is more helpful, "
    "correct and clear. Reply with one line `Verdict: A`, `Verdict: B` or `Verdict: tie`, "
    "then one line starting `Reason:` with a short reason."
)


@dataclass(frozen=True)
class Suggestion:
    """A judge's suggestion for one pair; `choice` None means no suggestion (see `reason`)."""

    choice: str | None  # "a", "b", "tie" or None
    reason: str
    judge: str
    confidence: float | None = None  # the local judge's probability of its pick, 0.5-1

    @property
    def ok(self) -> bool:
        return self.choice is not None


class Judge(Protocol):
    name: str

    def suggest(self, prompt: str, answer_a: str, answer_b: str) -> Suggestion: ...


def judge_message(prompt: str, answer_a: str, answer_b: str) -> str:
    """The user turn a judge reads: the request and both answers, each cut to a bound."""
    a, b = (_cut(t) for t in (answer_a, answer_b))
    return f"{INSTRUCTIONS}\n\n## Request\n{prompt}\n\n## Answer A\n{a}\n\n## Answer B\n{b}"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ANSWER_CHARS else text[:MAX_ANSWER_CHARS] + " [...]"


VERDICT_RE = re.compile(r"verdict\s*[:=]?\s*\**\s*(?:answer\s*)?(a|b|tie)\b", re.IGNORECASE)
REASON_RE = re.compile(r"reason\s*[:=]\s*(.+)", re.IGNORECASE)


def parse_verdict(text: str) -> tuple[str | None, str]:
    """(choice, reason) from a judge's reply; choice None when no verdict line is found."""
    verdict = VERDICT_RE.search(text or "")
    reason = REASON_RE.search(text or "")
    line = reason.group(1).strip() if reason else ""
    return (verdict.group(1).lower() if verdict else None), line[:MAX_REASON_CHARS]


class LocalJudge:
    """A local chat model as judge, scoring each answer on its own (see the module docstring).
    Not thread-safe: the caller runs it where the model is free (between generation steps)."""

    def __init__(self, lm: LoadedModel, name: str = "local", min_confidence: float = 0.55) -> None:
        self.lm, self.name, self.min_confidence = lm, name, min_confidence
        encode = lm.tokenizer.encode
        self.yes = sorted({encode(w, add_special_tokens=False)[0] for w in ("yes", "Yes")})
        self.no = sorted({encode(w, add_special_tokens=False)[0] for w in ("no", "No")})

    @torch.no_grad()
    def score(self, prompt: str, answer: str) -> float:
        """log P(yes) - log P(no) for "is this a good, relevant answer to the request?"."""
        messages = [{"role": "user", "content": pointwise_message(prompt, answer)}]
        text = self.lm.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        logits = self.lm.model(input_ids=torch.tensor([ids], device=self.lm.device)).logits
        logps = torch.log_softmax(logits[0, -1].float(), dim=-1)  # (V,)
        return float(torch.logsumexp(logps[self.yes], 0) - torch.logsumexp(logps[self.no], 0))

    def suggest(self, prompt: str, answer_a: str, answer_b: str) -> Suggestion:
        try:
            a, b = self.score(prompt, answer_a), self.score(prompt, answer_b)
        except Exception as err:  # out of memory, a broken model: no suggestion, say why
            logger.warning("local judge failed: %s", err)
            return Suggestion(None, f"the judge failed: {err}", self.name)
        p_a = 1.0 / (1.0 + math.exp(b - a))  # Bradley-Terry on the two scores
        confidence = max(p_a, 1 - p_a)
        if confidence < self.min_confidence:
            reason = f"the judge cannot tell them apart ({confidence:.0%} sure)"
            return Suggestion(None, reason, self.name, confidence)
        choice = "a" if p_a > 0.5 else "b"
        reason = (
            f"answer {choice.upper()} reads as the more relevant answer to the judge "
            f"({confidence:.0%} sure)"
        )
        return Suggestion(choice, reason, self.name, confidence)


def pointwise_message(prompt: str, answer: str) -> str:
    return (
        f"Request: {prompt}\nAnswer: {_cut(answer)}\n\n"
        "Is this a good, relevant answer to the request? Reply yes or no."
    )


@dataclass
class OpenAIJudge:
    """An OpenAI-compatible chat endpoint as judge. `api_key` is read from the environment by
    the caller and kept in memory only."""

    url: str  # the API base, e.g. http://127.0.0.1:8080/v1
    model: str
    api_key: str | None = None
    timeout_s: float = 20.0
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.model

    def suggest(self, prompt: str, answer_a: str, answer_b: str) -> Suggestion:
        try:
            reply = self._complete(judge_message(prompt, answer_a, answer_b))
        except JudgeUnavailable as err:
            logger.warning("judge %s: %s", self.name, err)
            return Suggestion(None, str(err), self.name)
        choice, reason = parse_verdict(reply)
        if choice is None:
            shown = " ".join(reply.split())[:80]
            return Suggestion(None, f"the judge's reply had no verdict: {shown!r}", self.name)
        return Suggestion(choice, reason or "(no reason given)", self.name)

    def _complete(self, message: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": message}],
            "temperature": 0,
            "max_tokens": 120,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers
        )
        return _reply_text(_post(request, self.timeout_s), self.url)


class JudgeUnavailable(Exception):
    """The judge could not be asked or did not answer in time (a message for the page)."""


def _post(request: urllib.request.Request, timeout_s: float) -> Any:
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))
    except TimeoutError as err:
        raise JudgeUnavailable(f"the judge did not answer within {timeout_s:g} s") from err
    except urllib.error.HTTPError as err:
        raise JudgeUnavailable(f"the judge answered HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise JudgeUnavailable(f"the judge did not answer within {timeout_s:g} s") from err
        raise JudgeUnavailable(f"the judge is unreachable: {err.reason}") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise JudgeUnavailable("the judge's reply is not JSON") from err


def _reply_text(payload: Any, url: str) -> str:
    try:
        return str(payload["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError) as err:
        raise JudgeUnavailable(f"{url} did not answer like an OpenAI chat endpoint") from err
