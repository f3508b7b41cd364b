"""The app's resolved settings (from the CLI and environment), and the data directory's layout:
`studio.db` (the default database, `storage.db.default_url`), `adapters/` (one immutable
directory per model version, `adapters_dir`) and `runs/` (training workers' pid and log files,
`app.train.worker`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from storage.db import default_data_dir, default_url

if TYPE_CHECKING:
    from app.label.team import JudgeSettings
    from dpo_core.engine import EngineLimits


def adapters_dir(data_dir: Path) -> Path:
    """Where the adapter versions trained in this data directory are written."""
    return data_dir / "adapters"


@dataclass
class AppConfig:
    model: str = "embedded"  # dpo_core.modeling.EMBEDDED (importing it would load torch)
    dtype: str = "auto"
    load_in_4bit: bool | None = None
    device: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)  # $DPO_STUDIO_DATA, else ./data
    db_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    auth_file: Path | None = None  # users.toml: sign-in and roles on (None: off)
    engine_limits: EngineLimits | None = None  # the decode loop's (None: dpo_core's defaults)
    prefetch: bool = True  # start each annotator's next pair before their vote
    queue_order: str | None = None  # store this Label queue order at start (None: keep it)
    judge: JudgeSettings | None = None  # an AI judge's suggestions beside each pair
    generation_url: str | None = None  # an OpenAI-compatible server answers (None: this process)

    def resolved_db_url(self) -> str:
        return self.db_url or default_url(self.data_dir)
