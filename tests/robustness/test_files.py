"""Bad files at the import/export CLI (`python -m storage`): a one-line error naming the file
and the problem, exit code 2, no traceback, and the database exactly as it was."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

from storage.__main__ import main as storage_main
from storage.db import open_db
from storage.io import read_pairs
from storage.repo import preference_pairs, store_stats

BIG = "x" * 100_000
HTML = '<script>alert("pwned")</script><img src=x onerror=alert(1)><b>bold</b>'


@pytest.fixture(autouse=True)
def fresh_logging():
    """Log handlers write to this test's captured stderr, as they would to a terminal (not
    to the closed stream of an earlier test's capture): the root logger's, set up by the CLI,
    and the one `datasets` installs on its own logger."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    library = [
        h for h in logging.getLogger("datasets").handlers if type(h) is logging.StreamHandler
    ]
    for handler in library:
        handler.stream = sys.stderr
    yield
    root.handlers[:] = saved
    for handler in library:
        handler.stream = sys.__stderr__


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = storage_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _counts(db_url: str) -> tuple[int, int]:
    sm = open_db(db_url)
    try:
        with sm.begin() as s:
            stats = store_stats(s)
        return sum(stats.prompts.values()), stats.overall.votes
    finally:
        sm.kw["bind"].dispose()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _seed(db_url: str, tmp_path: Path, capsys) -> tuple[int, int]:
    pairs = _jsonl(tmp_path / "seed.jsonl", [{"prompt": "p0", "chosen": "a", "rejected": "b"}])
    assert _run(capsys, "import-pairs", str(pairs), "--db", db_url)[0] == 0
    return _counts(db_url)


BAD_FILES = {
    # name: (command, file name, content bytes, expected message)
    "empty file": ("import-prompts", "p.txt", b"", "the file is empty"),
    "invalid UTF-8 prompts": (
        "import-prompts", "p.txt", b"fine\nalso fine\ncaf\xe9\n",
        r"not UTF-8 text \(byte 18, line 3\)",
    ),
    "invalid UTF-8 pairs": (
        "import-pairs", "p.jsonl", b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n',
        "not UTF-8 text",
    ),
    "wrong columns": (
        "import-pairs", "p.jsonl", b'{"question": "q", "answer": "a"}\n',
        "missing column.s. chosen, rejected; found question, answer",
    ),
    "wrong column types": (
        "import-pairs", "p.jsonl", b'{"prompt": "q", "chosen": 1, "rejected": "b"}\n',
        "row 1: 'chosen' and 'rejected' must both be strings",
    ),
    "empty answer": (
        "import-pairs", "p.jsonl",
        b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": " ", '
        b'"rejected": "b"}\n',
        "row 2: 'chosen' is empty",
    ),
    "not JSON": ("import-pairs", "p.jsonl", b"this is not json\n", "not a readable json file"),
    "unsupported type": (
        "import-prompts", "p.xlsx", b"PK\x03\x04", "unsupported file type",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_refused_whole_with_a_clear_message(case, db_url, tmp_path, capsys):
    before = _seed(db_url, tmp_path, capsys)
    command, name, content, message = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    rc, _, err = _run(capsys, command, str(path), "--db", db_url)
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}") and "Traceback" not in err
    assert re.search(message, last), err
    assert _counts(db_url) == before  # nothing half-imported


def test_missing_file_is_a_clear_message(db_url, tmp_path, capsys):
    rc, _, err = _run(capsys, "import-pairs", str(tmp_path / "nope.jsonl"), "--db", db_url)
    assert rc == 2 and "no such file" in err


def test_whitespace_only_prompts_are_skipped_and_counted(db_url, tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("  \n\t\n\u00a0\u2003\nreal prompt\n")
    rc, out, _ = _run(capsys, "import-prompts", str(path), "--db", db_url)
    assert rc == 0 and "1 prompts added" in out and "3 blank skipped" in out


def test_export_with_zero_pairs_says_so(db_url, tmp_path, capsys):
    rc, _, err = _run(capsys, "export", str(tmp_path / "out.jsonl"), "--db", db_url)
    assert rc == 2 and "no usable preference pairs" in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "text",
    [BIG, HTML, "bell\x07 escape\x1b[31m red\x1b[0m tab\t cr\r end", "emoji 🙂 rtl \u202eabc"],
    ids=["100k chars", "HTML and script", "control characters", "unicode controls"],
)
def test_unusual_text_round_trips_verbatim(text, db_url, tmp_path, capsys):
    """Text is data: stored and exported byte for byte, never interpreted or truncated."""
    pairs = _jsonl(tmp_path / "in.jsonl", [{"prompt": text, "chosen": text + "!", "rejected": "b"}])
    assert _run(capsys, "import-pairs", str(pairs), "--db", db_url)[0] == 0
    sm = open_db(db_url)
    try:
        with sm.begin() as s:
            (pair,) = preference_pairs(s).pairs
    finally:
        sm.kw["bind"].dispose()
    assert (pair.prompt, pair.chosen) == (text.strip(), text + "!")
    out = tmp_path / "out.jsonl"
    assert _run(capsys, "export", str(out), "--db", db_url)[0] == 0
    (row,) = read_pairs(out)
    assert (row.prompt, row.chosen) == (text.strip(), text + "!")


def test_nul_character_in_a_file_is_stored_or_refused_cleanly(db_url, tmp_path, capsys):
    """PostgreSQL text cannot hold U+0000: the import must refuse it with a message (or store
    it), never crash with a driver traceback."""
    path = _jsonl(tmp_path / "nul.jsonl", [{"prompt": "a\x00b", "chosen": "x", "rejected": "y"}])
    rc, _, err = _run(capsys, "import-pairs", str(path), "--db", db_url)
    assert "Traceback" not in err
    assert rc == 0 or (rc == 2 and ("U+0000" in err or "NUL" in err))


MULTI_TURN = {
    "prompt": [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a planet."},
    ],
    "chosen": [{"role": "assistant", "content": "Mars."}],
    "rejected": [{"role": "assistant", "content": "No."}],
}


def test_both_clis_refuse_a_multi_turn_pair_file_with_one_message(db_url, tmp_path, capsys):
    """`python -m dpo_core train` and `python -m storage import-pairs` read pairs with one
    parser (`common.pair_format`): the same file gets the same one-line error from both, before
    a model is loaded or anything is stored."""
    from dpo_core.__main__ import main as dpo_core_main

    path = _jsonl(tmp_path / "multi.jsonl", [MULTI_TURN])
    expected = (
        f"error: {path}: row 1: only single-turn conversations are supported (one user "
        "message, then one assistant answer in 'chosen' and in 'rejected'); found roles "
        "['user', 'assistant', 'user'] + ['assistant']"
    )
    rc, _, err = _run(capsys, "import-pairs", str(path), "--db", db_url)
    # the last line: in process, a datasets progress bar may come first (a shell has none)
    assert (rc, err.strip().splitlines()[-1]) == (2, expected)
    assert _counts(db_url) == (0, 0)
    train = ["train", "--pairs", str(path), "--out", str(tmp_path / "v1"), "--model", "nowhere"]
    assert dpo_core_main(train) == 2
    assert capsys.readouterr().err.strip() == expected
    assert not (tmp_path / "v1").exists()
