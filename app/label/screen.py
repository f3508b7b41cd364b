"""The Label tab's one screen, declared (no events): the prompt, one status line, one pane per
answer (1 to 4), the mode's buttons, Skip and Regenerate, and one keyboard script for every
mode. Which answers and buttons show is the mode's (`app.label.modes`); the handlers are in
`app.label.handlers`, the wiring in `app.label.tab`.

The element ids are what scripts and the browser tests find: `label-answer-a`/`-b` for a pair,
`label-answer-single` for one answer, `rank-answer-a` to `-d` for a ranking, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.label.modes import DEFAULT_MODE, MODES, PAIR, RANK, SINGLE, VERDICT_KEYS, VOTE_KEYS
from app.label.ranking import LETTERS
from app.label.service import CHOICES, MAX_NAME_CHARS, LabelService, LabelSettings
from app.label.single import VERDICT_LABELS

NAME_STORAGE_KEY = "dpo_studio_annotator"
VOTE_IDS = {"a": "label-vote-a", "b": "label-vote-b", "tie": "label-vote-tie"}
VOTE_IDS["both_bad"] = "label-vote-both-bad"
# Key -> the buttons it presses, the first one shown; `d` is 👎 with one answer, D in a ranking.
KEYS_JS = """
() => {
  if (window.__dpoLabelKeys) return;
  window.__dpoLabelKeys = true;
  const keys = {"1": ["label-vote-a"], "2": ["label-vote-b"], "3": ["label-vote-tie"],
                "4": ["label-vote-both-bad"], "s": ["label-skip"], "r": ["label-regenerate"],
                "u": ["label-verdict-up"], "d": ["label-verdict-down", "rank-pick-d"],
                "a": ["rank-pick-a"], "b": ["rank-pick-b"], "c": ["rank-pick-c"],
                "backspace": ["rank-undo"]};
  const shown = (id) => {
    const element = document.getElementById(id);
    return element && element.offsetParent !== null ? element : null;  // Label tab, this mode
  };
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const target = event.composedPath()[0] || event.target;
    const tag = (target && target.tagName || "").toLowerCase();
    // The mode radio just clicked keeps the focus: a key pressed there is not typing.
    const choice = tag === "input" && ["radio", "checkbox"].includes(target.type);
    if ((tag === "input" && !choice) || tag === "textarea" || tag === "select" ||
        (target && target.isContentEditable)) return;  // typing
    const element = (keys[event.key.toLowerCase()] || []).map(shown).find((e) => e);
    if (!element) return;
    const button = element.tagName === "BUTTON" ? element : element.querySelector("button");
    if (button && !button.disabled) {
      event.preventDefault();
      button.click();
    }
  });
}
"""


@dataclass
class AnswerPanes:
    """A pane per answer: its heading (letter), the answer, its token count."""

    panes: list[gr.Column]
    headings: list[gr.Markdown]
    answers: list[gr.Markdown]
    counts: list[gr.Markdown]
    titles: list[str]  # each heading before anything is placed

    def components(self) -> list[Any]:
        return [*self.panes, *self.headings, *self.answers, *self.counts]


@dataclass
class ModeView:
    """What one kind of mode shows (SINGLE, PAIR, RANK): its answers and its buttons."""

    column: gr.Column
    panes: AnswerPanes
    buttons: dict[str, gr.Button]  # by key: a choice, a verdict, a letter


@dataclass
class LabelTab:
    guidelines: gr.Accordion
    annotator: gr.Textbox
    name_store: gr.BrowserState
    progress: gr.Markdown
    answers: gr.Radio  # how many answers to judge: 1 (thumbs up/down), 2 (the pair), 3-4 (rank)
    prompt: gr.Markdown
    status: gr.Markdown
    views: dict[str, ModeView]  # by kind of mode (modes.buttons); only the mode's own shows
    order: gr.Markdown  # a ranking's order so far
    undo: gr.Button  # a ranking's last letter
    skip: gr.Button
    regenerate: gr.Button
    rewrite: gr.Textbox  # a pair's better answer
    typed: gr.Textbox
    ask: gr.Button
    temperature_a: gr.Slider
    temperature_b: gr.Slider
    top_p: gr.Slider
    max_new_tokens: gr.Slider
    shown: gr.State  # the answers on screen (PairProgress.to_dict()), None between sets
    picked: gr.State  # a ranking's display indexes placed so far, best first
    skipped: gr.State
    request: gr.State  # a new value starts new answers

    @property
    def votes(self) -> dict[str, gr.Button]:
        return self.views[PAIR].buttons

    @property
    def verdicts(self) -> dict[str, gr.Button]:
        return self.views[SINGLE].buttons

    @property
    def picks(self) -> list[gr.Button]:
        return list(self.views[RANK].buttons.values())

    def outputs(self) -> list[Any]:
        """Every component a handler may update (Gradio needs them declared per event)."""
        parts = [c for view in self.views.values() for c in (view.column, *view.panes.components())]
        buttons = [b for view in self.views.values() for b in view.buttons.values()]
        return [
            *(self.guidelines, self.annotator, self.name_store, self.progress, self.prompt),
            *(self.status, *parts, *buttons, self.order, self.undo, self.rewrite),
            *(self.shown, self.picked, self.skipped, self.request),
        ]


def layout(service: LabelService) -> LabelTab:
    """Declare the tab's components (inside the open `gr.Tab`); no events."""
    guidelines, annotator, progress = _header(service)
    answers = gr.Radio(
        [(mode.label, mode.value) for mode in MODES],
        value=DEFAULT_MODE.value,
        label="Answers to judge",
        elem_id="label-answers",
    )
    prompt = gr.Markdown("…", label="Prompt", container=True, elem_id="label-prompt")
    status = gr.Markdown(elem_id="label-status")
    views = {PAIR: _pair_view(), SINGLE: _single_view()}
    views[RANK], order, undo = _rank_view()
    with gr.Row():
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
    return LabelTab(
        guidelines=guidelines,
        annotator=annotator,
        name_store=gr.BrowserState("", storage_key=NAME_STORAGE_KEY),
        progress=progress,
        answers=answers,
        prompt=prompt,
        status=status,
        views=views,
        order=order,
        undo=undo,
        skip=skip,
        regenerate=regenerate,
        rewrite=rewrite,
        typed=typed,
        ask=ask,
        **_sampling_sliders(service.settings),
        shown=gr.State(None),
        picked=gr.State([]),
        skipped=gr.State([]),
        request=gr.State(None),
    )


def _header(service: LabelService) -> tuple[gr.Accordion, gr.Textbox, gr.Markdown]:
    """The guidelines, the annotator's name and their progress."""
    with gr.Accordion("Guidelines", open=False) as guidelines:
        gr.Markdown(service.guidelines(), elem_id="label-guidelines")
    with gr.Row(equal_height=True):
        annotator = gr.Textbox(
            label="Your name",
            placeholder="Votes are recorded under this name",
            max_length=MAX_NAME_CHARS,
            scale=1,
            elem_id="label-annotator",
        )
        progress = gr.Markdown(elem_id="label-progress")
    return guidelines, annotator, progress


def answer_panes(prefix: str, names: list[str], titles: list[str]) -> AnswerPanes:
    """One pane per answer, side by side: ids `{prefix}-answer-{name}`, `{prefix}-count-{name}`."""
    panes: AnswerPanes = AnswerPanes([], [], [], [], titles)
    # Not equal_height: that stretches each column's heading too, which pushes a short
    # answer's box down to the middle of the row. Each box starts at the top.
    with gr.Row(equal_height=False):
        for name, title in zip(names, titles, strict=True):
            with gr.Column(min_width=200) as pane:
                panes.headings.append(gr.Markdown(f"### {title}"))
                answer = gr.Markdown("…", container=True, elem_id=f"{prefix}-answer-{name}")
                panes.answers.append(answer)
                panes.counts.append(gr.Markdown(elem_id=f"{prefix}-count-{name}"))
            panes.panes.append(pane)
    return panes


def _pair_view() -> ModeView:
    """A and B, and the four vote buttons (disabled until the pair is complete)."""
    with gr.Column(elem_id="label-pair-screen") as column:
        panes = answer_panes("label", ["a", "b"], ["A", "B"])
        with gr.Row():
            votes = {
                choice: gr.Button(
                    f"{CHOICES[choice]} ({key})",
                    variant="primary" if choice in ("a", "b") else "secondary",
                    interactive=False,
                    elem_id=VOTE_IDS[choice],
                )
                for choice, key in VOTE_KEYS.items()
            }
    return ModeView(column, panes, votes)


def _single_view() -> ModeView:
    """The one answer, 👍 and 👎 (hidden until the mode is 1)."""
    with gr.Column(visible=False, elem_id="label-single-screen") as column:
        panes = answer_panes("label", ["single"], ["The answer"])
        with gr.Row():
            verdicts = {
                verdict: gr.Button(
                    f"{VERDICT_LABELS[verdict]} ({key})",
                    variant="primary",
                    interactive=False,
                    elem_id=f"label-verdict-{verdict}",
                )
                for verdict, key in VERDICT_KEYS.items()
            }
    return ModeView(column, panes, verdicts)


def _rank_view() -> tuple[ModeView, gr.Markdown, gr.Button]:
    """A to D (D hidden for 3 answers), the order so far, a button per letter and Undo."""
    with gr.Column(visible=False, elem_id="rank-screen") as column:
        panes = answer_panes("rank", [c.lower() for c in LETTERS], list(LETTERS))
        order = gr.Markdown(elem_id="rank-order")
        with gr.Row():
            picks = {
                letter: gr.Button(
                    f"{letter} ({letter.lower()})",
                    interactive=False,
                    elem_id=f"rank-pick-{letter.lower()}",
                )
                for letter in LETTERS
            }
            undo = gr.Button("Undo (Backspace)", interactive=False, elem_id="rank-undo")
    return ModeView(column, panes, picks), order, undo


def _sampling_sliders(defaults: LabelSettings) -> dict[str, gr.Slider]:
    """The Sampling accordion, by LabelTab field name."""
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            sliders = {
                "temperature_a": gr.Slider(
                    0, 2, defaults.temperatures[0], step=0.05, label="Temperature 1"
                ),
                "temperature_b": gr.Slider(
                    0, 2, defaults.temperatures[1], step=0.05, label="Temperature 2"
                ),
                "top_p": gr.Slider(0.05, 1, defaults.top_p, step=0.05, label="Top-p"),
                "max_new_tokens": gr.Slider(
                    8, 1024, defaults.max_new_tokens, step=8, label="Max new tokens per answer"
                ),
            }
        gr.Markdown(
            "Two answers get the two temperatures (which one is shown as A is random); one "
            "answer gets one of them; 3 or 4 get temperatures spread evenly between them."
        )
    return sliders
