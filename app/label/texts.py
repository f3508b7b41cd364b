"""What the Label tab says: the status line for k answers on their way, the progress line and
the judge's suggestion. One wording for every mode; only the "ready" line says which keys."""

from __future__ import annotations

from app.label.modes import PAIR, SINGLE, Mode
from app.label.ranking import LETTERS
from app.label.service import ANSWERS_NAMED, CHOICES, PairProgress, Progress
from dpo_core.judge import Suggestion
from storage.verdicts import VerdictCounts


def format_progress(progress: Progress) -> str:
    choices = " · ".join(f"{CHOICES[c]} {n}" for c, n in progress.by_choice.items())
    return (
        f"**Labeled by you: {progress.mine}** · by everyone: {progress.everyone} · "
        f"usable for training: {progress.usable_pairs}  \n{choices} · prompts: {progress.prompts}"
    )


def verdicts_text(counts: VerdictCounts) -> str:
    return (
        f"**Single answers judged by you: {counts.mine}** (👍 {counts.up} · 👎 {counts.down}) "
        f"· by everyone: {counts.everyone}"
    )


def status_text(answers: PairProgress, mode: Mode) -> str:
    """Waiting in line, writing, or ready (with the mode's keys); the "prompt was cut" notice
    after each."""
    notice = f"\n\n⚠️ {answers.notice}" if answers.notice else ""
    if answers.waiting is not None:
        ahead = answers.waiting - 1
        if answers.notice and ahead <= 0:  # not the line: a generation server down or slow
            return f"⏳ {answers.notice}"
        if ahead <= 0:
            return f"⏳ Next in line: the model is finishing other work…{notice}"
        return f"⏳ Waiting for the model: {ahead} request(s) ahead of you…{notice}"
    if not answers.done:
        return f"Writing {ANSWERS_NAMED[mode.k]} with version **{answers.version}**…{notice}"
    return f"{ready_text(answers, mode)}{notice}{suggestion_text(answers.suggestion)}"


def ready_text(answers: PairProgress, mode: Mode) -> str:
    version = f"(version **{answers.version}**)"
    if mode.buttons == SINGLE:
        return (
            f"The answer is ready {version}. Is it a good answer? 👍 key U, 👎 key D; "
            "S skips, R regenerates."
        )
    if mode.buttons == PAIR:
        shared = f" A pair others judged ({answers.shared})." if answers.shared else ""
        if answers.checking:
            shared = (
                f" One of {answers.checking}'s own labels: which answer is better? Its choice "
                "is hidden; your vote overrides it."
            )
        return (
            f"Both answers are ready {version}.{shared} Vote with the buttons or the keys 1–4; "
            "S skips, R regenerates."
        )
    return (  # a ranking
        f"All {mode.k} answers are ready {version}. Press their letters best first "
        f"(A–{LETTERS[mode.k - 1]}); after {mode.k - 1} letters the order is complete and "
        "recorded. Backspace undoes, S skips, R regenerates."
    )


def suggestion_text(suggestion: Suggestion | None) -> str:
    """The judge's suggestion as a line under the status; the person's vote decides."""
    if suggestion is None:
        return ""
    if suggestion.choice is None:
        return f"\n\n🤖 No suggestion from {suggestion.judge}: {suggestion.reason}"
    pick = {"a": "A is better", "b": "B is better", "tie": "a tie"}[suggestion.choice]
    return (
        f"\n\n🤖 **{suggestion.judge} suggests: {pick}** ({suggestion.reason}). Your vote decides."
    )
