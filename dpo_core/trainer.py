"""The DPO training loop: LoRA policy, base-model reference, TRL-named metrics.

`train` is the entry point. The reference is the same model with the adapter disabled (after an
optional SFT stage, `dpo_core.sft`: the SFT'd policy, adapter on); its log-probs are computed
once, before the first DPO step, and reused every epoch. The KL readout and the guard always
measure against the base model. Chosen and rejected go through the model in one forward pass
per micro-batch (see `dpo_core.data`).
The whole forward/backward runs in the base model's dtype (bf16 where fast); only the
optimiser keeps fp32 copies of the LoRA weights (`dpo_core.optim.MasterWeights`).

The loop's parts live in their own modules: datasets and the step schedule
(`dpo_core.batches`), the objective over a batch (`dpo_core.objective`), TRL's metrics
(`dpo_core.metrics`), evaluation points and the guard they feed (`dpo_core.evaluation`), and the
policy's set-up, checkpoints and saving (`dpo_core.policy`). Their names used elsewhere are
re-exported here.

Under `torchrun` / `accelerate launch` (`dpo_core.distributed`) each rank runs its share of
every step and of the reference pass; the fp32 master gradients are summed once per step, the
metrics are computed over all ranks' pairs, rank 0 alone evaluates, calls `on_step` and saves,
and every rank follows its guard and stop decisions. The process group is `train`'s `comm`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpo_core import sft
from dpo_core.batches import (
    Dataset,
    forward_chunks,
    iterate_steps,
    make_batch,
    planned_steps,
    prepare_dataset,
    prepare_datasets,
    split_heldout,
    step_share,
    untrained_prompts,
)
from dpo_core.config import TrainConfig
from dpo_core.distributed import Comm
from dpo_core.evaluation import (
    eval_point,
    evaluate_point,
    is_eval_step,
    kl_readout,
    make_guard,
    spread,
)
from dpo_core.guard import Guard, KLGuard, few_pairs_warning
from dpo_core.guard import summary as guard_summary
from dpo_core.hooks import EvalHook, Hooks, StepCallback, StopCheck, TrainingCancelled
from dpo_core.kl import Reference
from dpo_core.metrics import REWARD_METRICS, final_metrics, reward_metrics, sft_metrics
from dpo_core.modeling import LoadedModel
from dpo_core.objective import batch_losses, fill_reference_logps, kto_class_weights
from dpo_core.policy import (
    Policy,
    is_peft,
    prepare_policy,
    release_policy,
    resolved_config,
    restore,
    save_result,
    snapshot,
)

# Names other code imports from here (app/, bench/, tests/): this module is their facade.
__all__ = [
    "REWARD_METRICS",
    "Dataset",
    "EvalHook",
    "Policy",
    "StepCallback",
    "StopCheck",
    "TrainResult",
    "TrainingCancelled",
    "fill_reference_logps",
    "iterate_steps",
    "kl_readout",
    "make_guard",
    "planned_steps",
    "prepare_dataset",
    "prepare_datasets",
    "prepare_policy",
    "release_policy",
    "split_heldout",
    "spread",
    "step_share",
    "train",
    "train_step",
    "untrained_prompts",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced. `adapter_dir` is None when the run was cancelled."""

    adapter_dir: Path | None
    metrics: dict[str, float]  # final: last-epoch train means, last evaluation, totals
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per step
    cancelled: bool = False
    config: TrainConfig | None = None  # as run (model fields describe the loaded model)
    stop_reason: str = ""  # plain words: how the run ended, which checkpoint was kept, why
    stopped_early: bool = False
    warnings: list[str] = field(default_factory=list)
    within_kl_ceiling: bool = True  # False: no evaluation was; the version must not go live


def train(
    lm: LoadedModel,
    pairs: list[dict[str, Any]],
    config: TrainConfig,
    out_dir: Path,
    *,
    heldout: list[dict[str, Any]] | None = None,
    kl_prompts: list[str] | None = None,
    sft_examples: list[dict[str, Any]] | None = None,
    on_step: StepCallback | None = None,
    should_stop: StopCheck | None = None,
    on_eval: EvalHook | None = None,
    comm: Comm | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `pairs` (KTO: unpaired rows too) and save it atomically to
    `out_dir`.

    `heldout` pairs are evaluated at evaluation points; without them, `config.heldout_fraction`
    of the prompts are held out when that leaves `config.min_heldout_pairs`. The KL readout
    samples the held-out pairs' prompts, or `kl_prompts` when given (those a training pair uses
    are dropped). With enough held-out pairs the guard (`dpo_core.guard`) keeps the best
    checkpoint within the KL ceiling and may stop early; with too few, a KL-only guard reads KL
    on `kl_prompts` (or the few held-out prompts) and keeps the latest checkpoint within it.
    `TrainResult.stop_reason` says how the run ended, which guard ran on what, or why none did.

    `sft_examples` (`{prompt, completion}`) with `config.sft_epochs` > 0 train a supervised
    stage first (`dpo_core.sft`), steps 1..k reporting `sft/...` metrics, DPO's k+1..; DPO's
    reference is then the SFT'd policy, while the KL readout and the guard measure the base.

    `on_step` gets each step's metrics (TRL names plus `step`, `total_steps`, `epoch`, and
    `eval/...` incl. `eval/kl` at evaluation points). `should_stop` is polled between optimiser
    steps; when it returns True the run ends, nothing is saved and the result is marked
    cancelled. `on_eval(model)` runs at each evaluation point with the policy (adapter on,
    eval mode) and returns more `eval/...` metrics. `lm.model` must be the base model; it is
    left as it was (the adapter is removed at the end).

    `comm` is the process group (`dpo_core.distributed.init_from_env` returns it; None: one
    process, or the group this process joined, for callers that do not pass it yet). Under
    torchrun every rank calls `train` with the same pairs and config; rank 0 gets `on_step` and
    `on_eval` calls and writes the adapter, the others return without `adapter_dir` once it is.
    """
    out_dir = check_start(lm, Path(out_dir))
    comm = comm if comm is not None else Comm()  # one process
    config = resolved_config(config, lm)
    sft_set = prepare_sft(lm.tokenizer, sft_examples, config)
    train_set, eval_set = prepare_datasets(lm, pairs, heldout, kl_prompts, config)
    config = kto_class_weights(config, train_set.pairs)
    policy = seeded_policy(lm, config, len(train_set.pairs), comm)
    hooks = Hooks(on_step, should_stop, on_eval, comm)
    try:
        return _run(Run(lm, policy, train_set, eval_set, config, hooks, sft_set), out_dir)
    except TrainingCancelled:
        logger.info("training cancelled; nothing saved")
        return TrainResult(adapter_dir=None, metrics={}, cancelled=True, config=config)
    finally:
        release_policy(lm, policy.model, config)


def check_start(lm: LoadedModel, out_dir: Path) -> Path:
    """`out_dir` when a run may write there and start from `lm`; else why not."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; adapter versions are immutable")
    if is_peft(lm.model):
        raise ValueError("pass the base model; to continue an adapter set config.init_adapter")
    return out_dir


def seeded_policy(lm: LoadedModel, config: TrainConfig, num_pairs: int, comm: Comm) -> Policy:
    """The policy with the same LoRA initialisation on every rank; then each rank is seeded
    apart, for its own dropout masks."""
    torch.manual_seed(config.seed)
    policy = prepare_policy(lm, config, planned_steps(num_pairs, config))
    if comm.active:
        torch.manual_seed(config.seed + comm.rank)
    return policy


def prepare_sft(
    tokenizer: Any, examples: list[dict[str, Any]] | None, config: TrainConfig
) -> sft.SFTSet | None:
    """The SFT stage's examples, tokenized (None: no stage); ValueError when the examples and
    `config.sft_epochs` disagree."""
    if config.sft_epochs == 0:
        if examples:
            raise ValueError(
                f"{len(examples)} SFT examples but sft_epochs is 0: set sft_epochs (e.g. 2) to "
                "train the SFT stage, or leave the examples out"
            )
        return None
    if not examples:
        raise ValueError(
            f"sft_epochs is {config.sft_epochs} but there are no SFT examples: give some "
            "(the CLI: --sft FILE.jsonl of prompt/completion rows) or set sft_epochs to 0"
        )
    return sft.tokenize_examples(tokenizer, sft.check_examples(examples), config)


@dataclass
class Run:
    """What one training run works with, once its datasets and policy are ready."""

    lm: LoadedModel
    policy: Policy
    train_set: Dataset
    eval_set: Dataset | None
    config: TrainConfig
    hooks: Hooks
    sft_set: sft.SFTSet | None = None
    sft_weights: list[Tensor] | None = None  # the policy after its SFT stage: DPO's reference
    guard: Guard | KLGuard | None = None
    why_off: str | None = None  # why there is no guard

    @property
    def total_steps(self) -> int:
        """DPO steps (numbered after the SFT stage's)."""
        return planned_steps(len(self.train_set.pairs), self.config)

    @property
    def sft_steps(self) -> int:
        return sft.planned_steps(len(self.sft_set.examples), self.config) if self.sft_set else 0

    @property
    def all_steps(self) -> int:
        return self.sft_steps + self.total_steps

    @property
    def comm(self) -> Comm:
        return self.hooks.comm


@dataclass
class Progress:
    """What the steps so far produced."""

    history: list[dict[str, float]] = field(default_factory=list)  # one dict per DPO step
    sft_history: list[dict[str, float]] = field(default_factory=list)  # per SFT step
    step: int = 0  # the last step run, counting the SFT stage's
    stop: str | None = None  # why the guard stopped the run (None: it did not)
    best_weights: list[Tensor] | None = None  # the guard's best checkpoint so far


def _run(run: Run, out_dir: Path) -> TrainResult:
    t0 = time.perf_counter()
    progress = Progress()
    run_sft(run, progress)
    fill_references(run)
    run.guard, run.why_off = make_guard(run.eval_set, run.config)
    warnings = [w for w in (few_pairs_warning(len(run.train_set.pairs)),) if w]
    for warning in warnings if run.comm.is_main else []:
        logger.warning(warning)
    config = run.config
    for step in iterate_steps(run.train_set.costs, config, epochs=config.epochs, seed=config.seed):
        if run.hooks.stop():
            raise TrainingCancelled
        run_step(run, progress, step.number, step.epoch, step.micro_batches)
        if progress.stop:
            break
    if run.hooks.stop():
        raise TrainingCancelled
    if not run.comm.is_main:  # rank 0 saves; the others wait until the adapter is written
        run.comm.barrier()
        return TrainResult(adapter_dir=None, metrics={}, config=run.config)
    result = finish(run, progress, out_dir, time.perf_counter() - t0)
    result.warnings = warnings
    run.comm.barrier()
    return result


def run_sft(run: Run, progress: Progress) -> None:
    """The SFT stage (when there is one): its own optimiser on the same LoRA weights; each
    step goes to `on_step` as steps 1..k of the run."""
    if run.sft_set is None:
        return
    model, masters, comm, config = run.policy.model, run.policy.masters, run.comm, run.config
    opt = sft.make_sft_optimizer(masters, config, run.sft_steps)
    for step, epoch, micro_batches in sft.stage_steps(run.sft_set, config):
        if run.hooks.stop():
            raise TrainingCancelled
        metrics = sft.sft_step(
            model, masters, opt, micro_batches, run.sft_set, run.lm, config, comm
        )
        metrics.update({"sft/epoch": epoch, "step": step, "total_steps": run.all_steps})
        progress.sft_history.append(metrics)
        progress.step = step
        if comm.is_main:
            logger.info("SFT step %d/%d loss %.4f", step, run.sft_steps, metrics["sft/loss"])
        if run.hooks.on_step is not None and comm.is_main:
            run.hooks.on_step(dict(metrics))
    run.sft_weights = snapshot(run.policy)


def kl_reference(run: Run) -> Reference | None:
    """After an SFT stage, the KL readout's reference is the SFT'd policy (DPO's reference):
    its weights are put in place for the reference pass, the current ones back after it.
    None: the base (adapter disabled)."""
    if run.sft_weights is None:
        return None
    sft_weights = run.sft_weights

    @contextmanager
    def sft_policy() -> Iterator[None]:
        current = snapshot(run.policy)
        restore(run.policy, sft_weights)
        try:
            yield
        finally:
            restore(run.policy, current)

    return sft_policy


def fill_references(run: Run) -> None:
    """Reference log-probs of the training and held-out pairs: the base model's, or after an
    SFT stage the SFT'd policy's (adapter on, eval mode: no dropout in a reference)."""
    after_sft = run.sft_set is not None
    model = run.policy.model
    if after_sft:
        model.eval()
    for dataset in (run.train_set, run.eval_set):
        if dataset is not None and dataset.pairs:
            fill_reference_logps(
                model, dataset, run.lm, run.config, run.hooks.stop, run.comm, adapter_on=after_sft
            )
    model.train()


def run_step(
    run: Run, progress: Progress, step: int, epoch: float, micro_batches: list[list[int]]
) -> None:
    """One optimiser step (`step` counts DPO steps; it is reported after the SFT stage's);
    its evaluation and the guard's decision when one is due; the caller's `on_step`."""
    lm, config, comm = run.lm, run.config, run.comm
    n_pairs = sum(len(m) for m in micro_batches)
    mine = step_share(micro_batches, comm)
    metrics = train_step(run.policy, mine, run.train_set, lm, config, comm, n_pairs)
    at = run.sft_steps + step
    metrics.update(step=at, total_steps=run.all_steps, epoch=epoch)
    if run.eval_set is not None and is_eval_step(step, run.total_steps, run.train_set, config):
        stop = None
        if comm.is_main:  # rank 0 evaluates and decides; the others follow its decision
            model, on_eval, ref = run.policy.model, run.hooks.on_eval, kl_reference(run)
            metrics.update(evaluate_point(model, run.eval_set, lm, config, on_eval, ref))
            stop = observe(run, progress, at, metrics)
        progress.stop = comm.broadcast(stop)
    progress.history.append(metrics)
    progress.step = at
    if comm.is_main:
        logger.info("step %d/%d loss %.4f", at, run.all_steps, metrics["loss"])
    if run.hooks.on_step is not None and comm.is_main:
        run.hooks.on_step(dict(metrics))


def observe(run: Run, progress: Progress, step: int, metrics: dict[str, float]) -> str | None:
    """The guard's decision at an evaluation point: keep a checkpoint of the best weights so
    far; why to stop now (None: go on)."""
    if run.guard is None:
        return None
    decision = run.guard.observe(eval_point(step, metrics))
    if decision.keep:
        progress.best_weights = snapshot(run.policy)
    return decision.stop


def finish(run: Run, progress: Progress, out_dir: Path, seconds: float) -> TrainResult:
    """Go back to the guard's best checkpoint (when it is not the last step), say in words how
    the run ended, and save the adapter with its config and metrics."""
    guard, step = run.guard, progress.step
    kept = guard.kept.step if guard is not None and guard.kept is not None else step
    if kept != step:
        assert progress.best_weights is not None
        restore(run.policy, progress.best_weights)
    reason = guard_summary(guard, progress.stop, step, run.all_steps, run.why_off)
    logger.info(reason)
    final = final_metrics(progress.history, len(run.train_set.pairs), seconds, kept)
    if progress.sft_history:
        final.update(sft_metrics(progress.sft_history))
    run.policy.masters.restore_fp32()
    within = guard is None or guard.within_ceiling  # False: saved, never made active by itself
    extra = {"stop_reason": reason, "within_kl_ceiling": within}
    adapter = save_result(run.policy.model, out_dir, run.config, final | extra)
    return TrainResult(
        adapter_dir=adapter,
        metrics=final,
        history=progress.sft_history + progress.history,
        config=run.config,
        stop_reason=reason,
        stopped_early=progress.stop is not None,
        within_kl_ceiling=within,
    )


def train_step(
    policy: Policy,
    micro_batches: list[list[int]],
    dataset: Dataset,
    lm: LoadedModel,
    config: TrainConfig,
    comm: Comm | None = None,
    n_pairs: int | None = None,
) -> dict[str, float]:
    """One optimiser step over `micro_batches` (pair indices). The loss is the mean over all
    pairs of the step (`n_pairs`, on all ranks), however they are split into micro-batches
    and ranks: each rank's gradient is its pairs' share of that mean, so their sum is the
    step's gradient."""
    t0 = time.perf_counter()
    comm = comm or Comm()
    n_pairs = n_pairs or sum(len(m) for m in micro_batches)
    parts = []
    chunks = [c for indices in micro_batches for c in forward_chunks(dataset, indices, config)]
    for indices in chunks:
        batch = make_batch(dataset, indices, lm, config)
        losses, part = batch_losses(policy.model, batch, dataset, config)
        (losses.sum() / n_pairs).backward()
        parts.append(part)
    policy.masters.grads_to_masters()
    comm.sum_grads(policy.masters.masters)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.masters.masters, config.max_grad_norm)
    learning_rate = policy.scheduler.get_last_lr()[0]
    policy.optimizer.step()
    policy.scheduler.step()
    policy.optimizer.zero_grad(set_to_none=True)
    policy.masters.masters_to_params()
    metrics = reward_metrics(parts, comm=comm)
    metrics.update(
        learning_rate=learning_rate,
        grad_norm=grad_norm.item(),
        pairs_per_second=n_pairs / (time.perf_counter() - t0),
    )
    return metrics
