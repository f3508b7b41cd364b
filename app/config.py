"""The app's resolved settings (from the CLI and environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_data_dir() -> Path:
    """`DPO_STUDIO_DATA`, else ./data: holds the database and adapter versions."""
    return Path(os.environ.get("DPO_STUDIO_DATA", "data"))


@dataclass
class AppConfig:
    model: str = "embedded"
    dtype: str = "auto"
    load_in_4bit: bool | None = None
    device: str | None = None
    data_dir: Path = Path("data")
    db_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    auth_file: Path | None = None  # users.toml: sign-in and roles on (None: off)

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'studio.db').resolve()}"
