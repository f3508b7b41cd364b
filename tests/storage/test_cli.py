"""`python -m storage`: the commands a user types, their output, their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest

from storage.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "storage", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_prompts_then_stats_on_a_new_database(tmp_path: Path):
    (tmp_path / "prompts.txt").write_text("Name three planets.\nWhat is DPO?\n\n", encoding="utf-8")
    env = {"DPO_STUDIO_DATA": str(tmp_path / "data")}
    imported = run_cli("import-prompts", "prompts.txt", cwd=tmp_path, env=env)
    assert imported.returncode == 0, imported.stderr
    assert "2 prompts added" in imported.stdout
    stats = run_cli("stats", cwd=tmp_path, env=env)
    assert stats.returncode == 0, stats.stderr
    assert "prompts:   2 (2 train, 0 heldout)" in stats.stdout
    assert (tmp_path / "data" / "studio.db").is_file()


def test_a_bad_file_is_one_line_on_stderr_and_exit_2(tmp_path: Path):
    (tmp_path / "prompts.txt").write_bytes(b"caf\xe9\n")
    result = run_cli(
        "import-prompts", "prompts.txt", "--db", f"sqlite:///{tmp_path / 's.db'}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error: prompts.txt: not UTF-8 text (byte 3, line 1); save it as UTF-8"
    )
    assert "Traceback" not in result.stderr


def test_every_command_with_db(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"prompt": "Name a planet.", "chosen": "Mars.", "rejected": "A banana."}) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "export.jsonl"
    assert main(["init", "--db", db_url]) == 0
    assert main(["import-pairs", str(pairs), "--db", db_url, "--annotator", "seed"]) == 0
    assert main(["import-pairs", str(pairs), "--db", db_url, "--annotator", "seed"]) == 0
    assert main(["export", str(out), "--db", db_url, "--format", "conversational"]) == 0
    assert main(["stats", "--db", db_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("database ready:")
    assert lines[1].endswith("1 pairs read, 1 new, 0 already there, 0 skipped (chosen == rejected)")
    assert lines[2].endswith("1 pairs read, 0 new, 1 already there, 0 skipped (chosen == rejected)")
    assert lines[3] == f"{out}: 1 pairs written (conversational format, votes: majority)"
    assert "votes seed: 1 (a 1, b 0, tie 0, both_bad 0); usable training pairs 1" in lines
    exported = datasets.load_dataset(
        "json", data_files=str(out), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert exported[0]["chosen"] == [{"role": "assistant", "content": "Mars."}]


def test_export_with_nothing_to_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert (
        main(["export", str(tmp_path / "x.jsonl"), "--db", f"sqlite:///{tmp_path / 's.db'}"]) == 2
    )
    assert "no usable preference pairs" in capsys.readouterr().err


def test_storage_never_imports_torch_or_gradio(tmp_path: Path):
    """Import, export and stats through every storage module, then look at sys.modules."""
    (tmp_path / "prompts.txt").write_text("a prompt\n", encoding="utf-8")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8"
    )
    script = textwrap.dedent(
        f"""
        import sys
        import storage, storage.db, storage.io, storage.models, storage.repo, storage.runs
        from storage.__main__ import main
        db = "sqlite:///{tmp_path / "s.db"}"
        for argv in (["import-prompts", "prompts.txt"], ["import-pairs", "pairs.jsonl"],
                     ["export", "out.parquet"], ["stats"]):
            assert main([*argv, "--db", db]) == 0
        print(sorted(m for m in ("torch", "gradio") if m in sys.modules))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_stats_reports_agreement_per_answer(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """x and y import the same four pairs; z prefers the other answer on the first. By hand:
    p_a = (1/3 + 3) / 4, pi = (11/12, 1/12), p_e = 2 pi_1 pi_2 / 3, AC1 = 0.824; alpha is 0
    (one dissenting vote in twelve, so the observed disagreement equals the expected)."""
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."}
        for i in range(4)
    ]
    swapped = [r | {"chosen": r["rejected"], "rejected": r["chosen"]} for r in rows[:1]] + rows[1:]
    for name, data in (("x", rows), ("y", rows), ("z", swapped)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        assert main(["import-pairs", str(path), "--db", db_url, "--annotator", name]) == 0
    assert main(["stats", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "alpha 0.000, Gwet's AC1 0.824 over 4 pairs with two or more votes" in out
    assert "z: 4 votes, agrees with the others' majority 75% of 4" in out
    assert "contested: responses" in out
