"""A data directory the app cannot write to: the app says so and stops, before loading a model;
the data in it is untouched. A read-only file system is made with a read-only bind mount in a
private mount namespace (root only bypasses permission bits, not a read-only mount)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.__main__ import data_dir_problem
from app.__main__ import main as app_main

ROOT = Path(__file__).resolve().parents[2]


def _can_mount(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind {tmp_path} {tmp_path}"], capture_output=True
    )
    return probe.returncode == 0


def test_read_only_data_directory_is_refused_at_start(tmp_path: Path):
    if not _can_mount(tmp_path):
        pytest.skip("needs unshare and mount (root in a sandbox that allows mount namespaces)")
    data = tmp_path / "data"
    data.mkdir()
    (data / "studio.db").write_bytes(b"existing data")
    ro = f"mount --bind {data} {data} && mount -o remount,bind,ro {data}"
    serve = f"{sys.executable} -m app --model no-model-needed --data-dir {data}"
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{ro} && exec {serve}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"error: the data directory {data} is read-only" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (data / "studio.db").read_bytes() == b"existing data"


def test_data_directory_that_is_a_file(tmp_path: Path, capsys):
    taken = tmp_path / "data"
    taken.write_text("a file, not a directory")
    assert app_main(["--data-dir", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot create the data directory {taken}: File exists")
    assert data_dir_problem(tmp_path / "fresh" / "dir") is None
