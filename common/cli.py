"""The logging set-up shared by `python -m app`, `python -m dpo_core` and `python -m storage`."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool, *, server: bool = False) -> None:
    """Log to stderr. A command prints its results and logs only warnings (progress with
    `-v`); a server logs what it does with timestamps (debug detail with `-v`)."""
    if server:
        level = logging.DEBUG if verbose else logging.INFO
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    else:
        level = logging.INFO if verbose else logging.WARNING
        fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt)
