"""Which preference pairs are held out from training (for evaluation and the Compare tab).

The one owner of this rule: the trainer, the app's Train service and the Compare tab import it.

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


def split_pairs(
    pairs: list[dict[str, Any]], fraction: float, min_heldout: int = 1
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split pairs into (train, heldout).

    Pairs of the `heldout` split are always held out. The hash share is held out only when it
    has at least `min_heldout` pairs (with a handful of pairs, every pair is worth more in
    training than in a noisy evaluation) and leaves some pairs to train on.
    """
    if not 0.0 <= fraction <= MAX_HELDOUT_FRACTION:
        raise ValueError(
            f"held-out fraction must be between 0 and {MAX_HELDOUT_FRACTION}, got {fraction}"
        )
    fixed = [p for p in pairs if p.get("split") == "heldout"]
    rest = [p for p in pairs if p.get("split") != "heldout"]
    hashed = [p for p in rest if pair_bucket(p) < fraction]
    if len(hashed) < min_heldout or len(hashed) == len(rest):
        return rest, fixed
    return [p for p in rest if pair_bucket(p) >= fraction], fixed + hashed


def pair_bucket(pair: Any) -> float:
    """`prompt_bucket` of a pair's prompt text; 2.0 (never held out) for a malformed pair, which
    then stays in training and gets its error message from the pair check there."""
    prompt = pair.get("prompt") if isinstance(pair, dict) else None
    if isinstance(prompt, list):  # conversational: a list of {role, content} messages
        prompt = "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    if not isinstance(prompt, str):
        return 2.0
    return prompt_bucket(prompt)
