"""docs/robustness.md stays honest: every row of its tables names a test (or a bench scenario),
and every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "robustness.md"
TEST_REF = re.compile(r"`([\w/]+\.py)::(\w+)(?:\[[^\]]*\])?`")
BENCH_REF = re.compile(r"bench `(\w+)`")


def table_rows() -> list[str]:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ")]
    skip = ("| Input |", "| Fault |", "| --- |")
    return [r for r in rows if not r.startswith(skip)]


def test_every_row_names_a_test_or_bench_scenario():
    rows = table_rows()
    assert len(rows) >= 40
    for row in rows:
        last = row.rstrip(" |").rsplit(" | ", 1)[-1]
        assert TEST_REF.search(last) or "…[" in last or BENCH_REF.search(last), row


@pytest.mark.parametrize(
    ("path", "name"), sorted({m.groups() for m in TEST_REF.finditer(DOC.read_text())})
)
def test_named_test_exists(path: str, name: str):
    source = (ROOT / "tests" / path).read_text()
    assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"{path}::{name}"


def test_named_bench_scenarios_exist():
    from bench.faults import SCENARIOS

    named = set(BENCH_REF.findall(DOC.read_text()))
    assert named and named <= set(SCENARIOS)
