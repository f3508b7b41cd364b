"""The Train tab's devices setting: more than one launches the worker under torchrun, whose
ranks train together and whose rank 0 registers the version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.train.service import SETTINGS, TrainingService, TrainRequest
from dpo_core.distributed import launch_command, visible_devices
from storage import repo, runs
from storage.db import open_db


def test_devices_is_a_setting_defaulting_to_the_visible_gpus():
    devices = next(s for s in SETTINGS if s.name == "devices")
    assert devices.kind is int and devices.default == visible_devices() >= 1
    assert TrainRequest.from_values({"devices": "2"}).devices == 2
    with pytest.raises(ValueError, match="devices"):
        TrainRequest(devices=0).validate()


def test_one_device_is_a_plain_process_and_more_run_under_torchrun():
    assert launch_command(1, "app.train.worker", ["--x"])[1:] == ["-m", "app.train.worker", "--x"]
    cmd = launch_command(2, "app.train.worker", ["--x"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    assert cmd[5:] == ["2", "-m", "app.train.worker", "--x"]


@pytest.mark.slow
def test_a_two_device_run_trains_under_torchrun_and_registers_v1(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    url = f"sqlite:///{tmp_path / 'studio.db'}"
    sm = open_db(url)
    for i in range(8):
        with sm.begin() as s:
            prompt_id = repo.add_prompt(s, f"Tell me about topic {i}.").id
            a, b = (
                repo.record_response(s, prompt_id=prompt_id, model_version_id=None, text=t)
                for t in (f"A kind answer about topic {i}.", "No.")
            )
            repo.record_preference(
                s, response_a_id=a.id, response_b_id=b.id, choice="a", annotator="ann"
            )
    model = {"model": str(tiny_model_dir), "dtype": "fp32", "device": "cpu"}
    service = TrainingService(
        sm, db_url=url, data_dir=tmp_path, base_model="tiny", model_settings=model
    )
    request = TrainRequest(devices=2, epochs=1, lora_r=4, max_length=64, heldout_fraction=0.0)
    started = service.start(request)
    assert started.ok, started.message
    assert service.workers.procs[started.run_id].wait(timeout=600) == 0
    log = (tmp_path / "runs" / f"run-{started.run_id}.log").read_text()
    with sm.begin() as s:
        run = runs.get_run(s, started.run_id)
        assert run.status == "succeeded", (run.error, log[-3000:])
        assert runs.active_version(s, "tiny").name == "v1"
    assert (tmp_path / "adapters" / "v1" / "adapter_model.safetensors").exists()
    assert "rank 1 of 2" in log  # the worker ran under torchrun, two ranks


def test_more_devices_than_gpus_is_refused_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    url = f"sqlite:///{tmp_path / 'studio.db'}"
    sm = open_db(url)
    model = {"model": "tiny", "dtype": "fp32", "device": "cpu"}
    service = TrainingService(
        sm, db_url=url, data_dir=tmp_path, base_model="tiny", model_settings=model
    )
    result = service.start(TrainRequest(devices=3))
    assert not result.ok
    assert result.message == "Invalid settings: devices is 3 but only 1 GPU(s) are visible"
    with sm.begin() as s:
        assert runs.list_runs(s) == []


def test_importing_the_train_modules_does_not_ask_cuda():
    """The `devices` default is counted when a request is made, not at import (asking CUDA at
    import initialises it in every process that imports the module, the worker's ranks too)."""
    code = (
        "import torch\n"
        "def asked(*a, **k):\n"
        "    raise SystemExit('torch.cuda asked at import')\n"
        "torch.cuda.device_count = torch.cuda.is_available = torch.cuda.init = asked\n"
        "import app.train.request, app.train.service, app.train.tab\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
