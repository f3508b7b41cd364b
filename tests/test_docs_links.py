"""Every relative link in README.md and docs/*.md points to a file that exists, and a link
with an anchor (`page.md#section`) to a heading of that page: the README is a front door, so a
moved section must stay reachable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE = re.compile(r"`[^`\n]*`")


def links(page: Path) -> list[str]:
    """The link targets of `page`, outside code blocks and code spans."""
    text = CODE.sub("", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_is_a_front_door_that_links_every_topic_page():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 200
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(readme)}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set(), "docs pages the README does not link to"


def test_slugs_follow_github():
    assert slug("Labeling (the Label tab)") == "labeling-the-label-tab"
    assert slug("Rankings: 3 or 4 answers at once") == "rankings-3-or-4-answers-at-once"
    assert slug("Train: one click, live curves, a new version") == (
        "train-one-click-live-curves-a-new-version"
    )
