"""The training worker: `python -m app.train.worker --run-id N --data-dir DIR`, the database
URL in `$DPO_STUDIO_WORKER_DB` (or `--db URL`; the app uses the environment, so a PostgreSQL
password never shows on the command line, which `ps` shows to every user).

Runs one queued training run in its own process, so a page refresh or an app restart does not
stop it and a crash in training cannot take the app down. It reads the run's resolved config and
the preference pairs from storage, trains with dpo_core, and writes status, a heartbeat and step
metrics back. Between steps it polls the database for a cancel request. On success it registers
the new immutable model version (adapter under <data-dir>/adapters/vN) and makes it active; on an
exception it fails the run with the error text and the previous version stays active.

With more than one device the app starts it under torchrun (`python -m torch.distributed.run
--standalone --nproc_per_node N -m app.train.worker ...`): rank 0 does all of the above and
sends the run's pairs to the other ranks, which only train (`dpo_core.distributed`). A rank
that dies ends the run: torchrun stops the others and exits non-zero, and the app fails the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import adapters_dir
from app.train.kto import training_rows
from app.train.pairs import StoredPairs
from app.train.run_inputs import kl_readout_prompts, sft_examples
from common.cli import setup_logging
from dpo_core import distributed
from dpo_core.distributed import Comm
from storage import runs
from storage.db import open_db
from storage.runs import RunStateError
from storage.selection import VoteSelection

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 2.0
# The environment variable the app passes the database URL in (not argv: `ps` shows argv).
WORKER_DB_ENV = "DPO_STUDIO_WORKER_DB"


def pid_file(data_dir: Path, run_id: int) -> Path:
    """Where a run's worker pid is kept, so an app restart can tell a dead worker at once."""
    return data_dir / "runs" / f"run-{run_id}.pid"


def host_file(data_dir: Path, run_id: int) -> Path:
    """Which machine the pid belongs to (`this_host`): with replicas sharing the data
    directory, only a process on that machine may judge the worker by its pid."""
    return data_dir / "runs" / f"run-{run_id}.host"


def this_host() -> str:
    """`$DPO_STUDIO_HOST_ID`, else the host name and boot id: processes that see one pid
    table (one machine, one boot) share it."""
    explicit = os.environ.get("DPO_STUDIO_HOST_ID")
    if explicit:
        return explicit
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"


def write_pid(data_dir: Path, run_id: int) -> None:
    """Record this worker's pid and host (the host first: a pid is never read without it)."""
    pid_path = pid_file(data_dir, run_id)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    host_file(data_dir, run_id).write_text(this_host())
    pid_path.write_text(str(os.getpid()))


def log_file(data_dir: Path, run_id: int) -> Path:
    return data_dir / "runs" / f"run-{run_id}.log"


class Heartbeat(threading.Thread):
    """Writes the run's heartbeat every few seconds while the process is alive, including the
    long phases without steps (model loading, reference log-probs, saving)."""

    def __init__(self, sm: sessionmaker[Session], run_id: int, interval_s: float) -> None:
        super().__init__(name=f"heartbeat-run-{run_id}", daemon=True)
        self.sm, self.run_id, self.interval_s = sm, run_id, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                with self.sm.begin() as s:
                    runs.heartbeat(s, self.run_id)
            except Exception:  # a missed beat is harmless; the next one retries
                logger.warning("heartbeat for run %d failed", self.run_id, exc_info=True)

    def stop(self) -> None:
        self.stopped.set()


class RunCallbacks:
    """The trainer's hooks: step metrics into the database, a cancel (the run no longer
    `running`) out of it."""

    def __init__(self, sm: sessionmaker[Session], run_id: int) -> None:
        self.sm, self.run_id = sm, run_id
        self.stopped = False
        self.t0 = time.monotonic()

    def on_step(self, metrics: dict[str, float]) -> None:
        """Store one step's metrics (TRL names, plus `total_steps`, `epoch` and `time_s`,
        the seconds since training started: the ETA comes from the time per step)."""
        metrics = dict(metrics, time_s=time.monotonic() - self.t0)
        step = int(metrics.pop("step"))
        with self.sm.begin() as s:
            runs.append_metrics(s, self.run_id, step, metrics)
            self.stopped = runs.heartbeat(s, self.run_id).status != "running"

    def should_stop(self) -> bool:
        if not self.stopped:
            with self.sm.begin() as s:
                self.stopped = runs.get_run(s, self.run_id).status != "running"
        return self.stopped


@dataclass(frozen=True)
class Job:
    """What every rank trains on, as rank 0 read it (the pairs could change meanwhile)."""

    config: dict[str, Any]  # the run's saved config
    pairs: StoredPairs
    out_dir: Path
    kl_prompts: list[str] = field(default_factory=list)  # the KL readout's (run_inputs)
    sft_examples: list[dict[str, Any]] = field(default_factory=list)  # the SFT stage's


def run_job(
    sm: sessionmaker[Session],
    run_id: int,
    data_dir: Path,
    device: str | None = None,
    comm: Comm | None = None,
) -> int:
    """Execute run `run_id` to its end; returns the process exit code (0 unless it failed).
    Under torchrun this is rank 0 of `comm`; `device` is this rank's (default: the run's
    config)."""
    write_pid(data_dir, run_id)
    comm = comm or Comm()
    try:
        with sm.begin() as s:
            config = dict(runs.start_run(s, run_id).config)
    except RunStateError as err:  # cancelled (or declared dead) before the worker got going
        logger.info("run %d not started: %s", run_id, err)
        comm.broadcast(None)
        return 0
    beat = Heartbeat(sm, run_id, HEARTBEAT_INTERVAL_S)
    beat.start()
    try:
        outcome = train_and_register(sm, run_id, config, data_dir, device, comm)
    except Exception as err:
        logger.exception("run %d failed", run_id)
        _fail(sm, run_id, f"{type(err).__name__}: {err}")
        return 1
    finally:
        beat.stop()
    logger.info("run %d %s", run_id, outcome)
    return 0


def _fail(sm: sessionmaker[Session], run_id: int, error: str) -> None:
    try:
        with sm.begin() as s:
            runs.fail_run(s, run_id, error)
    except RunStateError:  # already cancelled or failed by the app: keep that outcome
        pass


def train_and_register(
    sm: sessionmaker[Session],
    run_id: int,
    config: dict[str, Any],
    data_dir: Path,
    device: str | None = None,
    comm: Comm | None = None,
) -> str:
    """Train on the stored pairs; register the new version and make it active, unless no
    evaluation was within the KL ceiling (the guard failed closed: the version is saved, its
    run history says why, and an admin may activate it on purpose). Returns the outcome."""
    comm = comm or Comm()
    job = comm.broadcast(read_job(sm, run_id, config, data_dir))
    result = train_job(job, device, comm, RunCallbacks(sm, run_id))
    if result.cancelled or result.adapter_dir is None:
        return "cancelled"
    path, live = str(result.adapter_dir.resolve()), result.within_kl_ceiling
    try:
        with sm.begin() as s:
            name = runs.finish_run(s, run_id, adapter_path=path, activate=live).name
    except RunStateError:  # cancelled while the adapter was being saved
        _discard(result.adapter_dir)
        return "cancelled"
    if not live:
        return f"succeeded: {name} at {result.adapter_dir}, not made active (above the KL ceiling)"
    return f"succeeded: {name} at {result.adapter_dir}"


def read_job(sm: sessionmaker[Session], run_id: int, config: dict[str, Any], data_dir: Path) -> Job:
    """What the run trains on, read once: its pairs, the prompts its KL readout samples (with
    too few held-out pairs, queue prompts never labeled too), its SFT examples (when the run
    has an SFT stage); the planned number of steps is stored for the progress bar."""
    from dpo_core import sft
    from dpo_core.config import TrainConfig
    from dpo_core.trainer import planned_steps

    train_config = TrainConfig.from_dict(config["train"])
    with sm.begin() as s:
        pairs = training_rows(  # KTO rows for the loss type `kto`, else pairs
            s,
            train_config.loss_type,
            train_config.heldout_fraction,
            train_config.min_heldout_pairs,
            VoteSelection.from_dict(config.get("votes")),  # which votes train, as the run chose
        )
        kl_prompts = kl_readout_prompts(s, pairs, train_config.min_heldout_pairs)
        examples = sft_examples(s, pairs, **config.get("sft", {}))
    examples = examples if train_config.sft_epochs else []
    logger.info(
        "run %d: %d training pairs, %d held out, KL read on %d prompts, %d SFT examples",
        run_id,
        len(pairs.train),
        len(pairs.heldout),
        len(kl_prompts),
        len(examples),
    )
    with sm.begin() as s:  # the planned length, for the progress bar until the first step
        planned = planned_steps(len(pairs.train), train_config)
        planned += sft.planned_steps(len(examples), train_config)
        # and what the KL readout reads on, for the Train tab's note (app/train/status.py)
        step0 = {"total_steps": planned, "kl_readout_prompts": len(kl_prompts)}
        runs.append_metrics(s, run_id, 0, step0)
    out_dir = adapter_dir(sm, adapters_dir(data_dir), config["base_model"], run_id)
    return Job(config, pairs, out_dir, kl_prompts, examples)


def train_job(
    job: Job, device: str | None, comm: Comm, callbacks: RunCallbacks | None = None
) -> Any:
    """Load the model and train this rank's part of the job (`callbacks`: rank 0's)."""
    from dpo_core.config import TrainConfig
    from dpo_core.modeling import load_model
    from dpo_core.trainer import train

    train_config = TrainConfig.from_dict(job.config["train"])
    lm = load_model(
        train_config.model,
        dtype=train_config.dtype,
        load_in_4bit=train_config.load_in_4bit,
        device=device or train_config.device,
    )
    return train(
        lm,
        job.pairs.train,
        train_config,
        job.out_dir,
        heldout=job.pairs.heldout,  # the app's split; empty: no evaluation (must not re-split)
        kl_prompts=job.kl_prompts,
        sft_examples=job.sft_examples or None,
        on_step=callbacks.on_step if callbacks else None,
        should_stop=callbacks.should_stop if callbacks else None,
        comm=comm,
    )


def follow_job(comm: Comm) -> int:
    """A rank other than 0: train on what rank 0 sends (nothing: the run did not start)."""
    job = comm.broadcast(None)
    if job is None:
        return 0
    train_job(job, comm.device if comm.device.startswith("cuda") else None, comm)
    return 0


def run_device(sm: sessionmaker[Session], run_id: int) -> str | None:
    """The device the run's config asks for (read before the group forms: it picks NCCL)."""
    with sm.begin() as s:
        return runs.get_run(s, run_id).config["train"].get("device")


def adapter_dir(sm: sessionmaker[Session], adapters: Path, base_model: str, run_id: int) -> Path:
    """adapters/vN for the version this run will register (one run at a time makes N safe);
    adapters/vN-runM when that directory is taken (another base model, or a crashed run)."""
    with sm.begin() as s:
        names = [v.name for v in runs.list_versions(s, base_model) if v.name != runs.BASE]
    path = adapters / f"v{1 + max((int(n[1:]) for n in names), default=0)}"
    return path if not path.exists() else path.with_name(f"{path.name}-run{run_id}")


def _discard(out_dir: Path) -> None:
    """A cancelled run leaves no version behind."""
    if out_dir.exists():
        shutil.rmtree(out_dir, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.train.worker", description=__doc__)
    p.add_argument(
        "--db",
        default=None,
        help=f"SQLAlchemy URL of the studio database (default ${WORKER_DB_ENV}; prefer the "
        "environment: a password on the command line is visible in `ps`)",
    )
    p.add_argument("--run-id", type=int, required=True, help="the queued training run to execute")
    p.add_argument("--data-dir", type=Path, required=True, help="holds adapters/")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    db_url = args.db or os.environ.get(WORKER_DB_ENV)
    if not db_url:
        parser.error(f"no database: set ${WORKER_DB_ENV} or pass --db")
    setup_logging(args.verbose, server=True)
    sm = open_db(db_url)
    if not distributed.launched():
        return run_job(sm, args.run_id, args.data_dir)
    comm, device = distributed.init_from_env(run_device(sm, args.run_id))
    try:
        if comm.is_main:
            return run_job(sm, args.run_id, args.data_dir, device, comm)
        return follow_job(comm)
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
