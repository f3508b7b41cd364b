"""Which preference pairs are held out from training (for evaluation and the Compare tab).

A pair is held out when its prompt is in the `heldout` split, or when a hash of the prompt text
falls below the held-out fraction. Hashing (rather than shuffling) keeps the choice stable:
with the same fraction every run holds out the same prompts, so iterative runs never train on a
prompt an earlier run was evaluated on, and the Compare tab can find the held-out set again.
"""

from __future__ import annotations

import hashlib
from typing import Any

MAX_HELDOUT_FRACTION = 0.5


def prompt_bucket(prompt: str) -> float:
    """A stable pseudo-random number in [0, 1) for a prompt text."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(pair: dict[str, Any], fraction: float) -> bool:
    if pair.get("split") == "heldout":
        return True
    return prompt_bucket(_prompt_text(pair)) < fraction


def split_pairs(
    pairs: list[dict[str, Any]], fraction: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split pairs into (train, heldout). Never leaves training empty when pairs exist:
    if every pair would be held out, all of them train and none are held out."""
    if not 0.0 <= fraction <= MAX_HELDOUT_FRACTION:
        raise ValueError(
            f"held-out fraction must be between 0 and {MAX_HELDOUT_FRACTION}, got {fraction}"
        )
    train = [p for p in pairs if not is_heldout(p, fraction)]
    heldout = [p for p in pairs if is_heldout(p, fraction)]
    if not train:
        return list(pairs), []
    return train, heldout


def _prompt_text(pair: dict[str, Any]) -> str:
    prompt = pair["prompt"]
    if isinstance(prompt, str):
        return prompt
    # Conversational pairs: the prompt is a list of {role, content} messages.
    return "\n".join(str(m.get("content", "")) for m in prompt)
