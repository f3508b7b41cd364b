"""Show untrusted text (prompts, model answers) as Markdown in which HTML never runs.

Gradio's Markdown sanitizes HTML (drops `<script>`, `onerror=`...), but a dropped tag is also
hidden from the annotator, who should see exactly what the model wrote. So `<`, `>` and `&`
are escaped everywhere except inside code spans and fenced code blocks, where Markdown already
shows them literally (and where an escape would show up as `&lt;`).
"""

from __future__ import annotations

import html
import re

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
BLANK_LINE = re.compile(r"(\n[ \t]*\n)")
MAX_SHOWN_CHARS = 20_000


def safe_markdown(text: str, *, empty: str = "*(empty)*", limit: int = MAX_SHOWN_CHARS) -> str:
    """Markdown for `text` with any HTML shown as text; very long text is cut for display."""
    if not text.strip():
        return empty
    more = len(text) - limit
    if more > 0:
        text = text[:limit]
    out: list[str] = []
    fence: str | None = None  # the open fence, e.g. "```"
    paragraph: list[str] = []
    for line in text.split("\n"):
        match = FENCE.match(line)
        if fence is None and match:
            out.append(_escape_inline("\n".join(paragraph)) if paragraph else None)
            paragraph, fence = [], match.group(1)
            out.append(line)
        elif fence is not None:
            out.append(line)
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
        else:
            paragraph.append(line)
    if paragraph:
        out.append(_escape_inline("\n".join(paragraph)))
    shown = "\n".join(part for part in out if part is not None)
    if more > 0:
        shown += f"\n\n*… {more:,} more characters not shown*"
    return shown


def _escape_inline(text: str) -> str:
    """Escape HTML outside `code spans`, one paragraph at a time (a span never crosses a blank
    line)."""
    parts = []
    for block in BLANK_LINE.split(text):
        last = 0
        for span in CODE_SPAN.finditer(block):
            parts.append(html.escape(block[last : span.start()], quote=False))
            parts.append(span.group(0))
            last = span.end()
        parts.append(html.escape(block[last:], quote=False))
    return "".join(parts)
