"""Data-parallel training: `torchrun --nproc_per_node 2 -m dpo_core train` on CPU (gloo, one
thread per process) gives the one-process adapter; a rank that dies fails the run cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_core import distributed, trainer
from dpo_core.batches import step_share
from dpo_core.distributed import Comm
from tests.dpo_core.test_train_cli import write_pairs

# The 2-rank run splits each 4-pair step into two forward passes of 2 pairs where the one-process
# run makes one pass of 4: other matrix shapes and padding, so other float rounding in fp32
# (measured: 1e-7 on weights of size ~0.1), and AdamW divides by the gradient's own scale.
ATOL = 1e-5


def train_args(model_dir: Path, pairs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m", "dpo_core", "train", "--pairs", str(pairs), "--out", str(out),
        "--model", str(model_dir), "--dtype", "fp32", "--device", "cpu", "--lora-r", "4",
        "--max-length", "64", "--batch-size", "4", "--grad-accum", "1", "--lora-dropout", "0",
        "--learning-rate", "1e-3", "--heldout", str(pairs), "--kl-prompts", "2",
        "--kl-max-new-tokens", "4", "--min-heldout-pairs", "4", *extra,
    ]  # fmt: skip


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc)]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DPO_DIST_TIMEOUT_S": "120"}


def test_a_rank_takes_its_contiguous_share():
    items = list(range(7))
    assert [Comm(r, 3).share(items) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [Comm(r, 2).share([9]) for r in range(2)] == [[9], []]
    assert Comm().share(items) == items


def test_a_step_is_split_by_micro_batches_else_by_pairs():
    step = [[0, 1], [2, 3], [4, 5]]
    assert [step_share(step, Comm(r, 2)) for r in range(2)] == [[[0, 1], [2, 3]], [[4, 5]]]
    assert [step_share([[0, 1, 2]], Comm(r, 2)) for r in range(2)] == [[[0, 1]], [[2]]]
    assert step_share([[0]], Comm(1, 2)) == []


def test_train_works_in_the_group_it_is_given_not_a_module_global(tiny_lm, tmp_path, monkeypatch):
    from tests.dpo_core.test_trainer import PAIRS, small_config

    assert not hasattr(distributed, "current")  # no module global to read it from
    asked = []

    class Watched(Comm):
        def barrier(self) -> None:
            asked.append("barrier")

    config = small_config(epochs=1)
    result = trainer.train(tiny_lm, PAIRS[:4], config, tmp_path / "v1", comm=Watched())
    assert result.adapter_dir is not None
    assert asked == ["barrier"]  # rank 0 of the given group saved, then met the others


@pytest.mark.slow
def test_two_processes_train_the_one_process_adapter(tiny_model_dir, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, *train_args(tiny_model_dir, pairs, one, "--epochs", "2")]
    single = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=False)
    assert single.returncode == 0, single.stderr
    cmd = torchrun(2) + train_args(tiny_model_dir, pairs, two, "--epochs", "2")
    double = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=False)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("adapter saved to") == 1  # rank 0 reports, rank 1 is quiet
    a, b = (load_file(d / "adapter_model.safetensors") for d in (one, two))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=0)
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 10 * ATOL


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with `RANK=rank` under `parent`."""
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_run_without_an_adapter(tiny_model_dir, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "adapters" / "v1"
    args = train_args(tiny_model_dir, pairs, out, "--epochs", "500", "--no-early-stopping")
    proc = subprocess.Popen(
        [*torchrun(2), *args[:2], "-v", *args[2:]], stderr=subprocess.PIPE, text=True, env=ENV
    )
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "step 2/" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(300), "".join(lines[-30:])
    victim = rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    code = proc.wait(timeout=300)
    reader.join(timeout=10)
    log = "".join(lines)
    assert code != 0
    assert "ChildFailedError" in log and "Signal 9 (SIGKILL)" in log, log[-3000:]
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.glob(".v1-*"))  # no partial save


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_data_parallel_training(tiny_model_dir, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "v1"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", "2"]  # fmt: skip
    args = train_args(tiny_model_dir, pairs, out, "--epochs", "1")
    res = subprocess.run(
        [*accelerate, *args[:2], "-v", *args[2:]],
        capture_output=True, text=True, env=ENV, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 1 of 2" in res.stderr and res.stdout.count("adapter saved to") == 1
    assert (out / "adapter_model.safetensors").exists()
