"""The label -> train -> label loop's shared parts (docs/loop.md): the hidden rules, the
conditions, what the annotator sees (`Screen`), the model and prompts (`Bench`), sampling the
Label tab's way, and an arm's cache folders. `bench/loop.py` runs the rounds; `loop_tables.py`
prints the tables; `loop_selflabel.py` checks the self-label scorers and makes self-labels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import defaults_sweep as ds
from dpo_core import kl
from dpo_core.modeling import LoadedModel, load_adapter, load_model

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "loop"
KINDS = ("rounds", "kto", "ktobal", "rank4", "uncertain", "sft", "rpo", "self")
KTO_KINDS = ("kto", "ktobal")
MODES = ("parent", "all", "newest")
RANKED = 4  # answers in a ranking
RANKING_LABELS = 3  # a ranking of 4 costs the annotator time of 3 pair labels (see docs/loop.md)
SAMPLE_BATCH = 32

logger = logging.getLogger("loop")

# --- the hidden rules -----------------------------------------------------------------------

LIST_NUMBER = re.compile(r"^\s*\d+[.)]\s", re.MULTILINE)
FIGURE = re.compile(r"\d+(?:[.,:]\d+)*")


def figures_score(text: str) -> float:
    """Rule `figures` (content): how many distinct figures the answer gives (quantities,
    times, temperatures, years); the numbers of a numbered list do not count."""
    return float(len(set(FIGURE.findall(LIST_NUMBER.sub("", text)))))


# Rule `polite` (tone): courtesy formulas, each counted once however often it is said.
POLITE = re.compile(
    r"\b(?:thank(?:s| you)|please|hello|hi|greetings|glad|happy to help|you're welcome|"
    r"hope (?:this|that|it) helps|great question|good question|enjoy|kindly|my pleasure)\b",
    re.IGNORECASE,
)


def polite_score(text: str) -> float:
    """Rule `polite` (tone, register): how many distinct courtesy formulas the answer uses
    (thanks, please, a greeting, "glad", "hope this helps", "great question", ...)."""
    return float(len({m.lower() for m in POLITE.findall(text)}))


# Rule `brief` (register, length): an answer that finishes (its last sentence ends) wins, and
# of two that finish the one in fewer words; an answer cut off mid-sentence scores 0.
FINISHED = re.compile(r"[.!?][\"')\]]*\s*$")


def brief_score(text: str) -> float:
    """Rule `brief` (register): 100 / words when the answer finishes with a full stop, "!" or
    "?" (closing quotes or brackets allowed), 0 when it is cut off."""
    words = len(text.split())
    return 100.0 / words if words and FINISHED.search(text) else 0.0


LOOP_RULES: dict[str, ds.Score] = {
    "list": ds.list_score,
    "figures": figures_score,
    "polite": polite_score,
    "brief": brief_score,
}


# --- conditions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """R rounds of N labels each, labelled and trained the way `kind` and `mode` say."""

    kind: str
    rounds: int
    per_round: int
    mode: str = "parent"
    times: int = 0  # `self`: at most this many self-labels per human label of a round
    scorer: str = ""  # `self`: the scorer that makes them (dpo_core.self_label.SCORERS)
    kl_ceiling: float | None = None  # `:klC`: the guard's KL ceiling (None: TrainConfig's)

    @property
    def name(self) -> str:
        name = f"{self.kind}:{self.rounds}x{self.per_round}:{self.mode}"
        name = f"{name}:{self.times}x:{self.scorer}" if self.kind == "self" else name
        return name + self.ceiling_part(":")

    def ceiling_part(self, sep: str) -> str:
        return f"{sep}kl{self.kl_ceiling:g}" if self.kl_ceiling is not None else ""

    def lineage(self, round_no: int) -> str:
        """The cache folder of a round: round 1 is the same whatever the mode (for `self` it
        is `rounds`' round 1: self-labels start after the first version)."""
        kind = "rounds" if self.kind == "self" and round_no == 1 else self.kind
        base = f"{kind}-{self.rounds}x{self.per_round}"
        if round_no == 1:
            return base + self.ceiling_part("-")
        extra = f"-{self.times}x-{self.scorer}" if self.kind == "self" else ""
        return f"{base}-{self.mode}{extra}{self.ceiling_part('-')}"

    @property
    def labels_per_screen(self) -> int:
        return RANKING_LABELS if self.kind == "rank4" else 1

    @property
    def answers_per_screen(self) -> int:
        return RANKED if self.kind == "rank4" else 2


def parse_condition(spec: str, budget: int) -> Condition:
    """`KIND:RxN[:MODE]` or `KIND:R[:MODE]` (N = budget / R), and for `self`
    `self:RxN:MODE:Tx[:SCORER]`; each may end in `:klC`, the guard's KL ceiling in nats
    (e.g. `rpo:2x32:all:kl2.5`); a clear error otherwise."""
    parts = spec.strip().split(":")
    ceiling = re.fullmatch(r"kl(\d+(?:\.\d+)?)", parts[-1]) if len(parts) > 2 else None
    if ceiling:
        if float(ceiling[1]) <= 0:
            raise ValueError(f"condition {spec!r}: the KL ceiling must be above 0 nats")
        cond = parse_condition(":".join(parts[:-1]), budget)
        return dataclasses.replace(cond, kl_ceiling=float(ceiling[1]))
    usage = f"condition {spec!r}: expected KIND:RxN[:MODE], e.g. rounds:2x64:parent"
    if parts[0] == "self":
        return parse_self(spec, parts, budget)
    if len(parts) not in (2, 3) or parts[0] not in KINDS:
        raise ValueError(f"{usage}; KIND is one of {', '.join(KINDS)}")
    mode = parts[2] if len(parts) == 3 else "parent"
    if mode not in MODES:
        raise ValueError(f"{usage}; MODE is one of {', '.join(MODES)}")
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", parts[1])
    if not match or int(match[1]) < 1:
        raise ValueError(f"{usage}; R and N are positive whole numbers")
    rounds = int(match[1])
    per_round = int(match[2]) if match[2] else budget // rounds
    if per_round < 1:
        raise ValueError(f"{usage}; a budget of {budget} labels leaves none per round")
    cond = Condition(parts[0], rounds, per_round, mode)
    if per_round < cond.labels_per_screen:
        raise ValueError(f"{usage}; a {parts[0]} verdict costs {cond.labels_per_screen} labels")
    return cond


def parse_self(spec: str, parts: list[str], budget: int) -> Condition:
    """`self:RxN:MODE:Tx[:SCORER]`: `rounds:RxN:MODE` plus up to T self-labels per human
    label from round 2 on (SCORER: reward-model unless named)."""
    from dpo_core.self_label import REWARD_MODEL, SCORERS

    usage = f"condition {spec!r}: expected self:RxN:MODE:Tx[:SCORER], e.g. self:2x32:all:4x"
    if len(parts) not in (4, 5) or not re.fullmatch(r"\d+x", parts[3]):
        raise ValueError(usage)
    scorer = parts[4] if len(parts) == 5 else REWARD_MODEL
    if scorer not in SCORERS:
        raise ValueError(f"{usage}; SCORER is one of {', '.join(SCORERS)}")
    cond = parse_condition(":".join(["rounds", *parts[1:3]]), budget)
    return dataclasses.replace(cond, kind="self", times=int(parts[3][:-1]), scorer=scorer)


def default_conditions(budget: int) -> list[Condition]:
    """Every condition of the issue for a budget of `budget` labels, most informative first."""
    specs = ["rounds:1", "rounds:2:parent", "rounds:2:all", "rounds:2:newest"]
    specs += [f"rounds:{r}:{m}" for r in (4, 8) for m in MODES]
    specs += ["kto:2", "rank4:2", "uncertain:4", "sft:2"]
    return [parse_condition(s, budget) for s in specs]


# --- what the annotator sees and says --------------------------------------------------------


@dataclass
class Screen:
    """Answers to one prompt shown together (2, or 4 to rank) and the rule's score of each."""

    round: int
    prompt: str
    answers: list[str]
    scores: list[float]

    @property
    def decisive(self) -> bool:
        return len(set(self.scores)) > 1

    def pairs(self, rule: str) -> list[dict[str, Any]]:
        """The preference pairs the verdict implies: for a ranking, every two answers it
        orders (`defaults_sweep.rule_pairs`), for two answers the one pair, if not a tie."""
        rows = [
            {"split": "screen", "prompt": self.prompt, "index": i, "text": text}
            for i, text in enumerate(self.answers)
            if usable(text)
        ]
        return ds.rule_pairs(rule, rows, ("screen",), len(self.answers), rules=LOOP_RULES)

    def unpaired(self) -> list[dict[str, Any]]:
        """KTO rows, one per answer: the preferred answer(s) desirable, the other(s) not; on a
        tie both are desirable when they follow the rule ("both good"), else neither ("both
        bad")."""
        best, decisive = max(self.scores), self.decisive
        return [
            {"prompt": self.prompt, "completion": text, "label": s == best and (s > 0 or decisive)}
            for text, s in zip(self.answers, self.scores, strict=True)
            if usable(text)
        ]


def usable(text: str) -> bool:
    """Whether an answer can be trained on (`common.pair_format` refuses blank text and NUL
    characters, which the tiny random model can produce)."""
    return bool(text.strip()) and "\x00" not in text


def labels_of(screens: list[Screen], cond: Condition) -> int:
    """Labels spent: a decisive verdict costs one (a ranking three); a tie is free (it is
    counted as a screen shown, see docs/loop.md)."""
    return sum(cond.labels_per_screen for s in screens if s.decisive)


# --- the bench ------------------------------------------------------------------------------


@dataclass
class Bench:
    """The model, the prompts and the measuring kit shared by every condition."""

    lm: LoadedModel
    out: Path  # bench/out/loop/<model>
    heldout: ds.Heldout
    heldout_rows: list[dict[str, Any]]  # the held-out prompts' base answers
    train_prompts: list[str]
    max_new_tokens: int
    measure_samples: int

    def heldout_pairs(self, rule: str) -> list[dict[str, Any]]:
        """Pairs of the held-out prompts' base answers, for the guard (never trained on)."""
        pairs = ds.rule_pairs(rule, self.heldout_rows, ds.HELDOUT_SPLITS, rules=LOOP_RULES)
        return [p for p in pairs if usable(p["chosen"]) and usable(p["rejected"])]


def training_prompts() -> list[str]:
    """128 training prompts: defaults_sweep's 64 and its 64 more, in a fixed shuffle."""
    more = json.loads(ds.MORE_PROMPTS.read_text())
    prompts = [e["prompt"] for e in ds.load_prompts()[0] + more]
    random.Random(1).shuffle(prompts)
    return prompts


def out_dir(model: str, max_new_tokens: int) -> Path:
    """The cache of one model (and answer length, when not the default 96 tokens)."""
    name = Path(model).name or "model"
    return OUT / (name if max_new_tokens == ds.MAX_NEW_TOKENS else f"{name}-{max_new_tokens}tok")


def open_bench(model: str, max_new_tokens: int, measure_samples: int) -> Bench:
    """Load the model, sample (or read back) the held-out base answers."""
    if model == "tiny":
        from bench import harness

        lm = load_model(str(harness.tiny_model(OUT / "tiny-model")), dtype="fp32", device="cpu")
    else:
        lm = load_model(model, device="cpu")
    out = out_dir(model, max_new_tokens)
    samples = out / "heldout_samples.jsonl"
    jobs = ds.heldout_jobs(ds.load_prompts()[1])
    ds.sample_jobs(lm, jobs, samples, SAMPLE_BATCH, max_new_tokens)
    rows = ds.read_jsonl(samples)
    heldout = ds.load_heldout(lm, rows)
    return Bench(lm, out, heldout, rows, training_prompts(), max_new_tokens, measure_samples)


@contextlib.contextmanager
def version(lm: LoadedModel, adapter: Path | None) -> Iterator[Any]:
    """The model of a version: the base, or the base with `adapter` on (removed after)."""
    if adapter is None:
        yield lm.model
        return
    model = load_adapter(lm.model, adapter)
    model.eval()
    try:
        yield model
    finally:
        lm.model = model.unload()
        lm.model.eval()


def sample_answers(
    bench: Bench, model: Any, prompts: list[str], each: int, seed: int
) -> list[list[str]]:
    """`each` answers to every prompt, sampled as the Label tab samples."""
    completions = kl.sample_completions(
        bench.lm,
        model,
        [p for p in prompts for _ in range(each)],
        max_new_tokens=bench.max_new_tokens,
        seed=seed,
        batch_size=SAMPLE_BATCH,
        **ds.LABEL_SAMPLING,
    )
    texts = [c.text for c in completions]
    return [texts[i * each : (i + 1) * each] for i in range(len(prompts))]


@dataclass(frozen=True)
class Arm:
    """One condition under one rule and seed: one line of versions, each trained on the last."""

    cond: Condition
    rule: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.cond.name} rule {self.rule} seed {self.seed}"

    def folder(self, out: Path, round_no: int) -> Path:
        lineage = self.cond.lineage(round_no)
        return out / self.rule / f"seed{self.seed}" / lineage / f"round{round_no}"

    def judge(self, round_no: int, prompt: str, answers: list[str]) -> Screen:
        scores = [ds.rule_score(self.rule, a, LOOP_RULES) for a in answers]
        return Screen(round_no, prompt, answers, scores)


@dataclass
class Lineage:
    """What an arm has done so far: every verdict and the current version."""

    screens: list[Screen] = field(default_factory=list)
    adapter: Path | None = None
