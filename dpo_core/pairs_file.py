"""JSONL files of pairs or prompts, as `python -m dpo_core train` reads them: one JSON object
a line, blank lines skipped; an error names the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_pairs_jsonl(path: str | Path, what: str = "pairs") -> list[dict[str, Any]]:
    """Read one JSON pair per line (blank lines skipped); errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read {what} ({err})") from err
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            pairs.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
    if not pairs:
        raise ValueError(f"{path}: no {what} (expected one JSON object per line)")
    return pairs


def load_prompts_jsonl(path: str | Path) -> list[str]:
    """The `prompt` of each JSON line (a pairs file will do); errors name the file and line."""
    prompts = []
    for number, row in enumerate(load_pairs_jsonl(path, "prompts"), 1):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'{path}, entry {number}: expected a non-empty "prompt" string')
        prompts.append(prompt)
    return prompts
