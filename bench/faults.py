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
import threading
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
    from app.train.service import TrainingService
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
    from app.train.service import TrainRequest

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


# ---- the app killed during a burst of votes ---------------------------------------------------


def _burst(url: str, name: str, password: str, stop: threading.Event, acked: list[str]) -> None:
    """Generate a pair and vote, as fast as possible, until the app dies or `stop` is set."""
    from gradio_client import Client

    from bench.label_api import LabelApi

    label = LabelApi(Client(url, auth=(name, password), verbose=False))
    i = 0
    while not stop.is_set():
        prompt = f"[{name} #{i}] burst"
        i += 1
        try:
            pair = label.generate(prompt)
            label.vote(pair, "a" if i % 2 else "b")
        except Exception:  # the app is gone: whatever was not acknowledged may be lost
            return
        acked.append(prompt)


def scenario_votes(work: Path) -> None:
    print("\n== kill -9 the app during a burst of votes", flush=True)
    model = str(harness.tiny_model(work / "tiny-model"))
    accounts = harness.make_users(work / "users.toml", 4)
    data_dir = work / "votes-data"
    app = harness.serve(model, data_dir, work / "users.toml")
    stop = threading.Event()
    logs: dict[str, list[str]] = {name: [] for name in accounts if name != harness.ADMIN}
    threads = [
        threading.Thread(target=_burst, args=(app.url, n, accounts[n], stop, logs[n])) for n in logs
    ]
    for t in threads:
        t.start()
    wait_for(lambda: sum(map(len, logs.values())) >= 40, 120, "40 acknowledged votes")
    app.proc.send_signal(signal.SIGKILL)
    app.proc.wait()
    acked_at_kill = sum(map(len, logs.values()))
    stop.set()
    for t in threads:
        t.join(timeout=60)
    acked = {(n, prompt) for n, prompts in logs.items() for prompt in prompts}
    print(f"  killed the app (pid {app.proc.pid}) after {acked_at_kill} acknowledged votes")
    again = harness.serve(model, data_dir, work / "users.toml")
    try:
        stored = {(v.annotator, v.prompt) for v in harness.stored_votes(again.db_url)}
        lost = acked - stored
        check("every acknowledged vote is stored after restart", not lost, f"{len(acked)} "
              f"acknowledged, {len(stored)} stored, {len(lost)} lost")  # fmt: skip
        extra = len(stored - acked)
        print(f"  {extra} vote(s) stored whose answer never reached the client (in flight)")
        ok_after = []
        _burst_once(again.url, "ann00", accounts["ann00"], ok_after)
        check("the restarted app takes votes", bool(ok_after))
    finally:
        again.stop()


def _burst_once(url: str, name: str, password: str, acked: list[str]) -> None:
    from gradio_client import Client

    from bench.label_api import LabelApi

    label = LabelApi(Client(url, auth=(name, password), verbose=False))
    pair = label.generate(f"[{name}] after restart")
    label.vote(pair, "a")
    acked.append("after restart")


# ---- the data disk fills up / the data directory is read-only --------------------------------


def _refusal(call) -> str | None:
    """The message a failing UI action shows (gradio_client raises AppError with it)."""
    try:
        call()
    except Exception as err:
        return str(err)
    return None


def _clear(message: str | None, words: tuple[str, ...]) -> bool:
    """A short message, no traceback, that names the cause (Gradio's generic "the upstream
    app has raised an exception" does not)."""
    if not message or "Traceback" in message or len(message) > 400:
        return False
    return any(word in message.lower() for word in words)


DISK_WORDS = ("disk", "space", "full", "could not be saved", "not saved", "storage")


def scenario_diskfull(work: Path) -> None:
    import resource

    from gradio_client import Client

    from bench.label_api import LabelApi

    print("\n== the data disk fills up under the running app", flush=True)
    model = str(harness.tiny_model(work / "tiny-model"))
    accounts = harness.make_users(work / "users.toml", 1)
    data_dir = work / "full-data"
    data_dir.mkdir(parents=True)
    port = harness.free_port()
    # Output to a pipe: the app's log is not on the data disk (as with docker or journald).
    cmd = harness.app_command(model, data_dir, port, work / "users.toml")
    app = harness.launch_piped(cmd, port, data_dir)
    try:
        label = LabelApi(Client(app.url, auth=("ann00", accounts["ann00"]), verbose=False))
        before = []
        for i in range(5):
            label.vote(label.generate(f"before the disk filled #{i}"), "a")
            before.append(f"before the disk filled #{i}")
        pair = label.generate("a pair to vote on once the disk is full")
        # Every write that would grow a file past 4 KiB now fails with EFBIG, as on a full disk.
        resource.prlimit(app.proc.pid, resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        rewrite = "a much better answer " * 2500  # ~50 kB: the database must grow
        for via, vote in (("Gradio /vote", label.vote_gradio), ("POST /api/vote", label.vote)):
            message = _refusal(lambda vote=vote: vote(pair, "a", rewrite=rewrite))
            clear = _clear(message, DISK_WORDS)
            check(f"a vote on a full disk gets a clear message ({via})", clear, repr(message))
        big = "x" * 200_000  # a long prompt, so the database must grow
        message = _refusal(lambda: label.generate(big))
        check("so does a new pair", _clear(message, DISK_WORDS), repr(message))
        check("the app is still up", app.proc.poll() is None)
        print("  app log, last lines:\n    " + "\n    ".join(app.output().splitlines()[-3:]))
        resource.prlimit(
            app.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )
        message = _refusal(lambda: label.vote(label.generate("after space was freed"), "b"))
        check("voting works again once there is room", message is None, repr(message))
    finally:
        app.stop()
    stored = {v.prompt for v in harness.stored_votes(app.db_url)}
    kept = all(p in stored for p in before)
    check("votes from before the disk filled are intact", kept, f"{len(stored)} stored")


def scenario_readonly(work: Path) -> None:
    print("\n== the app on a read-only data directory", flush=True)
    model = str(harness.tiny_model(work / "tiny-model"))
    accounts = harness.make_users(work / "users.toml", 1)
    data_dir = work / "ro-data"
    app = harness.serve(model, data_dir, work / "users.toml")  # create the database, one vote
    try:
        _burst_once(app.url, "ann00", accounts["ann00"], [])
    finally:
        app.stop()
    before = harness.stored_votes(app.db_url)
    # A private mount namespace: the data directory is read-only for the app alone.
    port = harness.free_port()
    serve = " ".join(harness.app_command(model, data_dir, port, work / "users.toml"))
    ro = f"mount --bind {data_dir} {data_dir} && mount -o remount,bind,ro {data_dir}"
    cmd = ["unshare", "-m", "sh", "-c", f"{ro} && exec {serve}"]
    ro_app = harness.launch_piped(cmd, port, data_dir)
    try:
        if ro_app.proc.poll() is not None:
            text = ro_app.output()
            last = text.strip().splitlines()[-1] if text.strip() else ""
            code = ro_app.proc.returncode
            ok = code != 0 and "Traceback" not in text and "read-only" in last.lower()
            check("refuses to start with a clear message", ok, f"exit {code}: {last}")
        else:
            from gradio_client import Client

            from bench.label_api import LabelApi

            label = LabelApi(Client(ro_app.url, auth=("ann00", accounts["ann00"]), verbose=False))
            message = _refusal(lambda: label.vote(label.generate("read-only"), "a"))
            check("a vote gets a clear message", _clear(message, ("read-only",)), repr(message))
    finally:
        ro_app.stop()
    after = harness.stored_votes(app.db_url)
    check("the data is untouched", after == before, f"{len(after)} votes")


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


SCENARIOS = {
    "votes": scenario_votes,
    "train": scenario_train,
    "diskfull": scenario_diskfull,
    "readonly": scenario_readonly,
}


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
