"""The DPO training loop: LoRA policy, base-model reference, TRL-named metrics.

`train` is the entry point. The reference is the same model with the adapter disabled (after an
optional SFT stage, `dpo_core.sft`: the SFT'd policy, adapter on); its log-probs are computed
once, before the first DPO step, and reused every epoch. The KL readout and the guard always
measure against the base model. Chosen and rejected go through the model in one forward pass
per micro-batch (see `dpo_core.data`).
The whole forward/backward runs in the base model's dtype (bf16 where fast); only the
optimiser keeps fp32 copies of the LoRA weights (`dpo_core.optim.MasterWeights`).

Under `torchrun` / `accelerate launch` (`dpo_core.distributed`) each rank runs its share of
every step and of the reference pass; the fp32 master gradients are summed once per step, the
metrics are computed over all ranks' pairs, rank 0 alone evaluates, calls `on_step` and saves,
and every rank follows its guard and stop decisions.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpo_core import data, sft
from dpo_core.config import TrainConfig
from dpo_core.distributed import Comm, current
from dpo_core.guard import EvalPoint, Guard, KLGuard, few_pairs_warning
from dpo_core.guard import summary as guard_summary
from dpo_core.heldout import split_pairs
from dpo_core.kl import kl_from_completions, prompt_ids, sample_from_ids
from dpo_core.logprobs import completion_logps
from dpo_core.losses import (
    UNPAIRED_LOSS_TYPES,
    kto_balanced_weights,
    kto_loss,
    kto_weight_advice,
    preference_loss,
)
from dpo_core.modeling import DTYPES, LoadedModel, attach_lora, load_adapter, save_adapter
from dpo_core.optim import MasterWeights, make_optimizer

logger = logging.getLogger(__name__)

StepCallback = Callable[[dict[str, float]], None]
StopCheck = Callable[[], bool]
EvalHook = Callable[[Any], dict[str, float]]
REWARD_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class TrainingCancelled(Exception):
    """Raised inside the loop when `should_stop()` says so; `train` turns it into a result."""


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


@dataclass
class Dataset:
    """Tokenized pairs plus their reference log-probs (filled once, before training).

    Under KTO each entry is an example: `pairs[i].desirable` its label, its "chosen" the
    answer and its "rejected" the KL completion (`data.normalise_kto`), whose reference
    log-probs fill `reference_rejected_logps`."""

    pairs: list[data.TokenizedPair]
    costs: list[int]  # tokens per pair in the batch layout, for length grouping
    reference_chosen_logps: Tensor | None = None  # (n,)
    reference_rejected_logps: Tensor | None = None
    readout_prompts: list[list[int]] | None = None  # the KL readout's prompts (None: the pairs')


@dataclass
class Hooks:
    """The caller's callbacks (see `train`)."""

    on_step: StepCallback | None = None
    should_stop: StopCheck | None = None
    on_eval: EvalHook | None = None
    comm: Comm = field(default_factory=Comm)

    def stop(self) -> bool:
        """Whether to stop now: asked on any rank, agreed by all (a collective under torchrun:
        every rank calls it at the same points)."""
        return self.comm.any(self.should_stop is not None and self.should_stop())


@dataclass
class Policy:
    """The trainable model and what updates it."""

    model: Any  # peft.PeftModel
    masters: MasterWeights
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


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

    Under torchrun (`dpo_core.distributed.init_from_env` called first) every rank calls `train`
    with the same pairs and config; rank 0 gets `on_step` and `on_eval` calls and writes the
    adapter, the others return a result without `adapter_dir` once it is written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; adapter versions are immutable")
    if _is_peft(lm.model):
        raise ValueError("pass the base model; to continue an adapter set config.init_adapter")
    config = resolved_config(config, lm)
    sft_set = prepare_sft(lm.tokenizer, sft_examples, config)
    train_set, eval_set = prepare_datasets(lm, pairs, heldout, kl_prompts, config)
    config = kto_class_weights(config, train_set.pairs)
    comm = current()
    torch.manual_seed(config.seed)  # the same LoRA initialisation on every rank
    policy = prepare_policy(lm, config, planned_steps(len(train_set.pairs), config))
    if comm.active:  # each rank its own dropout masks
        torch.manual_seed(config.seed + comm.rank)
    hooks = Hooks(on_step, should_stop, on_eval, comm)
    try:
        return _run(Run(lm, policy, train_set, eval_set, config, hooks, sft_set), out_dir)
    except TrainingCancelled:
        logger.info("training cancelled; nothing saved")
        return TrainResult(adapter_dir=None, metrics={}, cancelled=True, config=config)
    finally:
        release_policy(lm, policy.model, config)


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
    for step, epoch, micro_batches in iterate_steps(run.train_set, run.config):
        if run.hooks.stop():
            raise TrainingCancelled
        run_step(run, progress, step, epoch, micro_batches)
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
    model, masters, comm = run.policy.model, run.policy.masters, run.comm
    opt = sft.make_sft_optimizer(masters, run.config, run.sft_steps)
    for step, epoch, micro_batches in sft.iterate_steps(run.sft_set, run.config):
        if run.hooks.stop():
            raise TrainingCancelled
        metrics = sft.sft_step(
            model, masters, opt, micro_batches, run.sft_set, run.lm, run.config, comm
        )
        metrics.update({"sft/epoch": epoch, "step": step, "total_steps": run.all_steps})
        progress.sft_history.append(metrics)
        progress.step = step
        if comm.is_main:
            logger.info("SFT step %d/%d loss %.4f", step, run.sft_steps, metrics["sft/loss"])
        if run.hooks.on_step is not None and comm.is_main:
            run.hooks.on_step(dict(metrics))


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
            model, on_eval = run.policy.model, run.hooks.on_eval
            metrics.update(evaluate_point(model, run.eval_set, lm, config, on_eval))
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


def step_share(micro_batches: list[list[int]], comm: Comm) -> list[list[int]]:
    """This rank's micro-batches of a step: whole micro-batches when there is one per rank
    (the forward passes of the one-process run), else its part of the step's pairs, which are
    length-sorted, in one micro-batch (at most `batch_size` pairs then)."""
    if not comm.active:
        return micro_batches
    if len(micro_batches) >= comm.world:
        return comm.share(micro_batches)
    pairs = comm.share([i for m in micro_batches for i in m])
    return [pairs] if pairs else []


def finish(run: Run, progress: Progress, out_dir: Path, seconds: float) -> TrainResult:
    """Go back to the guard's best checkpoint (when it is not the last step), say in words how
    the run ended, and save the adapter with its config and metrics."""
    guard, step = run.guard, progress.step
    kept = guard.best.step if guard is not None and guard.best is not None else step
    if kept != step:
        assert progress.best_weights is not None
        restore(run.policy, progress.best_weights)
    reason = guard_summary(guard, progress.stop, step, run.all_steps, run.why_off)
    logger.info(reason)
    final = final_metrics(progress.history, len(run.train_set.pairs), seconds, kept)
    if progress.sft_history:
        final.update(sft_metrics(progress.sft_history))
    run.policy.masters.restore_fp32()
    adapter = save_result(run.policy.model, out_dir, run.config, final | {"stop_reason": reason})
    return TrainResult(
        adapter_dir=adapter,
        metrics=final,
        history=progress.sft_history + progress.history,
        config=run.config,
        stop_reason=reason,
        stopped_early=progress.stop is not None,
    )


def sft_metrics(sft_history: list[dict[str, float]]) -> dict[str, float]:
    """The SFT stage in the final metrics: its last epoch's mean loss and its step count."""
    last_epoch = math.ceil(sft_history[-1]["sft/epoch"]) - 1
    steps = [h for h in sft_history if h["sft/epoch"] > last_epoch]
    return {
        "sft/loss": sum(h["sft/loss"] for h in steps) / len(steps),
        "sft_steps": len(sft_history),
    }


def prepare_datasets(
    lm: LoadedModel,
    pairs: list[dict[str, Any]],
    heldout: list[dict[str, Any]] | None,
    kl_prompts: list[str] | None,
    config: TrainConfig,
) -> tuple[Dataset, Dataset | None]:
    """The training set and the held-out set (given, or split off the pairs; None: none),
    the KL readout's own prompts attached to the latter. With no held-out pairs but prompts
    to read KL on (and `config.kl_prompts` > 0) the held-out set is those prompts alone."""
    if heldout is None:
        pairs, heldout = split_heldout(pairs, config)
    train_set = prepare_dataset(lm.tokenizer, pairs, config, "training")
    eval_set = heldout_dataset(lm.tokenizer, heldout, config)
    readout = untrained_prompts(kl_prompts or [], pairs)
    if readout and (eval_set is not None or config.kl_prompts > 0):
        eval_set = eval_set or Dataset(pairs=[], costs=[])
        eval_set.readout_prompts = [prompt_ids(lm.tokenizer, p) for p in readout]
    return train_set, eval_set


def untrained_prompts(prompts: list[str], pairs: list[dict[str, Any]]) -> list[str]:
    """`prompts` less those a training pair uses (the KL readout is on prompts not trained
    on), each once."""
    trained = {p.get("prompt") for p in pairs if isinstance(p, dict)}
    kept = [p for p in dict.fromkeys(prompts) if p not in trained]
    if len(kept) < len(set(prompts)):
        left_out = len(set(prompts)) - len(kept)
        logger.info("KL readout: left out %d prompts that training pairs use", left_out)
    return kept


def split_heldout(
    pairs: list[dict[str, Any]], config: TrainConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Hold out `config.heldout_fraction` of the prompts by `dpo_core.heldout.split_pairs`
    when that leaves at least `config.min_heldout_pairs`; else keep every pair for training."""
    kept, held = split_pairs(pairs, config.heldout_fraction, config.min_heldout_pairs)
    if not held:
        return pairs, None
    logger.info("holding out %d of %d pairs for evaluation", len(held), len(pairs))
    return kept, held


def make_guard(
    eval_set: Dataset | None, config: TrainConfig
) -> tuple[Guard | KLGuard | None, str | None]:
    """The full guard with enough held-out pairs; the KL-only guard with fewer, when there
    are prompts to read KL on; else None and why there is no guard."""
    if not config.early_stopping:
        return None, "early_stopping is off"
    n = len(eval_set.pairs) if eval_set is not None else 0
    kl = f"KL on {readout_words(eval_set)}" if config.kl_prompts else "no KL readout"
    if n >= config.min_heldout_pairs:
        reads = f"Guard: held-out reward accuracy on {n} pairs and {kl}"
        return Guard(config.kl_ceiling, config.patience, reads), None
    too_few = f"{n} held-out pairs, fewer than the {config.min_heldout_pairs} it needs"
    if config.kl_prompts == 0:
        return None, f"{too_few}, and the KL readout is off (kl_prompts = 0)"
    if readout_prompt_count(eval_set) == 0:
        return None, (
            f"{too_few} (label more pairs or raise the held-out fraction), and no prompts to "
            "read KL on: import a few prompts that are not labeled"
        )
    reads = (
        f"KL-only guard ({n} held-out pairs, fewer than the {config.min_heldout_pairs} the "
        f"accuracy guard needs): {kl}, ceiling {config.kl_ceiling:g} nats"
    )
    return KLGuard(config.kl_ceiling, config.patience, reads), None


def readout_prompt_count(eval_set: Dataset | None) -> int:
    """Distinct prompts the KL readout samples from."""
    if eval_set is None:
        return 0
    own = eval_set.readout_prompts or [p.prompt_ids for p in eval_set.pairs]
    return len({tuple(p) for p in own})


def readout_words(eval_set: Dataset | None) -> str:
    """What the KL readout samples from, in words: "5 prompts not trained on"."""
    n = readout_prompt_count(eval_set)
    if eval_set is not None and eval_set.readout_prompts:
        return f"{n} prompt{'s' if n != 1 else ''} not trained on"
    return f"the held-out pairs' {n} prompt{'s' if n != 1 else ''}"


def eval_point(step: int, metrics: dict[str, float]) -> EvalPoint:
    return EvalPoint(
        step=step,
        accuracy=metrics.get("eval/rewards/accuracies"),
        loss=metrics.get("eval/loss"),
        kl=metrics.get("eval/kl"),
    )


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def resolved_config(config: TrainConfig, lm: LoadedModel) -> TrainConfig:
    """The config as run: the model fields describe the model actually loaded."""
    dtype = {v: k for k, v in DTYPES.items()}[lm.dtype]
    return replace(
        config, model=lm.source, dtype=dtype, load_in_4bit=lm.load_in_4bit, device=str(lm.device)
    )


def prepare_dataset(
    tokenizer: Any, pairs: list[dict[str, Any]], config: TrainConfig, name: str
) -> Dataset:
    """Normalise and tokenize pairs (KTO: examples, `data.normalise_kto`); raise ValueError
    when none is usable."""
    unpaired = config.loss_type in UNPAIRED_LOSS_TYPES
    normalise = data.normalise_kto if unpaired else data.normalise_pairs
    normalised = normalise(pairs, source=f"{name} {'examples' if unpaired else 'pairs'}")
    tokenized = data.tokenize_pairs(
        tokenizer, normalised, config.max_length, config.max_prompt_length
    )
    if not tokenized.pairs:
        reasons = ", ".join(f"{n} {why}" for why, n in tokenized.dropped.items())
        raise ValueError(f"no usable {name} pairs: all {len(pairs)} were dropped ({reasons})")
    costs = [p.cost(config.share_prompt) for p in tokenized.pairs]
    return Dataset(tokenized.pairs, costs)


def kto_class_weights(config: TrainConfig, examples: list[data.TokenizedPair]) -> TrainConfig:
    """KTO's class weights as run: with `kto_balance`, the rarer class weighed up
    (`losses.kto_balanced_weights`), said in the log; without, the weights as given and TRL's
    advice when the classes are unbalanced. Other losses: the config as it is."""
    if config.loss_type not in UNPAIRED_LOSS_TYPES:
        return config
    n_desirable = sum(bool(p.desirable) for p in examples)
    n_undesirable = len(examples) - n_desirable
    wd, wu = config.kto_desirable_weight, config.kto_undesirable_weight
    if not config.kto_balance:
        advice = kto_weight_advice(n_desirable, n_undesirable, wd, wu)
        if advice:
            logger.warning(advice)
        return config
    weights = kto_balanced_weights(n_desirable, n_undesirable, wd, wu)
    logger.info(
        "KTO: %d desirable and %d undesirable answers, weighed %.3g and %.3g (kto_balance)",
        *(n_desirable, n_undesirable, weights.desirable, weights.undesirable),
    )
    return replace(
        config, kto_desirable_weight=weights.desirable, kto_undesirable_weight=weights.undesirable
    )


def heldout_dataset(
    tokenizer: Any, heldout: list[dict[str, Any]] | None, config: TrainConfig
) -> Dataset | None:
    """Held-out pairs to evaluate, or None. Malformed pairs are an error; pairs that are all
    dropped by truncation only cost the evaluation (a warning), not the run."""
    if not heldout:
        return None
    try:
        return prepare_dataset(tokenizer, heldout, config, "held-out")
    except data.PairError:
        raise
    except ValueError as err:
        logger.warning("%s; training without evaluation", err)
        return None


def prepare_policy(lm: LoadedModel, config: TrainConfig, total_steps: int) -> Policy:
    """A trainable LoRA adapter (new, or `config.init_adapter`) on the base model, its LoRA
    weights in the compute dtype, and AdamW on their fp32 masters."""
    if config.init_adapter:
        model = load_adapter(lm.model, config.init_adapter, is_trainable=True)
    else:
        model = attach_lora(lm.model, config.lora_settings())
    params = [p for p in model.parameters() if p.requires_grad]
    if lm.dtype == torch.bfloat16:  # fp16 keeps fp32 LoRA weights: no loss scaling here
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    masters = MasterWeights(params)
    optimizer, scheduler = make_optimizer(
        masters,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        total_steps=total_steps,
        warmup_ratio=config.warmup_ratio,
        schedule=config.lr_scheduler,
    )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return Policy(model, masters, optimizer, scheduler)


def release_policy(lm: LoadedModel, model: Any, config: TrainConfig) -> None:
    """Remove the adapter layers so `lm.model` is the plain base model again."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    lm.model = model.unload()
    lm.model.eval()


def make_batch(
    dataset: Dataset, indices: list[int], lm: LoadedModel, config: TrainConfig
) -> data.PairBatch:
    pairs = [dataset.pairs[i] for i in indices]
    collate = data.collate_shared_prompt if config.share_prompt else data.collate
    return collate(pairs, indices, lm.tokenizer.pad_token_id).to(lm.device)


def forward_chunks(dataset: Dataset, indices: list[int], config: TrainConfig) -> list[list[int]]:
    """A micro-batch split so that no forward pass exceeds `max_forward_tokens`."""
    rows_per_pair = 1 if config.share_prompt else 2
    return data.split_by_tokens(indices, dataset.costs, rows_per_pair, config.max_forward_tokens)


def eval_batches(dataset: Dataset, config: TrainConfig) -> list[list[int]]:
    """Pair indices in length-grouped forward passes, in a fixed order."""
    steps = data.step_batches(
        dataset.costs, config.batch_size, config.batch_size, seed=0, shuffle=False
    )
    return [chunk for step in steps for chunk in forward_chunks(dataset, step[0], config)]


@torch.no_grad()
def fill_reference_logps(
    model: Any,
    dataset: Dataset,
    lm: LoadedModel,
    config: TrainConfig,
    stop: StopCheck,
    comm: Comm | None = None,
    *,
    adapter_on: bool = False,
) -> None:
    """Reference (= base, adapter disabled; `adapter_on`: the policy as it is, after an SFT
    stage) log-probs of every pair, computed once. Under
    torchrun each rank computes its share of the forward passes; the sum fills every rank's
    table (`stop` is called as often on every rank: it may be a collective)."""
    comm = comm or Comm()
    n = len(dataset.pairs)
    chosen, rejected = torch.zeros(n), torch.zeros(n)
    batches = eval_batches(dataset, config)
    mine, slots = comm.share(batches), len(Comm(0, comm.world).share(batches))
    with nullcontext() if adapter_on else model.disable_adapter():
        for slot in range(slots):
            if stop():
                raise TrainingCancelled
            if slot < len(mine):
                indices = mine[slot]
                logps, _ = completion_logps(model, make_batch(dataset, indices, lm, config))
                chosen[indices], rejected[indices] = logps.cpu().float().chunk(2)
    comm.sum_(chosen), comm.sum_(rejected)
    dataset.reference_chosen_logps, dataset.reference_rejected_logps = chosen, rejected


def batch_losses(
    model: Any, batch: data.PairBatch, dataset: Dataset, config: TrainConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair (or, for KTO, per-example) losses (B,), each times its `weight`, and the
    per-pair tensors the metrics are built from. With every weight 1 (the default) the losses
    are exactly the unweighted ones; a step's loss is sum(weight_i * loss_i) / n (n pairs)."""
    logps, lengths = completion_logps(model, batch)
    assert dataset.reference_chosen_logps is not None
    assert dataset.reference_rejected_logps is not None
    idx = torch.tensor(batch.indices)
    reference = (
        dataset.reference_chosen_logps[idx].to(logps.device),
        dataset.reference_rejected_logps[idx].to(logps.device),
    )
    if config.loss_type in UNPAIRED_LOSS_TYPES:
        losses, parts = _kto_losses(logps, reference, dataset, batch.indices, config)
    else:
        losses, parts = _pair_losses(logps, lengths, reference, config)
    weights = [dataset.pairs[i].weight for i in batch.indices]
    losses = losses * torch.tensor(weights, dtype=losses.dtype, device=losses.device)
    parts["loss"] = losses.detach()
    return losses, parts


def _pair_losses(
    logps: Tensor, lengths: Tensor, reference: tuple[Tensor, Tensor], config: TrainConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        chosen_logps,
        rejected_logps,
        *reference,
        loss_type=config.loss_type,
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        simpo_gamma=config.simpo_gamma,
    )
    if config.rpo_alpha:  # RPO: also raise the chosen answer's likelihood, per token
        nll = -chosen_logps / chosen_lengths.clamp(min=1)
        losses = losses + config.rpo_alpha * nll
    parts = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
    return losses, parts


def _kto_losses(
    logps: Tensor,
    reference: tuple[Tensor, Tensor],
    dataset: Dataset,
    indices: list[int],
    config: TrainConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO on a batch of examples laid out as pairs (answer as "chosen", KL completion as
    "rejected"). The reference point z0 is the mean over this forward pass's examples, as
    TRL's is over a device's batch: a step split into several passes gets one z0 per pass."""
    answer_logps, kl_logps = logps.chunk(2)
    desirable = torch.tensor([bool(dataset.pairs[i].desirable) for i in indices])
    out = kto_loss(
        answer_logps,
        reference[0],
        kl_logps.detach(),
        reference[1],
        desirable.to(logps.device),
        beta=config.beta,
        desirable_weight=config.kto_desirable_weight,
        undesirable_weight=config.kto_undesirable_weight,
    )
    parts = {
        "rewards": out.rewards,
        "logps": answer_logps.detach(),
        "desirable": desirable,
        "kl": out.kl.expand(len(indices)),
    }
    return out.losses, parts


# Sums over examples that the metrics are means of (`reward_metrics`); "chosen" and "rejected"
# are KTO's desirable and undesirable answers, "n/unpaired" counts KTO examples.
SUM_KEYS = (
    "loss", "n", "accurate", "rewards/chosen", "logps/chosen", "n/chosen",
    "rewards/rejected", "logps/rejected", "n/rejected", "kl", "n/unpaired",
)  # fmt: skip


def _part_sums(p: dict[str, Tensor]) -> list[Tensor]:
    """One batch's contribution to each of `SUM_KEYS`."""
    if "desirable" in p:  # KTO: an answer is "accurate" when its reward has its label's sign
        d, r, lp = p["desirable"].cpu(), p["rewards"].double().cpu(), p["logps"].double().cpu()
        n = torch.tensor(float(len(d)))
        accurate = torch.where(d, r > 0, r < 0).sum()
        kl = p["kl"].double().sum().cpu()
        return [p["loss"].double().sum().cpu(), n, accurate, r[d].sum(), lp[d].sum(), d.sum(),
                r[~d].sum(), lp[~d].sum(), (~d).sum(), kl, n]  # fmt: skip
    c, r = p["rewards/chosen"].double().cpu(), p["rewards/rejected"].double().cpu()
    lc, lr = p["logps/chosen"].double().cpu(), p["logps/rejected"].double().cpu()
    n, zero = torch.tensor(float(len(c))), torch.tensor(0.0)
    return [p["loss"].double().sum().cpu(), n, (c - r > 0).sum(), c.sum(), lc.sum(), n,
            r.sum(), lr.sum(), n, zero, zero]  # fmt: skip


def reward_metrics(
    parts: list[dict[str, Tensor]], prefix: str = "", comm: Comm | None = None
) -> dict[str, float]:
    """TRL's metrics, averaged over pairs (of every rank): loss, rewards/*, logps/*.

    For KTO, as TRL's KTOTrainer: rewards/chosen and logps/chosen average the desirable
    answers, */rejected the undesirable ones (0 when a batch has none), margins is their
    difference, and `kl` the mean reference point z0 (`eval/kto_kl` under evaluation, where
    `eval/kl` is the KL readout); rewards/accuracies is the share of answers whose implicit
    reward has the sign of their label.
    """
    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
    for p in parts:
        sums += torch.stack([v.double() for v in _part_sums(p)])
    (comm or Comm()).sum_(sums)
    s = dict(zip(SUM_KEYS, sums.tolist(), strict=True))

    def mean(key: str, count: str) -> float:
        return s[key] / s[count] if s[count] else 0.0

    out = {
        "loss": mean("loss", "n"),
        "rewards/chosen": mean("rewards/chosen", "n/chosen"),
        "rewards/rejected": mean("rewards/rejected", "n/rejected"),
        "rewards/accuracies": mean("accurate", "n"),
        "logps/chosen": mean("logps/chosen", "n/chosen"),
        "logps/rejected": mean("logps/rejected", "n/rejected"),
    }
    both = s["n/chosen"] and s["n/rejected"]
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"] if both else 0.0
    metrics = {prefix + k: out[k] for k in REWARD_METRICS}
    if s["n/unpaired"]:
        metrics[f"{prefix}kto_kl" if prefix else "kl"] = mean("kl", "n/unpaired")
    return metrics


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


@torch.no_grad()
def evaluate(model: Any, dataset: Dataset, lm: LoadedModel, config: TrainConfig) -> dict:
    """Loss and implicit-reward metrics of the current policy on held-out pairs (`eval/...`)."""
    was_training = model.training
    model.eval()
    parts = []
    for indices in eval_batches(dataset, config):
        batch = make_batch(dataset, indices, lm, config)
        parts.append(batch_losses(model, batch, dataset, config)[1])
    model.train(was_training)
    return reward_metrics(parts, prefix="eval/")


def evaluate_point(
    model: Any, dataset: Dataset, lm: LoadedModel, config: TrainConfig, on_eval: EvalHook | None
) -> dict[str, float]:
    """Everything measured at an evaluation point: held-out reward metrics, the KL readout
    and the caller's own `on_eval` metrics. A set of readout prompts alone (no held-out
    pairs) gives the KL readout and `on_eval` only."""
    metrics = evaluate(model, dataset, lm, config) if dataset.pairs else {}
    if config.kl_prompts > 0:
        metrics.update(kl_readout(model, dataset, lm, config))
    if on_eval is not None:
        model.eval()
        metrics.update(on_eval(model))
        model.train()
    return metrics


def kl_readout(model: Any, dataset: Dataset, lm: LoadedModel, config: TrainConfig) -> dict:
    """Monte Carlo KL(policy || base) per answer over `kl_prompts` answers, sampled from the
    held-out prompts (or `dataset.readout_prompts`): each in turn, so a few distinct prompts
    still give that many answers, or evenly spaced ones when there are more (`eval/kl`, its
    standard error `eval/kl_stderr`); the same seed at every point. Against the base model
    (adapter disabled), also after an SFT stage: the guard bounds the drift from the base."""
    own = dataset.readout_prompts or [p.prompt_ids for p in dataset.pairs]
    prompts = spread(list(dict.fromkeys(tuple(p) for p in own)), config.kl_prompts)
    completions = sample_from_ids(
        lm,
        model,
        [list(p) for p in prompts],
        max_new_tokens=config.kl_max_new_tokens,
        seed=config.seed,
        batch_size=config.batch_size * 4,
    )
    estimate = kl_from_completions(lm, model, completions)
    return {"eval/kl": estimate.kl, "eval/kl_stderr": estimate.stderr}


def spread(items: list[Any], n: int) -> list[Any]:
    """n of `items`: each in turn when there are at most n, else n evenly spaced ones."""
    if not items:
        return []
    if len(items) <= n:
        return [items[i % len(items)] for i in range(n)]
    return [items[i * len(items) // n] for i in range(n)]


def snapshot(policy: Policy) -> list[Tensor]:
    """A copy of the trainable weights (fp32 masters), kept on the CPU."""
    return [m.detach().to("cpu", copy=True) for m in policy.masters.masters]


@torch.no_grad()
def restore(policy: Policy, weights: list[Tensor]) -> None:
    for master, saved in zip(policy.masters.masters, weights, strict=True):
        master.copy_(saved)
    policy.masters.masters_to_params()


def iterate_steps(dataset: Dataset, config: TrainConfig) -> Iterator[tuple[int, float, list]]:
    """(step, fractional epoch, micro-batches of pair indices) for the whole run."""
    per_epoch = steps_per_epoch(len(dataset.pairs), config)
    step = 0
    for epoch in range(config.epochs):
        steps = data.step_batches(
            dataset.costs,
            config.batch_size * config.grad_accum,
            config.batch_size,
            seed=config.seed + epoch,
        )
        for i, micro_batches in enumerate(steps, 1):
            step += 1
            yield step, epoch + i / per_epoch, micro_batches


def steps_per_epoch(num_pairs: int, config: TrainConfig) -> int:
    return math.ceil(num_pairs / (config.batch_size * config.grad_accum))


def planned_steps(num_pairs: int, config: TrainConfig) -> int:
    """Optimiser steps of a whole run on `num_pairs` pairs (fewer if the guard stops it)."""
    return config.epochs * steps_per_epoch(num_pairs, config)


def is_eval_step(step: int, total_steps: int, dataset: Dataset, config: TrainConfig) -> bool:
    """Every `eval_every` steps (0: at the end of each epoch), and after the last step."""
    every = config.eval_every or steps_per_epoch(len(dataset.pairs), config)
    return step == total_steps or step % every == 0


def final_metrics(
    history: list[dict[str, float]], num_pairs: int, seconds: float, kept_step: int | None = None
) -> dict:
    """For the weights kept (the last step, or the guard's best `kept_step`): train means over
    that epoch's steps up to it and its evaluation; then run totals."""
    upto = [h for h in history if kept_step is None or h["step"] <= kept_step]
    last_epoch = math.ceil(upto[-1]["epoch"]) - 1
    steps = [h for h in upto if h["epoch"] > last_epoch]
    out = {k: sum(h[k] for h in steps) / len(steps) for k in REWARD_METRICS}
    out.update({k: v for k, v in upto[-1].items() if k.startswith("eval/")})
    out.update(
        num_pairs=num_pairs,
        kept_step=upto[-1]["step"],
        steps=len(history),
        epochs=history[-1]["epoch"],
        train_runtime_s=seconds,
        pairs_per_second=num_pairs * history[-1]["epoch"] / seconds,
    )
    return out


def save_result(model: Any, out_dir: Path, config: TrainConfig, metrics: dict) -> Path:
    """The adapter plus `train_config.json` and `metrics.json`, written atomically."""
    extra = {"train_config.json": config.to_dict(), "metrics.json": metrics}
    path = save_adapter(model, out_dir, extra=extra)
    logger.info("adapter saved to %s", path)
    return path
