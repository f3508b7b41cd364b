"""A round from the command line: `python -m storage export` writes the pairs a round uses,
`python -m dpo_core train --adapter <the parent's directory>` continues the parent on them.
The tiny random model, a real SQLite database, a few real training steps."""

from __future__ import annotations

import json
from pathlib import Path

from dpo_core.__main__ import main as dpo_main
from storage.__main__ import main as storage_main
from storage.db import open_db
from tests.storage.test_rounds import family, voted
from tests.tiny import save_random_adapter


def test_a_round_exported_from_storage_continues_the_parent_in_dpo_core(
    tiny_model_dir: Path, tmp_path: Path
):
    url = f"sqlite:///{tmp_path / 'studio.db'}"
    sm = open_db(url)
    with sm.begin() as s:
        f = family(s)
        for topic in ("cats", "rain", "tea", "maps"):
            voted(s, f"Tell me about {topic}.", (f.v1, f.v1))
        voted(s, "Tell me about bees.", (f.base, f.base))
    sm.kw["bind"].dispose()
    on_v1 = tmp_path / "on-v1.jsonl"
    assert storage_main(["export", str(on_v1), "--db", url, "--on-version", "v1"]) == 0
    assert len(on_v1.read_text().splitlines()) == 4  # not the pair on the base's answers
    newest = tmp_path / "newest.jsonl"
    args = ["export", str(newest), "--db", url, "--train-on", "newest", "--parent", "v1"]
    assert storage_main(args) == 0
    rows = [json.loads(line) for line in newest.read_text().splitlines()]
    assert sorted(r["weight"] for r in rows) == [0.5, 1.0, 1.0, 1.0, 1.0]
    v1 = save_random_adapter(tiny_model_dir, tmp_path / "adapters" / "v1")
    for name, pairs in (("v2", on_v1), ("v2-newest", newest)):
        out = tmp_path / "adapters" / name
        model = ["--model", str(tiny_model_dir), "--dtype", "fp32"]
        short = ["--epochs", "1", "--lora-r", "4", "--max-length", "96"]
        round_ = ["--adapter", str(v1), "--pairs", str(pairs), "--out", str(out)]
        assert dpo_main(["train", *round_, *model, *short]) == 0
        config = json.loads((out / "train_config.json").read_text())
        assert config["init_adapter"] == str(v1)
