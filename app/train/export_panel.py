"""Export a version from the Train tab (admins only): merged transformers weights or a GGUF file
for llama.cpp / Ollama, each with a model card, written under `<data-dir>/exports/`.

Versions are immutable, so an export that already exists is the same export: it is reported,
not written again. One export at a time per app process (it loads the base a second time).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from app.auth.users import ADMIN, request_role, require_role
from app.choices import refreshed_choice
from app.train.service import TrainingService
from dpo_core.export import FORMATS, ExportError, ExportRequest, export_version
from dpo_core.gguf_export import GGUF_TYPES
from dpo_core.modeling import ModelLoadError
from storage import runs

logger = logging.getLogger(__name__)
_export_lock = threading.Lock()


@dataclass(frozen=True)
class ExportOutcome:
    ok: bool
    message: str
    directory: str | None = None  # not `path`: gradio_client would fetch a `path` as a file
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VersionInfo:
    name: str
    adapter: Path | None
    lineage: tuple[str, ...]


def exports_dir(service: TrainingService) -> Path:
    return service.data_dir / "exports"


def export_target(service: TrainingService, name: str, fmt: str, gguf_type: str) -> Path:
    """`<data-dir>/exports/v2-merged` or `<data-dir>/exports/v2-gguf-q8_0`."""
    suffix = fmt if fmt == "merged" else f"{fmt}-{gguf_type}"
    return exports_dir(service) / f"{name}-{suffix}"


def find_version(service: TrainingService, name: str) -> VersionInfo:
    """The stored version `name` of the served base model, with its lineage (base first)."""
    with service.sm.begin() as s:
        versions = {v.name: v for v in runs.list_versions(s, service.base_model)}
        version = versions.get((name or "").strip())
        if version is None:
            known = ", ".join(versions) or "none"
            raise ExportError(f"unknown version {name!r}; the versions are: {known}")
        chain, current = [], version
        while current is not None and len(chain) < len(versions):
            chain.append(current.name)
            current = current.parent
        if chain[-1] != runs.BASE:
            chain.append(runs.BASE)
        adapter = Path(version.adapter_path) if version.adapter_path else None
        return VersionInfo(version.name, adapter, tuple(reversed(chain)))


def export_by_name(
    service: TrainingService, name: str, fmt: str, gguf_type: str = "f16"
) -> ExportOutcome:
    """Export version `name`; a user's mistake comes back as `ok=False` with a message."""
    if fmt not in FORMATS:
        return ExportOutcome(False, f"Unknown format {fmt!r}; choose {' or '.join(FORMATS)}.")
    try:
        version = find_version(service, name)
        with _export_lock:  # a second click for the same export finds the first one's result
            return _export_once(service, version, fmt, gguf_type)
    except (ExportError, ModelLoadError, ValueError) as err:
        return ExportOutcome(False, str(err))


def _export_once(
    service: TrainingService, version: VersionInfo, fmt: str, gguf_type: str
) -> ExportOutcome:
    out = export_target(service, version.name, fmt, gguf_type)
    if out.exists():
        files = sorted(p.name for p in out.iterdir())
        return ExportOutcome(
            True, f"{version.name} was already exported to {out}.", str(out), files
        )
    if version.adapter is not None and not version.adapter.is_dir():
        return ExportOutcome(False, f"The adapter of {version.name} is gone ({version.adapter}).")
    request = ExportRequest(
        base=service.base_model,
        adapter=version.adapter,
        fmt=fmt,
        out=out,
        gguf_type=gguf_type,
        device="cpu",
        version=version.name,
        lineage=version.lineage,
    )
    result = export_version(request)
    notes = "".join(f" Note: {n}" for n in result.notes)
    message = f"Exported {version.name} ({fmt}) to {result.out}.{notes}"
    return ExportOutcome(True, message, str(result.out), result.files)


@dataclass
class ExportPanel:
    box: gr.Accordion
    version: gr.Dropdown
    fmt: gr.Radio
    gguf_type: gr.Dropdown
    button: gr.Button
    message: gr.Markdown


def make_handlers(service: TrainingService, panel: ExportPanel) -> dict[str, Any]:
    def refresh(current: str | None, request: gr.Request) -> dict[Any, Any]:
        with service.sm.begin() as s:
            names = [v.name for v in runs.list_versions(s, service.base_model)]
            active = runs.active_version(s, service.base_model)
        return {
            panel.box: gr.Accordion(visible=request_role(request) == ADMIN),
            panel.version: refreshed_choice(names, current, active.name if active else None),
        }

    def export(name: str | None, fmt: str, gguf_type: str, request: gr.Request) -> dict[Any, Any]:
        require_role(request, ADMIN, "export versions")
        if not name:
            return {panel.message: "⚠️ Choose a version first."}
        outcome = export_by_name(service, name, fmt, gguf_type)
        files = f" Files: {', '.join(outcome.files)}." if outcome.files else ""
        return {panel.message: ("✅ " if outcome.ok else "⚠️ ") + outcome.message + files}

    return {"refresh": refresh, "export": export}


def register_api(service: TrainingService) -> None:
    """/export_version (admins only)."""

    def export_version_api(
        name: str,
        fmt: str = "merged",
        gguf_type: str = "f16",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Export version `name` as `merged` weights or `gguf` (`gguf_type` f16, q8_0, ...)
        under <data-dir>/exports/. Returns {ok, message, directory, files}."""
        require_role(request, ADMIN, "export versions")
        return asdict(export_by_name(service, name, fmt, gguf_type))

    gr.api(export_version_api, api_name="export_version")


def build_export_panel(
    service: TrainingService, demo: gr.Blocks, tab_block: gr.Tab | None = None
) -> ExportPanel:
    """Declare the panel (inside the open Train tab, shown to admins) and wire its events."""
    with gr.Accordion("Export a version", open=False, visible=False, elem_id="export") as box:
        gr.Markdown(
            f"Writes under `{exports_dir(service)}`: **merged** transformers weights, or a "
            "**GGUF** file for llama.cpp / Ollama with a `Modelfile`; each with a model card."
        )
        with gr.Row():
            version = gr.Dropdown([], label="Version", elem_id="export-version")
            fmt = gr.Radio(list(FORMATS), value="merged", label="Format", elem_id="export-format")
            gguf_type = gr.Dropdown(
                list(GGUF_TYPES), value="f16", label="GGUF type", elem_id="export-gguf-type"
            )
        button = gr.Button("Export", elem_id="export-button")
        message = gr.Markdown(elem_id="export-message")
    panel = ExportPanel(box, version, fmt, gguf_type, button, message)
    h = make_handlers(service, panel)
    private = {"api_visibility": "private", "show_progress": "hidden"}
    demo.load(h["refresh"], inputs=version, outputs=[box, version], **private)
    if tab_block is not None:
        tab_block.select(h["refresh"], inputs=version, outputs=[box, version], **private)
    button.click(
        h["export"], inputs=[version, fmt, gguf_type], outputs=message, api_visibility="private"
    )
    return panel
