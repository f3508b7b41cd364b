"""Model versions in the Train tab: every registered version, and (admins only) "Make active",
which rolls the served model back or forward without a restart.

The switch goes through the training service, the same path a finished run takes: the stored
active version changes, then `sync_active_version` loads it into the served model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from app.auth.users import ADMIN, request_role, require_role
from app.choices import refreshed_choice
from app.train.service import TrainingService
from storage import runs
from storage.rounds import Lineage, pairs_per_version

VERSION_COLUMNS = [
    "version",
    "active",
    "lineage",
    "pairs on its answers",
    "made by run",
    "created",
    "adapter",
]


@dataclass
class VersionPanel:
    table: gr.Dataframe
    choice: gr.Dropdown
    activate_btn: gr.Button
    message: gr.Markdown


def version_rows(service: TrainingService) -> list[dict[str, Any]]:
    """One row per registered version of the served base model, oldest first: where it comes
    from (`v3 ← v2 ← v1 ← base`) and how many pairs were labeled on its answers (the votes
    a default run reads; storage/rounds.py)."""
    with service.sm.begin() as s:
        versions = runs.list_versions(s, service.base_model)
        names = {v.id: v.name for v in versions}
        lineage = Lineage.load(s)
        labeled = pairs_per_version(s)
        return [
            {
                "version": v.name,
                "active": v.is_active,
                "parent": names.get(v.parent_id, ""),
                "lineage": lineage.text(v.id),
                "pairs on its answers": labeled.get(v.id, 0),
                "made by run": v.training_run_id or "",
                "created": v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "",
                "adapter": v.adapter_path or "",
            }
            for v in versions
        ]


@dataclass
class VersionHandlers:
    """The panel's event handlers; each returns `{component: update}`."""

    service: TrainingService
    panel: VersionPanel

    def refresh(self, current: str | None, request: gr.Request) -> dict[Any, Any]:
        rows = version_rows(self.service)
        active = next((r["version"] for r in rows if r["active"]), None)
        admin = request_role(request) == ADMIN
        return {
            self.panel.table: pd.DataFrame(rows, columns=VERSION_COLUMNS),
            self.panel.choice: refreshed_choice([r["version"] for r in rows], current, active),
            self.panel.activate_btn: gr.Button(visible=admin),
        }

    def activate(self, name: str | None, request: gr.Request) -> dict[Any, Any]:
        require_role(request, ADMIN, "switch versions")
        if not name:
            return {self.panel.message: "⚠️ Choose a version first."}
        result = self.service.activate_version(name)
        out = self.refresh(name, request)
        out[self.panel.message] = ("✅ " if result.ok else "⚠️ ") + result.message
        return out


def register_api(service: TrainingService) -> None:
    """Named endpoints: /list_versions (anyone signed in), /activate_version (admins only)."""

    def list_versions() -> list[dict[str, Any]]:
        """Every registered version (base, v1, v2, ...), oldest first, with `active` marked."""
        return version_rows(service)

    def activate_version(name: str, request: gr.Request = None) -> dict[str, Any]:  # type: ignore[assignment]
        """Serve version `name` (roll back or forward) without a restart. Returns
        {ok, message, active}; `ok` is false while a run is live or when the adapter is gone."""
        require_role(request, ADMIN, "switch versions")
        result = service.activate_version(name)
        active = next(r["version"] for r in version_rows(service) if r["active"])
        return {"ok": result.ok, "message": result.message, "active": active}

    gr.api(list_versions, api_name="list_versions")
    gr.api(activate_version, api_name="activate_version")


def build_version_panel(
    service: TrainingService, demo: gr.Blocks, tab_block: gr.Tab | None = None
) -> VersionPanel:
    """Declare the panel (inside the open Train tab) and wire its events."""
    rows = version_rows(service)
    with gr.Accordion("Model versions", open=False, elem_id="versions"):
        table = gr.Dataframe(
            pd.DataFrame(rows, columns=VERSION_COLUMNS),
            interactive=False,
            wrap=True,
            elem_id="versions-table",
        )
        with gr.Row():
            choice = gr.Dropdown(
                [r["version"] for r in rows],
                value=next((r["version"] for r in rows if r["active"]), None),
                label="Version",
                elem_id="versions-choice",
            )
            activate_btn = gr.Button("Make active", visible=False, elem_id="versions-activate")
        message = gr.Markdown(elem_id="versions-message")
    panel = VersionPanel(table=table, choice=choice, activate_btn=activate_btn, message=message)
    h = VersionHandlers(service, panel)
    outputs = [panel.table, panel.choice, panel.activate_btn]
    private = {"api_visibility": "private", "show_progress": "hidden"}
    demo.load(h.refresh, inputs=choice, outputs=outputs, **private)
    if tab_block is not None:  # a run finished since the page loaded: its version is listed
        tab_block.select(h.refresh, inputs=choice, outputs=outputs, **private)
    activate_btn.click(h.activate, inputs=choice, outputs=[*outputs, message], **private)
    return panel
