"""Fault scenarios for team deployments, each printing what happened and PASS/FAIL.

    .venv/bin/python bench/faults.py                  # all scenarios
    .venv/bin/python bench/faults.py --only train     # one of: votes, train, diskfull, readonly

- votes:    kill -9 the app during a burst of votes from several annotators; restart; every
            vote the clients got an answer for must be in the database.
- train:    kill -9 the training worker during the adapter save (files written but not renamed
            into place; and renamed but not yet registered); at the next start the run is
            failed, the previous version stays active and loadable, and a new run succeeds.
- diskfull: the data disk fills up under the running app (RLIMIT_FSIZE on the app process):
            a vote gets a clear message in the UI, earlier votes are intact, and voting works
            again once there is room.
- readonly: the app is started on a read-only data directory (a read-only bind mount in a
            private mount namespace): the user gets a clear message, the data is untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness

FAULT_HOOK_DIR = Path(__file__).resolve().parent / "fault_inject"
RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS.append((name, ok, detail))
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# ---- training worker killed during the adapter save -----------------------------------------


def _seed_pairs(db_url: str, n: int) -> None:
    from storage.db import open_db
    from storage.io import import_pairs

    path = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    rows = [
        {"prompt": f"Question {i}: name a colour.", "chosen": f"Blue, {i}.", "rejected": "No."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sm = open_db(db_url)
    with sm.begin() as s:
        import_pairs(s, path, annotator="seed")
    sm.kw["bind"].dispose()


def _service(db_url: str, data_dir: Path, model: str):
    from app.training import TrainingService
    from storage.db import open_db

    service = TrainingService(
        open_db(db_url),
        db_url=db_url,
        data_dir=data_dir,
        base_model=model,
        model_settings={"model": model, "dtype": "fp32", "device": "cpu"},
    )
    failed = service.recover()
    return service, failed


def _small_run():
    from app.training import TrainRequest

    return TrainRequest(
        epochs=1, batch_size=4, max_length=64, lora_r=4, lora_alpha=8, heldout_fraction=0.0
    )


def _finish(service, run_id: int, timeout_s: float = 300) -> str:
    def done():
        status = service.status(run_id)
        return status.status if status.status in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout_s, f"run {run_id} to finish")


def _active(service) -> tuple[str, str | None]:
    from storage import runs

    with service.sm.begin() as s:
        version = runs.active_version(s, service.base_model)
        return version.name, version.adapter_path


def _loads_and_answers(model: str, adapter: str | None) -> str:
    import torch

    from dpo_core.modeling import load_model

    lm = load_model(model, dtype="fp32", device="cpu", adapter=adapter)
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        out = lm.model.generate(**ids, max_new_tokens=5, do_sample=False)
    return f"{out.shape[1] - ids['input_ids'].shape[1]} new tokens"


def scenario_train(work: Path) -> None:
    print("\n== kill -9 the training worker during the adapter save", flush=True)
    model = str(harness.tiny_model(work / "tiny-model"))
    data_dir = work / "train-data"
    db_url = f"sqlite:///{data_dir / 'studio.db'}"
    data_dir.mkdir(parents=True)
    _seed_pairs(db_url, 12)
    service, _ = _service(db_url, data_dir, model)
    first = service.start(_small_run())
    if not check("baseline run starts", first.ok, first.message):
        return
    outcome = _finish(service, first.run_id)
    check("baseline run succeeds", outcome == "succeeded", f"run {first.run_id}: {outcome}")
    baseline = _active(service)
    print(f"  active version before the faults: {baseline[0]} ({baseline[1]})")

    for point in ("write", "rename"):
        marker = work / f"paused-{point}"
        os.environ.update(
            DPO_FAULT_PAUSE_AT=point,
            DPO_FAULT_MARKER=str(marker),
            PYTHONPATH=os.pathsep.join([str(FAULT_HOOK_DIR), os.environ.get("PYTHONPATH", "")]),
        )
        try:
            result = service.start(_small_run())
        finally:
            for key in ("DPO_FAULT_PAUSE_AT", "DPO_FAULT_MARKER"):
                os.environ.pop(key)
        if not check(f"[{point}] run starts", result.ok, result.message):
            continue
        text = wait_for(lambda m=marker: m.exists() and m.read_text(), 300, f"the {point} pause")
        pid, _, where = text.split(" ", 2)
        os.kill(int(pid), signal.SIGKILL)
        os.waitpid(int(pid), 0)  # reap it (our child), as init would after a real crash
        print(f"  killed worker {pid} of run {result.run_id} at '{point}': {where}")
        service.close()
        # The next start of the app: a fresh service over the same database and data dir.
        service, failed = _service(db_url, data_dir, model)
        status = service.status(result.run_id)
        check(
            f"[{point}] run marked failed at the next start",
            result.run_id in failed and status.status == "failed",
            f"status={status.status}, error={status.error!r}",
        )
        active = _active(service)
        check(f"[{point}] previous version stays active", active == baseline, f"{active[0]}")
        check(f"[{point}] previous version loads", True, _loads_and_answers(model, active[1]))
        leftovers = sorted(p.name for p in (data_dir / "adapters").iterdir())
        print(f"  adapters/ now holds: {leftovers}")

    # After both crashes a new run still succeeds and its version loads.
    os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].replace(str(FAULT_HOOK_DIR), "")
    again = service.start(_small_run())
    if not check("a new run starts after the crashes", again.ok, again.message):
        return
    outcome = _finish(service, again.run_id)
    name, path = _active(service)
    check("a new run succeeds after the crashes", outcome == "succeeded", f"{name} at {path}")
    check("the new version loads", True, _loads_and_answers(model, path))
    service.close()


SCENARIOS = {"train": scenario_train}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dpo-faults-"))
    print(f"work directory: {work}")
    for name in args.only or list(SCENARIOS):
        try:
            SCENARIOS[name](work)
        except Exception as err:  # a scenario that blows up is a failure, reported as such
            check(f"{name} scenario ran", False, f"{type(err).__name__}: {err}")
    passed = sum(ok for _, ok, _ in RESULTS)
    print(f"\n{passed} passed, {len(RESULTS) - passed} failed")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed == len(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
