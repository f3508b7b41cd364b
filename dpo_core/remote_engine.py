"""Generation on an OpenAI-compatible server (vLLM first), behind `GenerationEngine`'s interface.

    engine = RemoteEngine(generator, "http://127.0.0.1:8000/v1")
    engine.add_version("v1", "/data/adapters/v1")      # POST /v1/load_lora_adapter
    ticket = engine.submit("Name three planets.", specs)
    for event in ticket.updates(): ...                  # Waiting ..., GenerationUpdate ... (done)

The prompt is templated and cut here, with the app's own tokenizer (`prepare_prompt`, as the
in-process engine does), and sent as token ids to `/v1/completions`: the server reads exactly
what the local model would. Each answer is one streamed request with its own sampling
parameters and seed; its `model` is the version's name, or the server's base model. A version
is loaded into the server when it is made or activated and again whenever the server answers
that it does not know it (a restarted server forgets its adapters): the adapter directory must
be readable by the server at the same path.

The server down or cut mid-answer: the request waits (its ticket says why in words, as
`Waiting.notice`), retries with growing pauses and starts again from the first token when the
server is back; it fails only for what a retry cannot fix (the server refusing the request or
an adapter). At most `EngineLimits.max_requests` requests run at once (default
`DEFAULT_MAX_REQUESTS`); the rest wait first in, first out, prefetches behind the others.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dpo_core.engine import NORMAL, EngineLimits, RequestLine, Ticket, Waiting, prepare_request
from dpo_core.fast_llama import BASE
from dpo_core.generation import (
    AnswerGenerator,
    AnswerProgress,
    AnswerSpec,
    GenerationUpdate,
    PreparedPrompt,
)
from dpo_core.modeling import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUESTS = 64  # the server batches them itself (continuous batching)
RETRY_S = (0.5, 1.0, 2.0, 5.0)  # pauses between tries while the server is down (then 5 s)
SLOW_S = 15.0  # no token for this long: the ticket says the server is slow
CONNECT_S = 5.0
READ_S = 600.0  # one token may take this long (a server under load); then it counts as down


class ServerDown(Exception):
    """The server cannot be reached or cut the answer; the message says so in words."""


class _UnknownModel(Exception):
    """The server does not know this version (it restarted): load it again, then retry."""


def api_url(url: str) -> str:
    """`http://host:port`, `.../v1` or `.../v1/` -> `.../v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


@dataclass
class _RowState:
    spec: AnswerSpec
    model: str = BASE  # the version that answers (BASE: the server's base model)
    text: str = ""
    tokens: int = 0
    finish: str | None = None
    latency_s: float | None = None

    def progress(self) -> AnswerProgress:
        return AnswerProgress(self.text, self.tokens, self.finish, self.latency_s)


@dataclass
class _Request:
    ticket: Ticket
    prompt: PreparedPrompt
    rows: list[_RowState]
    priority: int
    order: int
    t0: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class RemoteEngine(RequestLine):
    """`GenerationEngine`'s interface (submit, promote, generate, waiting, close) on a server."""

    def __init__(
        self,
        generator: AnswerGenerator,
        url: str,
        limits: EngineLimits | None = None,
        *,
        client: httpx.Client | None = None,
    ) -> None:
        self.generator = generator
        self.url = api_url(url)
        self.limits = limits or EngineLimits()
        self.client = client or httpx.Client(timeout=httpx.Timeout(READ_S, connect=CONNECT_S))
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._running: list[_Request] = []
        self._order = itertools.count()
        self._paths: dict[str, str] = {}  # version -> adapter directory (absolute)
        self._on_server: set[str] = set()  # versions the server has loaded, as far as we know
        self._base: str | None = None
        self._closed = False

    # --- versions ----------------------------------------------------------------------------

    def check(self) -> str:
        """The server's base model name (`GET /v1/models`); ServerDown when it does not answer."""
        models = self._get_models()
        bases = [m["id"] for m in models if not m.get("parent")]
        if not bases:
            raise ServerDown(f"the generation server at {self.url} lists no base model")
        self._base = bases[0]
        self._on_server = set()  # a version of the same name there may be another one's
        return self._base

    def served_models(self) -> list[str]:
        """Every model name the server lists (its base first, then loaded adapters)."""
        return [m["id"] for m in self._get_models()]

    def add_version(self, name: str, adapter_path: str | None) -> None:
        """Load version `name` into the server now. ModelLoadError when the server refuses it
        (most often: it cannot read the directory); the server down: it loads before its first
        request instead."""
        if name == BASE or adapter_path is None:
            return
        self._paths[name] = str(Path(adapter_path).resolve())
        try:
            self._load(name)
        except ServerDown as err:
            logger.warning("version %s loads when the generation server is back: %s", name, err)

    def _load(self, name: str) -> None:
        if name in self._on_server:
            return
        path = self._paths.get(name)
        if path is None:
            raise ModelLoadError(f"version {name} has no adapter directory to load")
        body = {"lora_name": name, "lora_path": path}
        response = self._post("load_lora_adapter", body)
        if response.status_code != 200 and "already been loaded" in response.text:
            held = {m["id"]: m.get("root") for m in self._get_models()}.get(name)
            if held != path:  # another data directory's version of that name: replace it
                logger.warning("the generation server holds %s from %s: replacing it", name, held)
                self._post("unload_lora_adapter", {"lora_name": name})
                response = self._post("load_lora_adapter", body)
        if response.status_code != 200 and "already been loaded" not in response.text:
            raise ModelLoadError(refusal_message(name, path, response.status_code, response.text))
        self._on_server.add(name)
        logger.info("generation server loaded version %s from %s", name, path)

    def _post(self, endpoint: str, body: dict[str, str]) -> httpx.Response:
        try:
            return self.client.post(f"{self.url}/{endpoint}", json=body)
        except httpx.HTTPError as err:
            raise ServerDown(down_notice(self.url, err)) from err

    def _get_models(self) -> list[dict[str, str]]:
        try:
            response = self.client.get(f"{self.url}/models", timeout=CONNECT_S * 2)
            response.raise_for_status()
        except httpx.HTTPError as err:
            raise ServerDown(down_notice(self.url, err)) from err
        return list(response.json().get("data", []))

    # --- the callers' side ---------------------------------------------------------------------

    def submit(self, prompt: str, specs: Sequence[AnswerSpec], *, priority: int = NORMAL) -> Ticket:
        """Queue a request; its ticket streams Waiting, then GenerationUpdates. Raises
        ValueError at once as `GenerationEngine.submit` does."""
        models, prepared = prepare_request(self.generator, self.limits, prompt, specs)
        rows = [_RowState(s, m) for s, m in zip(specs, models, strict=True)]
        request = _Request(Ticket(), prepared, rows, priority, next(self._order))
        with self._cond:
            if self._closed:
                raise ValueError("the generation engine is closed")
            self._pending.append(request)
            self._pending.sort(key=lambda r: (r.priority, r.order))
        self._dispatch()
        return request.ticket

    def close(self) -> None:
        """Stop starting requests; the running ones end at their next token."""
        with self._cond:
            self._closed = True
            for request in self._pending + self._running:
                request.ticket.cancel()
            self._pending.clear()

    # --- running requests --------------------------------------------------------------------

    def _publish_positions(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        """Start waiting requests while fewer than the limit run; publish the others' places."""
        limit = self.limits.max_requests or DEFAULT_MAX_REQUESTS
        with self._cond:
            self._pending = [r for r in self._pending if not r.ticket.cancelled.is_set()]
            while self._pending and len(self._running) < limit and not self._closed:
                request = self._pending.pop(0)
                self._running.append(request)
                name = f"remote-request-{request.order}"
                threading.Thread(target=self._run, args=(request,), name=name, daemon=True).start()
            waiting = list(self._pending)
        for position, request in enumerate(waiting, start=1):
            request.ticket.publish(Waiting(position))

    def _run(self, request: _Request) -> None:
        """One request to its end: retried while the server is down, failed for the rest."""
        try:
            for pause in _pauses():
                if request.ticket.cancelled.is_set():
                    return
                try:
                    self._attempt(request)
                    return
                except ServerDown as err:
                    logger.warning("request waits: %s", err)
                    request.ticket.publish(Waiting(1, notice=str(err), server_down=True))
                    request.ticket.cancelled.wait(pause)
                except _UnknownModel as err:
                    logger.info("the generation server forgot %s (restarted?): loading it", err)
                    self._on_server.discard(str(err))
                    request.ticket.cancelled.wait(pause)
        except (ValueError, ModelLoadError) as err:
            request.ticket.fail(ValueError(str(err)))
        except Exception as err:  # a reply this client cannot read: that request only
            logger.exception("generation request failed")
            request.ticket.fail(ValueError(f"the generation server's reply was unusable: {err}"))
        finally:
            with self._cond:
                self._running.remove(request)
            self._dispatch()

    def _attempt(self, request: _Request) -> None:
        """Every answer of `request` from its first token, one stream per answer at once."""
        if self._base is None:
            self.check()
        for name in {row.model for row in request.rows} - {BASE}:
            self._load(name)
        request.rows = [_RowState(row.spec, row.model) for row in request.rows]
        request.t0, request.first_token_s = time.perf_counter(), None
        errors: list[Exception] = []
        threads = [
            threading.Thread(
                target=_collect, args=(self._stream_row, request, i, errors), daemon=True
            )
            for i in range(len(request.rows))
        ]
        for thread in threads:
            thread.start()
        self._watch(request, threads)
        if errors:
            raise errors[0]

    def _watch(self, request: _Request, threads: list[threading.Thread]) -> None:
        """Wait for the answers' streams; say so on the ticket when the first token is late."""
        told = False
        for thread in threads:
            while thread.is_alive():
                thread.join(0.25)
                slow = time.perf_counter() - request.t0 > SLOW_S
                if slow and request.first_token_s is None and not told:
                    told = True
                    request.ticket.publish(Waiting(1, notice=slow_notice(self.url)))

    def _stream_row(self, request: _Request, index: int) -> None:
        row = request.rows[index]
        body = completion_body(row, request.prompt, self._base or BASE)
        try:
            with self.client.stream("POST", f"{self.url}/completions", json=body) as response:
                if response.status_code != 200:
                    self._refused(row.model, response)
                for chunk in sse_chunks(response.iter_lines()):
                    if request.ticket.cancelled.is_set():
                        return
                    self._on_chunk(request, index, chunk)
        except httpx.HTTPError as err:
            raise ServerDown(down_notice(self.url, err)) from err
        if row.finish is None:  # the stream ended without its last chunk: cut off
            raise ServerDown(down_notice(self.url, "the answer stopped half-way"))

    def _refused(self, model: str, response: httpx.Response) -> None:
        text = response.read().decode(errors="replace")
        if response.status_code == 404 and model != BASE:
            raise _UnknownModel(model)
        if response.status_code >= 500:
            raise ServerDown(down_notice(self.url, f"HTTP {response.status_code}"))
        raise ValueError(f"the generation server refused the request: {_detail(text)}")

    def _on_chunk(self, request: _Request, index: int, chunk: dict[str, object]) -> None:
        choices = chunk.get("choices") or [{}]
        choice = choices[0] if isinstance(choices, list) else {}
        usage = chunk.get("usage")
        now = time.perf_counter() - request.t0
        with request.lock:
            row = request.rows[index]
            row.text += str(choice.get("text") or "").replace("\x00", "\ufffd")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                row.tokens = int(usage["completion_tokens"])
            elif choice.get("text"):
                row.tokens += 1
            if choice.get("finish_reason") and row.finish is None:
                row.finish = "length" if choice["finish_reason"] == "length" else "stop"
                row.text, row.latency_s = row.text.strip(), now
            if request.first_token_s is None:
                request.first_token_s = now
            update = _update(request, now)
        request.ticket.publish(update, final=update.done)


def _update(request: _Request, now: float) -> GenerationUpdate:
    return GenerationUpdate(
        answers=tuple(r.progress() for r in request.rows),
        elapsed_s=now,
        first_token_s=request.first_token_s or now,
        prompt_tokens=request.prompt.n_tokens,
        truncated=request.prompt.truncated,
        notice=request.prompt.notice,
        engine="remote",
    )


def _collect(
    target: Callable[[_Request, int], None], request: _Request, index: int, errors: list[Exception]
) -> None:
    try:
        target(request, index)
    except Exception as err:
        errors.append(err)


def _pauses() -> Iterator[float]:
    yield from RETRY_S
    while True:
        yield RETRY_S[-1]


def completion_body(row: _RowState, prompt: PreparedPrompt, base: str) -> dict[str, object]:
    """`/v1/completions` for one answer: the templated prompt's token ids, its own sampling."""
    params = row.spec.params
    return {
        "model": base if row.model == BASE else row.model,
        "prompt": [int(t) for t in prompt.input_ids.tolist()],
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": row.spec.seed,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }


def sse_chunks(lines: Iterator[str]) -> Iterator[dict[str, object]]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if isinstance(chunk, dict) and "error" in chunk:
            raise ValueError(f"the generation server failed the answer: {chunk['error']}")
        yield chunk


def down_notice(url: str, err: object) -> str:
    reason = type(err).__name__ if isinstance(err, Exception) and not str(err) else err
    return (
        f"The generation server ({url}) is not answering ({reason}). Your request waits and "
        "starts again as soon as the server is back; nothing you labeled is lost."
    )


def slow_notice(url: str) -> str:
    return (
        f"The generation server ({url}) has sent nothing for {SLOW_S:.0f} s: it is busy or "
        "slow. Your request is still waiting there."
    )


def refusal_message(name: str, path: str, status: int, text: str) -> str:
    if status in (404, 405) and _detail(text) in ("Not Found", "Method Not Allowed"):  # no route
        return (
            "the generation server cannot load adapters at run time (HTTP 404 on "
            "load_lora_adapter): start vLLM with --enable-lora and the environment variable "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
        )
    return (
        f"the generation server refused version {name} from {path} ({_detail(text)}). The "
        "server must read the adapter directory at this same path (run it on this machine, or "
        "mount the data directory's adapters/ there at the same place: docs/vllm.md), and "
        "its --max-lora-rank must be at least the adapter's rank."
    )


def _detail(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    error = body.get("error", body) if isinstance(body, dict) else body
    message = (error.get("message") or error.get("detail")) if isinstance(error, dict) else None
    return str(message or error)[:300]
