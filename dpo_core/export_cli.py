"""`python -m dpo_core export`: a version as merged transformers weights or a GGUF file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dpo_core.export import FORMATS, ExportRequest, export_version
from dpo_core.gguf_export import GGUF_TYPES
from dpo_core.modeling import EMBEDDED


def add_export_parser(sub: Any) -> None:
    """Register the `export` subcommand."""
    p = sub.add_parser(
        "export",
        help="merge an adapter into its base: transformers checkpoint or GGUF (+ model card)",
    )
    p.add_argument("--base", default=EMBEDDED, help="`embedded`, a HF id or a directory")
    p.add_argument("--adapter", default=None, help="the adapter directory (omit: the base)")
    p.add_argument("--format", choices=FORMATS, required=True, dest="fmt")
    p.add_argument("--out", required=True, help="a new directory to write")
    p.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES)
    p.add_argument("--device", default=None, help="where to merge (default: cpu)")
    p.add_argument("--version", default="", help="the version's name for the model card (v2)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    request = ExportRequest(
        base=args.base,
        adapter=Path(args.adapter) if args.adapter else None,
        fmt=args.fmt,
        out=Path(args.out),
        gguf_type=args.gguf_type,
        device=args.device,
        version=args.version,
    )
    result = export_version(request)
    print(f"exported {args.fmt} to {result.out}: {', '.join(result.files)}")
    for note in result.notes:
        print(f"note: {note}")
    return 0
