"""DPO training throughput: dpo_core vs TRL's DPOTrainer on the embedded model.

Setup (issue 4): SmolLM2-135M-Instruct, LoRA r=16 / alpha=32 on all seven projections, 32
synthetic pairs, batch 4, max_length 256, one epoch. TRL runs with bf16=True and its other
defaults (learning rate 1e-6, no length grouping, reference forward at every step);
dpo_core with its defaults (bf16 weights, shared-prompt batches, reference log-probs once).

Each run is its own process, so peak RSS is that framework's alone; runs alternate
(dpo_core, TRL, dpo_core, TRL, ...) and the table shows medians. The timed span is the whole
`train()` call for both: tokenization, reference log-probs and the optimiser steps.

    python bench/train_throughput.py [--runs 3] [--pairs 32]

`--procs N` compares, instead, dpo_core in one process with N threads against N processes of
one thread each under torchrun (data-parallel, gloo), alternating, with the same global batch.
On a machine with N cores this measures the overhead of data parallelism (process group,
gradient all-reduce, a model copy per process), not a speed-up: both use the same cores.
Peak memory of the torchrun run is the sum of its processes' peak RSS.

    python bench/train_throughput.py --procs 2 [--runs 3] [--pairs 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/train_throughput.py` from the repository root
    sys.path.insert(0, str(ROOT))

LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
BATCH, MAX_LENGTH = 4, 256

TOPICS = ["photosynthesis", "the water cycle", "compound interest", "black holes", "vaccines",
          "the French Revolution", "machine learning", "plate tectonics", "the immune system",
          "recursion", "inflation", "volcanoes", "the stock market", "electric cars",
          "climate change", "DNA"]  # fmt: skip
ASKS = ["Explain {t} to a ten year old.", "What is {t}, in a few sentences?",
        "Give me a short overview of {t}.", "Why does {t} matter?"]  # fmt: skip
GOOD = ["{T} is an important idea.", "Here is a simple way to think about it.",
        "First, it helps to know the basic parts.", "Scientists have studied {t} for many years.",
        "A good example makes this clearer.", "In everyday life you can see {t} around you.",
        "The key point is that small steps add up over time.",
        "This is why people care about {t}.", "To sum up, {t} connects many other topics.",
        "If you want to learn more, start with a good book."]  # fmt: skip
BAD = ["I don't know.", "Whatever, look it up yourself.", "That question is boring.",
       "Why would anyone ask about {t}?", "No idea, ask someone else.",
       "This is not worth explaining.", "Stop asking me things.", "{T} is just stuff, who cares.",
       "I refuse to answer that."]  # fmt: skip


def synthetic_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Helpful multi-sentence answers (chosen) vs dismissive ones (rejected), 40-170 tokens."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        t = rng.choice(TOPICS)

        def para(sentences: list[str], t: str = t) -> str:
            k = rng.randint(6, 16)
            return " ".join(
                rng.choice(sentences).format(t=t, T=t[0].upper() + t[1:]) for _ in range(k)
            )

        pairs.append(
            {"prompt": rng.choice(ASKS).format(t=t), "chosen": para(GOOD), "rejected": para(BAD)}
        )
    return pairs


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bf16_matmul_peak() -> float:
    """FLOP/s of a large bf16 matmul on this machine, now (median of 5)."""
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048**3 / statistics.median(times)


def model_flops(lm, pairs: list[dict], share_prompt: bool) -> float:
    """FLOPs of one epoch: reference forward + policy forward + backward (~ a forward, the base
    being frozen), matmuls only, over the tokens dpo_core actually processes."""
    from dpo_core import data

    cfg = lm.model.config
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    linear = 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * inter)  # per token
    lora = 2 * layers * LORA["r"] * (4 * h + 2 * kv + 3 * (h + inter) + h)  # A and B, per token
    tokenized = data.tokenize_pairs(
        lm.tokenizer, data.normalise_pairs(pairs), MAX_LENGTH, MAX_LENGTH // 2
    ).pairs
    tokens = sum(p.cost(share_prompt) if share_prompt else 2 * p.cost(False) for p in tokenized)
    scored = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized)
    head = 2 * h * cfg.vocab_size * scored
    attention = sum(4 * h * p.cost(share_prompt) ** 2 / 2 * layers for p in tokenized)
    forward = tokens * linear + head + attention
    return forward + (forward + tokens * lora) + (forward + tokens * 2 * lora)


def run_dpo_core(pairs: list[dict]) -> dict:
    from dpo_core.config import TrainConfig
    from dpo_core.modeling import load_model
    from dpo_core.trainer import train

    lm = load_model("embedded", device="cpu")
    config = TrainConfig(
        epochs=1, batch_size=BATCH, max_length=MAX_LENGTH, lora_r=LORA["r"],
        lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
    )  # fmt: skip
    flops = model_flops(lm, pairs, config.share_prompt)
    peak = bf16_matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train(lm, pairs, config, Path(tmp) / "v1")
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "loss": result.metrics["loss"],
        "accuracy": result.metrics["rewards/accuracies"],
        "flops": flops,
        "matmul_peak": peak,
    }


def run_trl(pairs: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpo_core.modeling import LORA_TARGETS, embedded_model_dir

    path = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [
        {"prompt": [{"role": "user", "content": p["prompt"]}],
         "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]}
        for p in pairs
    ]  # fmt: skip
    lora = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
            num_train_epochs=1, bf16=True, use_cpu=True, report_to=[], logging_steps=1,
            save_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        t0 = time.perf_counter()
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, peft_config=lora,
        )  # fmt: skip
        trainer.train()
        seconds = time.perf_counter() - t0
    steps = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    return {
        "seconds": seconds,
        "loss": statistics.mean(h["loss"] for h in steps),
        "accuracy": statistics.mean(h["rewards/accuracies"] for h in steps),
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(which: str, n_pairs: int) -> None:
    pairs = synthetic_pairs(n_pairs)
    cpu0 = cpu_seconds()  # includes model loading for both; a fair, load-robust second view
    out = run_dpo_core(pairs) if which == "dpo_core" else run_trl(pairs)
    out.update(
        pairs_per_second=n_pairs / out["seconds"],
        pairs_per_cpu_second=n_pairs / (cpu_seconds() - cpu0),
        peak_rss_mb=peak_rss_mb(),
    )
    print("RESULT " + json.dumps(out), flush=True)


def run_child(which: str, n_pairs: int) -> dict:
    load = os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, __file__, "--child", which, "--pairs", str(n_pairs)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["load"] = (load + os.getloadavg()[0]) / 2
    print(f"  {which:8s} {result['pairs_per_second']:.3f} pairs/s  "
          f"{result['pairs_per_cpu_second']:.3f} pairs/CPU-s  "
          f"{result['peak_rss_mb']:.0f} MB  load {result['load']:.1f}", flush=True)  # fmt: skip
    return result


def child_procs(n_pairs: int, out: Path) -> None:
    """One process of a `--procs` run (or the single process): train, report from rank 0."""
    import torch

    from dpo_core import distributed
    from dpo_core.config import TrainConfig
    from dpo_core.modeling import load_model
    from dpo_core.trainer import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    comm, _ = distributed.init_from_env("cpu")
    lm = load_model("embedded", device="cpu")
    config = TrainConfig(
        epochs=1, batch_size=BATCH, max_length=MAX_LENGTH, lora_r=LORA["r"],
        lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
    )  # fmt: skip
    t0 = time.perf_counter()
    result = train(lm, synthetic_pairs(n_pairs), config, out, comm=comm)
    seconds = time.perf_counter() - t0
    rss = comm.sum_(torch.tensor([peak_rss_mb()], dtype=torch.float64)).item()
    if comm.is_main:
        print("RESULT " + json.dumps({
            "seconds": seconds, "pairs_per_second": n_pairs / seconds, "peak_rss_mb": rss,
            "loss": result.metrics["loss"], "accuracy": result.metrics["rewards/accuracies"],
        }), flush=True)  # fmt: skip
    distributed.close()


def run_procs(procs: int, threads: int, n_pairs: int) -> dict:
    """One timed run: `procs` processes of `threads` threads each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    with tempfile.TemporaryDirectory() as tmp:
        args = [__file__, "--child", "procs", "--pairs", str(n_pairs), "--out", f"{tmp}/v1"]
        cmd = [sys.executable, *(torchrun if procs > 1 else []), *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{procs}x{threads} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :]) | {"wall_s": wall}
    print(f"  {procs} proc x {threads} thr  train {result['seconds']:.1f} s  "
          f"{result['pairs_per_second']:.3f} pairs/s  command {wall:.1f} s  "
          f"{result['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    return result


def compare_procs(procs: int, runs: int, n_pairs: int) -> None:
    print(f"{n_pairs} pairs, batch {BATCH}, max_length {MAX_LENGTH}, LoRA {LORA}, 1 epoch, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    shapes = {f"1 proc x {procs} threads": (1, procs), f"{procs} procs x 1 thread": (procs, 1)}
    results: dict[str, list[dict]] = {name: [] for name in shapes}
    for i in range(runs):
        print(f"run {i + 1}/{runs}", flush=True)
        for name, (n, threads) in shapes.items():
            results[name].append(run_procs(n, threads, n_pairs))
    print(f"\n{'':22s} {'train s':>8s} {'pairs/s':>8s} {'command s':>10s} {'peak RSS MB':>12s}")
    for name, rs in results.items():
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{name:22s} {m['seconds']:8.1f} {m['pairs_per_second']:8.3f} {m['wall_s']:10.1f} "
              f"{m['peak_rss_mb']:12.0f}")  # fmt: skip
    print(f"(medians of {runs}; on {os.cpu_count()} cores both shapes share the same cores, so "
          "this is the overhead of data parallelism, not a speed-up)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="alternating runs of each (median)")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--procs", type=int, help="compare N processes with 1 process of N threads")
    p.add_argument("--child", choices=["dpo_core", "trl", "procs"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "procs":
        child_procs(args.pairs, args.out)
        return
    if args.procs:
        compare_procs(args.procs, args.runs, args.pairs)
        return
    if args.child:
        child(args.child, args.pairs)
        return
    print(f"{args.pairs} pairs, batch {BATCH}, max_length {MAX_LENGTH}, LoRA {LORA}, 1 epoch, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    runs: dict[str, list[dict]] = {"dpo_core": [], "trl": []}
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", flush=True)
        for which in runs:
            runs[which].append(run_child(which, args.pairs))
    report(runs)


def report(runs: dict[str, list[dict]]) -> None:
    med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
    print(f"\n{'':10s} {'pairs/s':>9s} {'peak RSS MB':>12s} {'loss':>8s} {'reward acc':>11s}")
    for which, m in med.items():
        print(f"{which:10s} {m['pairs_per_second']:9.3f} {m['peak_rss_mb']:12.0f} "
              f"{m['loss']:8.4f} {m['accuracy']:11.3f}")  # fmt: skip
    ours, trl = med["dpo_core"], med["trl"]
    speed = ours["pairs_per_second"] / trl["pairs_per_second"]
    memory = ours["peak_rss_mb"] / trl["peak_rss_mb"]
    print(f"\nspeed-up (pairs/s, dpo_core / TRL): {speed:.2f}x   (target >= 2.0x)")
    cpu = ours["pairs_per_cpu_second"] / trl["pairs_per_cpu_second"]
    print(f"speed-up (pairs per CPU-second):    {cpu:.2f}x   (less sensitive to other load)")
    print(f"peak RSS (dpo_core / TRL):          {memory:.2f}x   (target <= 0.7x)")
    achieved, peak = ours["flops"] / ours["seconds"], ours["matmul_peak"]
    print(
        f"dpo_core: {ours['flops'] / 1e12:.2f} TFLOP of matmuls in {ours['seconds']:.1f} s = "
        f"{achieved / 1e9:.0f} GFLOP/s, {achieved / peak:.0%} of a bf16 matmul peak measured "
        f"at {peak / 1e9:.0f} GFLOP/s in the same process"
    )
    print(
        f"load average during the runs: dpo_core {ours['load']:.1f}, TRL {trl['load']:.1f} "
        f"(on {os.cpu_count()} CPUs; other work on the machine slows both)"
    )


if __name__ == "__main__":
    main()
