"""Fault injection for `bench/faults.py`, loaded by Python at start-up when this directory is on
PYTHONPATH (the training worker inherits it). Inert unless DPO_FAULT_PAUSE_AT is set:

- `write`:  the first fsync of a file in a temporary adapter directory (`adapters/.vN-*`),
            i.e. the adapter files are written but not yet synced or renamed into place;
- `rename`: right after the adapter directory was renamed into place, before the run is
            registered in the database.

At that point the process writes "<pid> <point> <path>" to DPO_FAULT_MARKER and stops, so
the benchmark can kill -9 it exactly there.
"""

import os
import time

_POINT = os.environ.get("DPO_FAULT_PAUSE_AT")


def _pause(detail: str) -> None:
    marker = os.environ["DPO_FAULT_MARKER"]
    with open(marker + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {_POINT} {detail}")
    os.replace(marker + ".tmp", marker)
    while True:
        time.sleep(3600)


if _POINT == "write":
    _fsync = os.fsync

    def _fsync_then_maybe_pause(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "/adapters/." in path:
            _pause(path)
        return _fsync(fd)

    os.fsync = _fsync_then_maybe_pause

elif _POINT == "rename":
    _rename = os.rename

    def _rename_then_maybe_pause(src, dst, *args, **kwargs):
        _rename(src, dst, *args, **kwargs)
        if "/adapters/" in os.fspath(dst) and os.path.basename(os.fspath(src)).startswith("."):
            _pause(os.fspath(dst))

    os.rename = _rename_then_maybe_pause
