"""Compare model versions: side by side, blind votes, batch before/after, held-out accuracy.

The service generates with the one in-memory model (`app.serving.versions.VersionedModel`:
both versions answer in one batch, same seed), records every answer as a response with its sampling
parameters, and reads/writes blind votes in storage.
"""

from __future__ import annotations

import csv
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.compare.stats import WinRate, format_rate
from app.serving.versions import VersionedModel
from app.train.pairs import stored_pairs
from app.train.service import TrainRequest, config_default
from dpo_core.generation import SamplingParams
from storage import repo, runs
from storage.db import transaction
from storage.selection import VoteSelection

logger = logging.getLogger(__name__)

MAX_BATCH = 50
SAMPLING = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=256)


@dataclass(frozen=True)
class Answer:
    version: str
    text: str
    response_id: int


@dataclass(frozen=True)
class BlindRound:
    """Two answers in shuffled order; which version wrote which stays server-side (in the DB)."""

    prompt: str
    left: Answer
    right: Answer

    def public(self) -> dict[str, Any]:
        """What the browser may see before the vote: texts and response ids, no versions."""
        return {
            "left_response_id": self.left.response_id,
            "right_response_id": self.right.response_id,
            "left": self.left.text,
            "right": self.right.text,
        }


class CompareService:
    def __init__(
        self,
        sm: sessionmaker[Session],
        models: VersionedModel,
        base_model: str,
        params: SamplingParams = SAMPLING,
    ) -> None:
        self.sm = sm
        self.models = models
        self.base_model = base_model
        self.params = params

    # --- versions and prompts ----------------------------------------------------------------

    def version_names(self) -> list[str]:
        with self.sm.begin() as s:
            return [v.name for v in runs.list_versions(s, self.base_model)]

    def default_pair(self) -> tuple[str, str]:
        """(base, active): what a person most often wants to compare."""
        with self.sm.begin() as s:
            active = runs.active_version(s, self.base_model)
            return runs.BASE, active.name if active is not None else runs.BASE

    def heldout_prompts(self, limit: int = 200) -> list[str]:
        """Prompts of the `heldout` split, then prompts of held-out preference pairs."""
        with self.sm.begin() as s:
            texts = [p.text for p in repo.list_prompts(s, split="heldout", limit=limit)]
        for pair in self.heldout_pairs():
            if isinstance(pair["prompt"], str) and pair["prompt"] not in texts:
                texts.append(pair["prompt"])
        return texts[:limit]

    def heldout_pairs(self) -> list[dict[str, Any]]:
        """Preference pairs no run trained on (same stable split and choice of votes as the
        latest run's)."""
        with self.sm.begin() as s:
            return stored_pairs(s, *_latest_split(s), _latest_selection(s)).heldout

    # --- generation ----------------------------------------------------------------------------

    def side_by_side(self, version_a: str, version_b: str, prompt: str, seed: int) -> list[Answer]:
        """Both versions answer the same prompt with the same sampling seed (one batch)."""
        prompt = _check_prompt(prompt)
        versions = [version_a, version_b]
        with self.sm.begin() as s:
            rows = [self._version(s, v) for v in versions]
            paths = {v.name: v.adapter_path for v in rows}
        for name, path in paths.items():
            self.models.ensure_loaded(name, path)
        update = self.models.generate(prompt, versions, seed=seed, params=self.params)
        with transaction(self.sm, "The answers") as s:
            prompt_id = repo.add_prompt(s, prompt, source="compare").id
            answers = []
            for row, out in zip(rows, update.answers, strict=True):
                text = storable(out.text)
                response = repo.record_response(
                    s,
                    prompt_id=prompt_id,
                    model_version_id=row.id,
                    text=text,
                    temperature=self.params.temperature,
                    top_p=self.params.top_p,
                    max_new_tokens=self.params.max_new_tokens,
                    seed=seed,
                    num_tokens=out.token_count,
                    latency_s=out.latency_s,
                )
                answers.append(Answer(row.name, text, response.id))
        return answers

    def blind_round(
        self, version_a: str, version_b: str, prompt: str, seed: int, rng: random.Random
    ) -> BlindRound:
        if version_a == version_b:
            raise ValueError("pick two different versions for a blind comparison")
        a, b = self.side_by_side(version_a, version_b, prompt, seed)
        left, right = (a, b) if rng.random() < 0.5 else (b, a)
        return BlindRound(prompt, left, right)

    def _version(self, s: Session, name: str | None) -> Any:
        for version in runs.list_versions(s, self.base_model):
            if version.name == name:
                return version
        raise ValueError(f"no model version {name!r}; pick one from the list")

    def blind_vote(self, left_id: int, right_id: int, winner: str, annotator: str) -> str:
        """Store the vote; return the reveal ("left was v1, right was base")."""
        with transaction(self.sm, "Your vote") as s:
            vote, _new = repo.record_comparison_vote(
                s,
                response_left_id=left_id,
                response_right_id=right_id,
                winner=winner,
                annotator=annotator.strip(),
            )
            left = vote.response_left.model_version
            right = vote.response_right.model_version
            return f"Left was **{left.name}**, right was **{right.name}**."

    def win_rate_rows(self) -> list[dict[str, Any]]:
        """One row per pair of versions, with win rate and 95% Wilson interval."""
        with self.sm.begin() as s:
            matchups = repo.comparison_counts(s)
        rows = []
        for m in matchups:
            # Shown from the newer version's side: "v2 vs v1", "v1 vs base".
            record = WinRate(wins=m.y_wins, ties=m.ties, both_bad=0, losses=m.x_wins)
            rate, interval = format_rate(record)
            rows.append(
                {
                    "version": m.version_y,
                    "vs": m.version_x,
                    "wins": record.wins,
                    "ties": record.ties + record.both_bad,
                    "losses": record.losses,
                    "votes": record.votes,
                    "win rate": rate,
                    "95% CI": interval,
                }
            )
        return rows

    # --- batch before/after ------------------------------------------------------------------

    def batch(self, version_a: str, version_b: str, n: int, seed: int) -> list[dict[str, Any]]:
        prompts = self.heldout_prompts(limit=max(1, min(int(n), MAX_BATCH)))
        if not prompts:
            raise ValueError(
                "no held-out prompts yet: mark prompts as held-out on import "
                "(`python -m storage import-prompts FILE --split heldout`) or label more pairs"
            )
        rows = []
        for prompt in prompts:
            a, b = self.side_by_side(version_a, version_b, prompt, seed)
            rows.append({"prompt": prompt, f"A: {version_a}": a.text, f"B: {version_b}": b.text})
        return rows

    # --- held-out implicit-reward accuracy ----------------------------------------------------

    def reward_accuracy(self, versions: list[str]) -> list[dict[str, Any]]:
        """Implicit-reward accuracy of each version on the held-out preference pairs."""
        pairs = self.heldout_pairs()
        if not pairs:
            raise ValueError(
                "no held-out preference pairs yet: set a held-out fraction above 0 when "
                "training, or import pairs with --split heldout"
            )
        names = list(dict.fromkeys(v for v in versions if v))
        with self.sm.begin() as s:
            paths = {v.name: v.adapter_path for v in (self._version(s, n) for n in names)}
        for name, path in paths.items():
            self.models.ensure_loaded(name, path)
        scores = self.models.reward_accuracy(pairs, names)
        rows = []
        for name in names:
            score = scores.get(name)
            rows.append(
                {
                    "version": name,
                    "held-out pairs": score.pairs if score else len(pairs),
                    "reward accuracy": f"{score.accuracy:.3f}" if score else "— (reference)",
                    "mean margin": f"{score.mean_margin:+.3f}" if score else "0",
                }
            )
        return rows


def storable(text: str) -> str:
    """A model can emit U+0000 (byte-level vocabularies); no database back end stores it."""
    return text.replace("\x00", "\ufffd")


def write_csv(rows: list[dict[str, Any]], prefix: str = "compare-") -> Path:
    """Write rows to a CSV file for download."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".csv")
    with open(fd, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["prompt"])
        writer.writeheader()
        writer.writerows(rows)
    return Path(name)


def _check_prompt(prompt: str | None) -> str:
    if prompt is None or not prompt.strip():
        raise ValueError("the prompt is empty: type one or pick a held-out prompt")
    return prompt.strip()


def _latest_selection(s: Session) -> VoteSelection:
    """The votes the latest run trained on (storage/selection.py), else the default choice."""
    latest = next(iter(runs.list_runs(s)), None)
    return VoteSelection.from_dict((latest.config or {}).get("votes") if latest else None)


def _latest_split(s: Session) -> tuple[float, int]:
    """(held-out fraction, min held-out pairs) of the latest run, else the defaults."""
    for run in runs.list_runs(s):  # newest first
        train = (run.config or {}).get("train", {})
        if "heldout_fraction" in train:
            return float(train["heldout_fraction"]), int(train.get("min_heldout_pairs", 1))
    return TrainRequest().heldout_fraction, config_default("min_heldout_pairs")
