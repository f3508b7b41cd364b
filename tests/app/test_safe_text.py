"""Untrusted text shown as Markdown: HTML is displayed, never run; code stays literal."""

from __future__ import annotations

from app.safe_text import safe_markdown


def test_html_becomes_text():
    shown = safe_markdown('Hi <script>alert("x")</script> and <img src=x onerror=alert(1)> & co')
    assert "<script" not in shown and "<img" not in shown
    assert "&lt;script&gt;" in shown and "&lt;img src=x onerror=alert(1)&gt;" in shown
    assert "&amp; co" in shown


def test_code_is_left_literal_because_markdown_shows_it_as_text():
    text = "Use `<b>` for bold:\n\n```html\n<b>hi</b>\n```\nafter <i>this</i>"
    shown = safe_markdown(text)
    assert "`<b>`" in shown
    assert "```html\n<b>hi</b>\n```" in shown
    assert shown.endswith("after &lt;i&gt;this&lt;/i&gt;")


def test_backticks_across_paragraphs_are_not_a_code_span():
    shown = safe_markdown("a ` <script>x</script>\n\nb ` c")
    assert "<script" not in shown


def test_unclosed_fence_keeps_the_rest_as_code():
    shown = safe_markdown("Code:\n~~~\n<div>\n")
    assert shown == "Code:\n~~~\n<div>\n"


def test_empty_and_very_long_text():
    assert safe_markdown("  \n", empty="*(no answer)*") == "*(no answer)*"
    shown = safe_markdown("x" * 25_000, limit=20_000)
    assert shown.startswith("x" * 20_000) and "5,000 more characters not shown" in shown
