"""The Data tab: what is in the database, importing prompts and preference pairs, exporting
pairs for TRL / `datasets`. Everyone signed in sees the counts; only an admin may import or
export (refused server-side, in the handlers and the API, for anyone else).

Handlers first (thin: check the role, call the data service, return named updates), layout after.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from gradio.utils import get_upload_folder, is_in_or_equal

from app.auth.users import ADMIN, request_role, require_role
from app.data.service import EXPORT_FILE_TYPES, EXPORT_SPLITS, DataError, DataService
from storage.annotators import is_person
from storage.io import EXPORT_FORMATS
from storage.models import CHOICES, SPLITS
from storage.selection import DEFAULT_VOTES, VOTE_MODES

ANNOTATOR_COLUMNS = ["annotator", "votes", *CHOICES, "usable pairs"]
PROMPT_FILE_TYPES = [".txt", ".jsonl", ".json", ".csv", ".parquet"]
PAIR_FILE_TYPES = [".jsonl", ".json", ".csv", ".parquet"]
ADMIN_NOTE = "Importing and exporting data is for admins; ask one if you need it."


@dataclass
class DataTab:
    summary: gr.Markdown
    annotators: gr.Dataframe
    refresh_btn: gr.Button
    admin_area: gr.Column
    admin_note: gr.Markdown
    prompts_file: gr.File
    prompts_split: gr.Radio
    prompts_btn: gr.Button
    pairs_file: gr.File
    pairs_split: gr.Radio
    pairs_btn: gr.Button
    import_message: gr.Markdown
    export_format: gr.Radio
    export_type: gr.Radio
    export_split: gr.Radio
    export_votes: gr.Radio
    export_leave_out: gr.Dropdown
    export_judges: gr.Checkbox
    export_self: gr.Checkbox
    export_btn: gr.Button
    export_file: gr.File
    export_message: gr.Markdown


# --- pure view helpers -----------------------------------------------------------------------


def summary_markdown(stats: dict[str, Any]) -> str:
    prompts = stats["prompts"]
    votes = stats["votes"]
    choices = ", ".join(f"{n} {c.replace('_', '-')}" for c, n in votes["by_choice"].items())
    return "  \n".join(
        [
            f"**Prompts:** {sum(prompts.values())} "
            f"({', '.join(f'{n} {split}' for split, n in prompts.items())})",
            f"**Answers generated:** {stats['responses']}",
            f"**Votes:** {votes['votes']} ({choices})" + _models_note(stats),
            f"**Usable training pairs:** {votes['usable_pairs']} (each vote its own pair); "
            f"{stats['default_pairs']} by the majority of human votes, as Train uses by default",
        ]
    )


def _models_note(stats: dict[str, Any]) -> str:
    """`; 12 by people, 40 by models` when AI judges or versions' own labels voted too."""
    by = stats["by_annotator"]
    people = sum(counts["votes"] for name, counts in by.items() if is_person(name))
    votes = stats["votes"]["votes"]
    return "" if people == votes else f"; {people} by people, {votes - people} by models"


def annotator_frame(stats: dict[str, Any]) -> pd.DataFrame:
    rows = [
        [name, c["votes"], *(c["by_choice"].get(k, 0) for k in CHOICES), c["usable_pairs"]]
        for name, c in stats["by_annotator"].items()
    ]
    return pd.DataFrame(rows, columns=ANNOTATOR_COLUMNS)


def uploaded_path(file: Any) -> tuple[Path, str]:
    """The server path and the original name of an uploaded file (a path from the UI, a
    FileData dict from the API). Only files uploaded to this app are accepted."""
    if isinstance(file, dict):
        path, name = file.get("path"), file.get("orig_name")
    else:
        path, name = file, None
    if not path:
        raise DataError("Choose a file to import first.")
    if not is_in_or_equal(str(path), get_upload_folder()):
        raise DataError("Only a file uploaded to this app can be imported.")
    return Path(path), name or Path(path).name


def _user_errors(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `fn`; a DataError becomes a `gr.Error` the user reads, no traceback."""
    try:
        return fn(*args, **kwargs)
    except DataError as err:
        raise gr.Error(str(err), title="Data") from err


# --- handlers --------------------------------------------------------------------------------


@dataclass
class DataHandlers:
    """The tab's event handlers; each returns `{component: update}`. Gradio names even private
    events after their function, so none is named like an API endpoint (`import_prompts`)."""

    service: DataService
    tab: DataTab

    def refresh(self) -> dict[Any, Any]:
        stats = self.service.stats()
        return {
            self.tab.summary: summary_markdown(stats),
            self.tab.annotators: annotator_frame(stats),
            self.tab.export_leave_out: gr.Dropdown(choices=list(stats["by_annotator"])),
        }

    def show_admin_area(self, request: gr.Request) -> dict[Any, Any]:
        admin = request_role(request) == ADMIN
        return {
            self.tab.admin_area: gr.Column(visible=admin),
            self.tab.admin_note: gr.Markdown(visible=not admin),
        }

    def import_prompts_file(
        self, file: str | None, split: str, request: gr.Request
    ) -> dict[Any, Any]:
        require_role(request, ADMIN, "import prompts")
        return self._import(self.service.import_prompts, file, split)

    def import_pairs_file(
        self, file: str | None, split: str, request: gr.Request
    ) -> dict[Any, Any]:
        require_role(request, ADMIN, "import pairs")
        return self._import(self.service.import_pairs, file, split)

    def _import(self, run: Any, file: str | None, split: str) -> dict[Any, Any]:
        try:
            path, name = uploaded_path(file)
            message = run(path, split=split, name=name).message
        except DataError as err:
            return {self.tab.import_message: f"⚠️ {err}"}
        return {self.tab.import_message: f"✅ {message}", **self.refresh()}

    def export(
        self,
        fmt: str,
        file_type: str,
        split: str,
        request: gr.Request,
        votes: str = DEFAULT_VOTES,
        leave_out: list[str] | None = None,
        include_judges: bool = False,
        include_self: bool = False,
    ) -> dict[Any, Any]:
        require_role(request, ADMIN, "export data")
        chosen = {
            "votes": votes,
            "leave_out": leave_out or (),
            "include_judges": include_judges,
            "include_self": include_self,
        }
        try:
            path = self.service.export(fmt=fmt, file_type=file_type, split=split, **chosen)
        except DataError as err:
            return {self.tab.export_message: f"⚠️ {err}", self.tab.export_file: None}
        return {
            self.tab.export_message: f"✅ {path.name} is ready.",
            self.tab.export_file: str(path),
        }


def register_api(service: DataService) -> None:
    """Named endpoints: /data_stats (anyone signed in), /import_prompts, /import_pairs,
    /export_preferences (admins only). Bad input raises a `gr.Error` with a clear message."""

    def data_stats() -> dict[str, Any]:
        """Prompts per split, responses, votes overall and per annotator (by choice, usable)."""
        return service.stats()

    def import_prompts_api(
        file: dict[str, Any],
        split: str = "train",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Add the prompts of an uploaded .txt/.jsonl/.json/.csv/.parquet file (pass it with
        `gradio_client.handle_file`). Returns {file, added, skipped, message}."""
        require_role(request, ADMIN, "import prompts")
        path, name = _user_errors(uploaded_path, file)
        return _user_errors(service.import_prompts, path, split=split, name=name).to_dict()

    def import_pairs_api(
        file: dict[str, Any],
        split: str = "train",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Add the preference pairs of an uploaded TRL-format file (prompt/chosen/rejected,
        standard or conversational). Returns {file, added, skipped, message}."""
        require_role(request, ADMIN, "import preference pairs")
        path, name = _user_errors(uploaded_path, file)
        return _user_errors(service.import_pairs, path, split=split, name=name).to_dict()

    gr.api(data_stats, api_name="data_stats")
    gr.api(import_prompts_api, api_name="import_prompts")
    gr.api(import_pairs_api, api_name="import_pairs")
    gr.api(_export_api(service), api_name="export_preferences")


def _export_api(service: DataService) -> Callable[..., dict[str, Any]]:
    """/export_preferences (admins only), named as the endpoint's function for its docs."""

    def export_preferences_api(
        format: str = "standard",
        file_type: str = ".jsonl",
        split: str = "all",
        votes: str = DEFAULT_VOTES,
        leave_out: list[str] | None = None,
        include_judges: bool = False,
        include_self: bool = False,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """The usable preference pairs as a file (`standard` or `conversational` TRL format,
        .jsonl or .parquet; split all, train or heldout); the client downloads it. `votes`:
        for answers judged by several annotators, majority (default), unanimous or every;
        `leave_out`: annotators whose votes are ignored; `include_judges`: AI judges' votes;
        `include_self`: versions' labels of their own answers, with a `weight` column."""
        require_role(request, ADMIN, "export data")
        path = _user_errors(
            service.export,
            fmt=format,
            file_type=file_type,
            split=split,
            votes=votes,
            leave_out=leave_out or (),
            include_judges=include_judges,
            include_self=include_self,
        )
        return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    return export_preferences_api


# --- layout ----------------------------------------------------------------------------------


def layout(service: DataService) -> DataTab:
    """Declare the tab's components (inside the open `gr.Tab`); no events."""
    stats = service.stats()
    with gr.Row():
        summary = gr.Markdown(summary_markdown(stats), elem_id="data-summary")
        refresh_btn = gr.Button("Refresh", size="sm", scale=0, elem_id="data-refresh")
    annotators = gr.Dataframe(
        annotator_frame(stats),
        headers=ANNOTATOR_COLUMNS,
        label="Votes per annotator",
        interactive=False,
        elem_id="data-annotators",
    )
    admin_note = gr.Markdown(ADMIN_NOTE, visible=False, elem_id="data-admin-note")
    with gr.Column(elem_id="data-admin") as admin_area:
        gr.Markdown("### Import")
        with gr.Row():
            prompts_file, prompts_split, prompts_btn = _import_column(
                "prompts", "Prompts (.txt one per line, or a 'prompt' column)", PROMPT_FILE_TYPES
            )
            pairs_file, pairs_split, pairs_btn = _import_column(
                "pairs",
                "Preference pairs (prompt / chosen / rejected, TRL format)",
                PAIR_FILE_TYPES,
            )
        import_message = gr.Markdown(elem_id="data-import-message")
        export = _export_area(list(stats["by_annotator"]))
    return DataTab(
        summary=summary,
        annotators=annotators,
        refresh_btn=refresh_btn,
        admin_area=admin_area,
        admin_note=admin_note,
        prompts_file=prompts_file,
        prompts_split=prompts_split,
        prompts_btn=prompts_btn,
        pairs_file=pairs_file,
        pairs_split=pairs_split,
        pairs_btn=pairs_btn,
        import_message=import_message,
        **export,
    )


def _export_area(annotators: list[str]) -> dict[str, Any]:
    """The export controls, by DataTab field name."""
    gr.Markdown("### Export preference pairs")
    with gr.Row():
        export_format = gr.Radio(list(EXPORT_FORMATS), value="standard", label="TRL format")
        export_type = gr.Radio(list(EXPORT_FILE_TYPES), value=".jsonl", label="File type")
        export_split = gr.Radio(list(EXPORT_SPLITS), value="all", label="Split")
    with gr.Row():
        export_votes = gr.Radio(
            list(VOTE_MODES),
            value=DEFAULT_VOTES,
            label="Pairs judged by several annotators",
            info="majority: the choice of more than half of the votes (a tie of votes gives "
            "no pair); unanimous: only when all agree; every: each vote is its own pair",
            elem_id="data-export-votes",
        )
        export_leave_out = gr.Dropdown(
            annotators,
            value=[],
            multiselect=True,
            label="Leave out annotators",
            info="their votes are not exported",
            elem_id="data-export-leave-out",
        )
        export_judges = gr.Checkbox(
            value=False,
            label="Include AI judges' votes",
            info="annotators named judge:<name>; off: human votes only",
            elem_id="data-export-judges",
        )
        export_self = gr.Checkbox(
            value=False,
            label="Include the model's own labels",
            info="annotators named self:<version>, with their weight; a person's vote on the "
            "same answers replaces them",
            elem_id="data-export-self",
        )
    return {
        "export_format": export_format,
        "export_type": export_type,
        "export_split": export_split,
        "export_votes": export_votes,
        "export_leave_out": export_leave_out,
        "export_judges": export_judges,
        "export_self": export_self,
        "export_btn": gr.Button("Export", elem_id="data-export"),
        "export_message": gr.Markdown(elem_id="data-export-message"),
        "export_file": gr.File(label="Download", interactive=False, elem_id="data-export-file"),
    }


def _import_column(
    kind: str, label: str, file_types: list[str]
) -> tuple[gr.File, gr.Radio, gr.Button]:
    with gr.Column():
        file = gr.File(
            label=label, file_types=file_types, type="filepath", elem_id=f"data-{kind}-file"
        )
        split = gr.Radio(list(SPLITS), value="train", label="Split")
        button = gr.Button(f"Import {kind}", elem_id=f"data-import-{kind}")
    return file, split, button


def build_data_tab(
    service: DataService, demo: gr.Blocks, tab_block: gr.Tab | None = None
) -> DataTab:
    """Declare the Data tab (inside the open `gr.Tab`) and wire its events."""
    tab = layout(service)
    h = DataHandlers(service, tab)
    stats_outputs = [tab.summary, tab.annotators, tab.export_leave_out]
    private = {"api_visibility": "private"}
    demo.load(h.show_admin_area, outputs=[tab.admin_area, tab.admin_note], **private)
    tab.refresh_btn.click(h.refresh, outputs=stats_outputs, **private)
    if tab_block is not None:  # votes cast since the page loaded: recount on opening the tab
        tab_block.select(h.refresh, outputs=stats_outputs, show_progress="hidden", **private)
    import_outputs = [tab.import_message, *stats_outputs]
    for button, file, split, handler in (
        (tab.prompts_btn, tab.prompts_file, tab.prompts_split, h.import_prompts_file),
        (tab.pairs_btn, tab.pairs_file, tab.pairs_split, h.import_pairs_file),
    ):
        button.click(handler, inputs=[file, split], outputs=import_outputs, **private)
    tab.export_btn.click(
        h.export,
        inputs=[
            tab.export_format,
            tab.export_type,
            tab.export_split,
            tab.export_votes,
            tab.export_leave_out,
            tab.export_judges,
            tab.export_self,
        ],
        outputs=[tab.export_message, tab.export_file],
        **private,
    )
    return tab
