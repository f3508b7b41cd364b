"""The CLI's JSONL files: one JSON object a line; an error names the file and the line."""

from __future__ import annotations

import pytest

from dpo_core.pairs_file import load_pairs_jsonl


def test_load_pairs_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl, line 3: not valid JSON"):
        load_pairs_jsonl(path)
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert load_pairs_jsonl(path) == [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pairs_jsonl(tmp_path / "missing.jsonl")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="cannot read pairs"):
        load_pairs_jsonl(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no pairs"):
        load_pairs_jsonl(path)
