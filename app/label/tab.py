"""The Label tab: two answers streamed side by side, one key per vote, the next pair at once.

Handlers first (thin: parse, call `LabelService`, return named updates), layout after. Every
generation goes through one event, started by writing a new request into `tab.request`, so
Skip / Regenerate / "Answer my prompt" can cancel the pair being generated.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.auth.users import annotator_name
from app.label.service import CHOICES, MAX_NAME_CHARS, LabelService, LabelSettings, PairProgress
from app.safe_text import safe_markdown
from storage.db import StorageError

logger = logging.getLogger(__name__)

NAME_STORAGE_KEY = "dpo_studio_annotator"
BUTTONS = {  # choice -> (label, key, elem_id)
    "a": ("A is better", "1", "label-vote-a"),
    "b": ("B is better", "2", "label-vote-b"),
    "tie": ("Tie", "3", "label-vote-tie"),
    "both_bad": ("Both bad", "4", "label-vote-both-bad"),
}
KEYS_JS = """
() => {
  if (window.__dpoLabelKeys) return;
  window.__dpoLabelKeys = true;
  const keys = {"1": "label-vote-a", "2": "label-vote-b", "3": "label-vote-tie",
                "4": "label-vote-both-bad", "s": "label-skip", "r": "label-regenerate"};
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const target = event.composedPath()[0] || event.target;
    const tag = (target && target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "textarea" || tag === "select" ||
        (target && target.isContentEditable)) return;  // typing, not voting
    const id = keys[event.key.toLowerCase()];
    const element = id && document.getElementById(id);
    if (!element || element.offsetParent === null) return;  // Label tab not shown
    const button = element.tagName === "BUTTON" ? element : element.querySelector("button");
    if (button && !button.disabled) {
      event.preventDefault();
      button.click();
    }
  });
}
"""


@dataclass
class LabelTab:
    guidelines: gr.Accordion
    annotator: gr.Textbox
    name_store: gr.BrowserState
    progress: gr.Markdown
    prompt: gr.Markdown
    status: gr.Markdown
    answer_a: gr.Markdown
    answer_b: gr.Markdown
    count_a: gr.Markdown
    count_b: gr.Markdown
    votes: dict[str, gr.Button]
    skip: gr.Button
    regenerate: gr.Button
    rewrite: gr.Textbox
    typed: gr.Textbox
    ask: gr.Button
    temperature_a: gr.Slider
    temperature_b: gr.Slider
    top_p: gr.Slider
    max_new_tokens: gr.Slider
    pair: gr.State
    skipped: gr.State
    request: gr.State


def new_request(mode: str, **extra: Any) -> dict[str, Any]:
    """A generation request; the nonce makes every request a change of `tab.request`."""
    return {"mode": mode, "nonce": uuid.uuid4().hex, **extra}


def format_progress(progress: Any) -> str:
    choices = " · ".join(f"{CHOICES[c]} {n}" for c, n in progress.by_choice.items())
    return (
        f"**Labeled by you: {progress.mine}** · by everyone: {progress.everyone} · "
        f"usable for training: {progress.usable_pairs}  \n{choices} · prompts: {progress.prompts}"
    )


def status_text(pair: PairProgress) -> str:
    notice = f"\n\n⚠️ {pair.notice}" if pair.notice else ""
    if pair.waiting is not None:
        ahead = pair.waiting - 1
        if ahead <= 0:
            return f"⏳ Next in line: the model is finishing other work…{notice}"
        return f"⏳ Waiting for the model: {ahead} request(s) ahead of you…{notice}"
    if not pair.done:
        return f"Writing two answers with version **{pair.version}**…{notice}"
    return (
        f"Both answers are ready (version **{pair.version}**). Vote with the buttons or the "
        f"keys 1–4; S skips, R regenerates.{notice}"
    )


def user_errors(start: Any) -> Iterator[Any]:
    """Iterate the generator `start()` returns; a ValueError (bad input, empty queue) or a
    StorageError (the database refused a write) is yielded as the last item, not raised."""
    try:
        yield from start()
    except (ValueError, StorageError) as err:
        yield err


def make_handlers(service: LabelService, tab: LabelTab) -> dict[str, Any]:
    vote_buttons = list(tab.votes.values())

    def buttons(enabled: bool) -> dict[Any, Any]:
        return {b: gr.Button(interactive=enabled) for b in vote_buttons}

    def init(stored: str | None, request: gr.Request) -> dict[Any, Any]:
        signed_in = getattr(request, "username", None)
        name = signed_in or (stored or "").strip() or f"guest-{secrets.token_hex(2)}"
        progress = service.progress(name)
        return {
            tab.annotator: gr.Textbox(value=name, interactive=not signed_in),
            tab.name_store: name,
            tab.progress: format_progress(progress),
            tab.guidelines: gr.Accordion(open=progress.mine == 0),
            tab.request: new_request("queue"),
        }

    def save_name(name: str, request: gr.Request) -> dict[Any, Any]:
        name = annotator_name(request, name)
        return {tab.name_store: name, tab.progress: format_progress(service.progress(name))}

    def generate(
        req: dict[str, Any] | None,
        annotator: str,
        skipped: list[int] | None,
        temperature_a: float,
        temperature_b: float,
        top_p: float,
        max_new_tokens: float,
        request: gr.Request,
    ):
        if not req:
            return
        settings = LabelSettings((temperature_a, temperature_b), top_p, int(max_new_tokens))
        name = annotator_name(request, annotator)
        pairs = user_errors(
            lambda: service.generate_pair(
                name,
                typed=req.get("text"),
                skipped=skipped or [],
                settings=settings,
                prompt_id=req.get("prompt_id"),
            )
        )
        for i, pair in enumerate(pairs):
            if isinstance(pair, ValueError):  # a message for the user, not a crash
                yield {tab.status: f"⚠️ {pair}", tab.pair: None, **buttons(False)}
            else:
                yield render(pair, first=i == 0)

    def render(pair: PairProgress, first: bool) -> dict[Any, Any]:
        out = {tab.status: status_text(pair), tab.pair: pair.to_dict(), **buttons(pair.done)}
        if first:
            out[tab.prompt] = safe_markdown(pair.prompt)
        panes = ((tab.answer_a, tab.count_a), (tab.answer_b, tab.count_b))
        answers = pair.answers or (None, None)
        for answer, (box, count) in zip(answers, panes, strict=True):
            if answer is None:  # waiting for the model
                out[box], out[count] = "…", ""
                continue
            out[box] = safe_markdown(answer.text, empty="*(empty)*" if answer.finished else "…")
            out[count] = f"{answer.num_tokens} tokens" + ("" if answer.finished else " …")
        return out

    def vote(choice: str):
        def handler(
            pair: dict[str, Any] | None, annotator: str, rewrite: str, request: gr.Request
        ) -> dict[Any, Any]:
            if not pair or not pair.get("done"):  # a second click after the vote went through
                return {tab.request: gr.skip()}
            a, b = (answer["response_id"] for answer in pair["answers"])
            name = annotator_name(request, annotator)
            try:
                result = service.vote(
                    name,
                    a,
                    b,
                    choice,
                    rewrite=rewrite,
                    seconds_spent=max(0.0, time.time() - (pair.get("ready_at") or time.time())),
                )
            except (ValueError, StorageError) as err:
                raise gr.Error(str(err)) from err
            done = "Recorded" if result.new else "Already recorded"
            return {
                tab.progress: format_progress(result.progress),
                tab.status: f"✅ {done}: {CHOICES[choice]}. Next pair…",
                tab.pair: None,
                tab.rewrite: "",
                tab.request: new_request("queue"),
                **buttons(False),
            }

        return handler

    def skip(pair: dict[str, Any] | None, skipped: list[int] | None) -> dict[Any, Any]:
        skipped = list(skipped or [])
        if pair:
            skipped.append(pair["prompt_id"])
        return {tab.skipped: skipped, tab.request: new_request("queue"), tab.rewrite: ""}

    def regenerate(pair: dict[str, Any] | None) -> dict[Any, Any]:
        if not pair:
            return {tab.request: new_request("queue")}
        return {tab.request: new_request("regenerate", prompt_id=pair["prompt_id"])}

    def ask(typed: str) -> dict[Any, Any]:
        if not typed or not typed.strip():
            raise gr.Error("The prompt is empty: type a question or an instruction.")
        return {tab.request: new_request("typed", text=typed), tab.rewrite: ""}

    return {
        "init": init,
        "save_name": save_name,
        "generate": generate,
        "vote": vote,
        "skip": skip,
        "regenerate": regenerate,
        "ask": ask,
    }


def layout(service: LabelService) -> LabelTab:
    defaults = service.settings
    with gr.Accordion("Guidelines", open=False) as guidelines:
        gr.Markdown(service.guidelines())
    with gr.Row(equal_height=True):
        annotator = gr.Textbox(
            label="Your name",
            placeholder="Votes are recorded under this name",
            max_length=MAX_NAME_CHARS,
            scale=1,
            elem_id="label-annotator",
        )
        progress = gr.Markdown(elem_id="label-progress")
    prompt = gr.Markdown("…", label="Prompt", container=True, elem_id="label-prompt")
    status = gr.Markdown(elem_id="label-status")
    with gr.Row(equal_height=True):
        with gr.Column():
            gr.Markdown("### A")
            answer_a = gr.Markdown("…", container=True, elem_id="label-answer-a")
            count_a = gr.Markdown(elem_id="label-count-a")
        with gr.Column():
            gr.Markdown("### B")
            answer_b = gr.Markdown("…", container=True, elem_id="label-answer-b")
            count_b = gr.Markdown(elem_id="label-count-b")
    with gr.Row():
        votes = {
            choice: gr.Button(
                f"{label} ({key})",
                variant="primary" if choice in ("a", "b") else "secondary",
                interactive=False,
                elem_id=elem_id,
            )
            for choice, (label, key, elem_id) in BUTTONS.items()
        }
        skip = gr.Button("Skip (S)", elem_id="label-skip")
        regenerate = gr.Button("Regenerate (R)", elem_id="label-regenerate")
    rewrite = gr.Textbox(
        label="Write a better answer (optional: it becomes the chosen answer)",
        lines=3,
        elem_id="label-rewrite",
    )
    with gr.Accordion("Your own prompt", open=False):
        typed = gr.Textbox(label="Prompt", lines=3, elem_id="label-typed")
        ask = gr.Button("Answer my prompt", elem_id="label-ask")
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            t_a = gr.Slider(0, 2, defaults.temperatures[0], step=0.05, label="Temperature 1")
            t_b = gr.Slider(0, 2, defaults.temperatures[1], step=0.05, label="Temperature 2")
            top_p = gr.Slider(0.05, 1, defaults.top_p, step=0.05, label="Top-p")
            max_new = gr.Slider(
                8, 1024, defaults.max_new_tokens, step=8, label="Max new tokens per answer"
            )
        gr.Markdown(
            "The two temperatures go to the two answers; which one is shown as A is random."
        )
    return LabelTab(
        guidelines=guidelines,
        annotator=annotator,
        name_store=gr.BrowserState("", storage_key=NAME_STORAGE_KEY),
        progress=progress,
        prompt=prompt,
        status=status,
        answer_a=answer_a,
        answer_b=answer_b,
        count_a=count_a,
        count_b=count_b,
        votes=votes,
        skip=skip,
        regenerate=regenerate,
        rewrite=rewrite,
        typed=typed,
        ask=ask,
        temperature_a=t_a,
        temperature_b=t_b,
        top_p=top_p,
        max_new_tokens=max_new,
        pair=gr.State(None),
        skipped=gr.State([]),
        request=gr.State(None),
    )


def build_label_tab(service: LabelService, demo: gr.Blocks) -> LabelTab:
    """Declare the tab inside the current `gr.Tab` and wire its events (and the page load)."""
    tab = layout(service)
    h = make_handlers(service, tab)
    everything = [
        tab.guidelines, tab.annotator, tab.name_store, tab.progress, tab.prompt, tab.status,
        tab.answer_a, tab.answer_b, tab.count_a, tab.count_b, *tab.votes.values(), tab.rewrite,
        tab.pair, tab.skipped, tab.request,
    ]  # fmt: skip
    demo.load(h["init"], [tab.name_store], everything, show_progress="hidden")
    demo.load(None, js=KEYS_JS)
    tab.annotator.blur(h["save_name"], [tab.annotator], everything, show_progress="hidden")
    tab.annotator.submit(h["save_name"], [tab.annotator], everything, show_progress="hidden")
    generation = tab.request.change(
        h["generate"],
        [
            tab.request,
            tab.annotator,
            tab.skipped,
            tab.temperature_a,
            tab.temperature_b,
            tab.top_p,
            tab.max_new_tokens,
        ],
        everything,
        show_progress="hidden",
        concurrency_limit=None,  # the model service queues requests and shows the position
        trigger_mode="multiple",  # a request that follows a cancelled one must still start
        api_visibility="private",
    )
    for choice, button in tab.votes.items():
        button.click(
            h["vote"](choice),
            [tab.pair, tab.annotator, tab.rewrite],
            everything,
            concurrency_limit=None,  # a short database transaction, not a model call
            trigger_mode="once",
            show_progress="hidden",
            api_visibility="private",
        )
    for button, handler, inputs in (
        (tab.skip, h["skip"], [tab.pair, tab.skipped]),
        (tab.regenerate, h["regenerate"], [tab.pair]),
        (tab.ask, h["ask"], [tab.typed]),
    ):
        button.click(
            handler,
            inputs,
            everything,
            cancels=[generation],
            show_progress="hidden",
            api_visibility="private",
        )
    return tab


def register_api(service: LabelService) -> None:
    """Named endpoints for scripts and tests (`gradio_client`): generate_pair, vote,
    label_progress. With sign-in on, the signed-in user is the annotator."""

    def generate_pair(
        prompt: str | None = None,
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[dict[str, Any]]:
        """Two answers to `prompt` (None: the next prompt from the queue), streamed; the last
        value holds the stored response ids, in display order (A, B)."""
        try:
            for pair in service.generate_pair(annotator_name(request, annotator), typed=prompt):
                yield pair.to_dict()
        except (ValueError, StorageError) as err:
            raise gr.Error(str(err)) from err

    def vote(
        response_a_id: int,
        response_b_id: int,
        choice: str,
        annotator: str = "",
        rewrite: str = "",
        seconds_spent: float | None = None,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Record a vote (choice: a, b, tie, both_bad); the same vote twice is one vote."""
        try:
            result = service.vote(
                annotator_name(request, annotator),
                response_a_id,
                response_b_id,
                choice,
                rewrite=rewrite or None,
                seconds_spent=seconds_spent,
            )
        except (ValueError, StorageError) as err:
            raise gr.Error(str(err)) from err
        return result.to_dict()

    def label_progress(
        annotator: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Pairs labeled by the annotator and by everyone, usable pairs, per-choice counts."""
        return service.progress(annotator_name(request, annotator)).to_dict()

    gr.api(generate_pair, api_name="generate_pair", concurrency_limit=None)
    # Votes and progress are short database transactions (~9 ms). API clients still reach them
    # through Gradio's queue and event stream (queue=False only changes the browser's path):
    # p99 177 ms at 16 annotators in bench/load.py. Scripts that need a fast vote use the plain
    # `POST /api/vote` route instead (app/label/route.py: p99 28.5 ms in the same benchmark).
    gr.api(vote, api_name="vote", queue=False)
    gr.api(label_progress, api_name="label_progress", queue=False)
