"""The Data tab's agreement panel: how much annotators agree, how each one votes, the most
contested pairs, how often people follow the AI judge and agree with a version's own labels,
and the overlap setting (admins).

The statistics are `storage.agreement`'s (people's votes only: models' votes are no
annotator's, storage/annotators.py) and `storage.self_labels`'; the overlap rule is
`storage.overlap`'s. This module
turns them into tables and messages, and gives them endpoints (`/agreement`, `/set_overlap`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from sqlalchemy.orm import Session, sessionmaker

from app.auth.users import ADMIN, request_role, require_role
from storage.agreement import (
    AgreementReport,
    JudgeFollowed,
    agreement_report,
    judge_followed,
    label_event_counts,
    load_judgements,
)
from storage.overlap import overlap_k, set_overlap_k
from storage.self_labels import SelfLabelAgreement, self_label_agreement

ANNOTATOR_COLUMNS = [
    "annotator",
    "votes",
    "agrees with majority",
    "compared pairs",
    "median s",
    "left side",
    "position bias",
    "skips",
    "regenerations",
]
CONTESTED_COLUMNS = ["responses", "votes", "first", "second", "tie", "both_bad", "disagreement"]


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


@dataclass(frozen=True)
class AgreementView:
    report: AgreementReport
    judges: list[JudgeFollowed]
    overlap_k: int
    self_labels: list[SelfLabelAgreement] = field(default_factory=list)

    def summary(self) -> str:
        r = self.report
        lines = [
            f"**Krippendorff's alpha:** {_num(r.alpha)} · **Gwet's AC1:** {_num(r.ac1)} · "
            f"over **{r.units_with_overlap}** pairs with two or more votes",
            f"**Overlap:** each pair is judged by {self.overlap_k} annotator(s)",
        ]
        if r.units_with_overlap == 0:
            lines.append("Agreement needs pairs judged by two or more people: raise the overlap.")
        lines += [
            f"**{j.judge}:** followed on {j.followed} of {j.shown} votes ({_pct(j.rate)})"
            for j in self.judges
        ]
        lines += [row.sentence() for row in self.self_labels]
        return "  \n".join(lines)

    def annotator_frame(self) -> pd.DataFrame:
        rows = [
            [
                q.annotator,
                q.votes,
                _pct(q.agreement_with_majority),
                q.compared_units,
                _num(q.median_seconds, ".1f"),
                _pct(q.share_left),
                f"yes (p={q.side_p_value:.3g})" if q.side_biased else "no",
                q.skips,
                q.regenerations,
            ]
            for q in self.report.annotators
        ]
        return pd.DataFrame(rows, columns=ANNOTATOR_COLUMNS)

    def contested_frame(self) -> pd.DataFrame:
        rows = [
            [f"{u.unit[0]} / {u.unit[1]}", u.votes]
            + [u.counts.get(v, 0) for v in ("first", "second", "tie", "both_bad")]
            + [f"{u.disagreement:.0%}"]
            for u in self.report.contested
            if u.disagreement > 0
        ]
        return pd.DataFrame(rows, columns=CONTESTED_COLUMNS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "overlap_k": self.overlap_k,
            **asdict(self.report),
            "judges": [asdict(j) | {"rate": j.rate} for j in self.judges],
            "self_labels": [asdict(r) | {"rate": r.rate} for r in self.self_labels],
        }


class AgreementService:
    """Reads agreement from the database; sets the overlap. `team_size` says how many people
    can label (the users file's users with sign-in on), None when unknown."""

    def __init__(
        self,
        sm: sessionmaker[Session],
        team_size: Callable[[], int | None],
        judge_label: Callable[[int], str] | None = None,
    ) -> None:
        self.sm, self.team_size = sm, team_size
        self.judge_label = judge_label  # LabelService.judge_label when the app has a judge

    def run_judge(self, count: Any) -> str:
        """Let the AI judge label `count` pairs (ValueError: no judge, or a bad count)."""
        if self.judge_label is None:
            raise ValueError("No AI judge: start the app with --judge or --judge-url.")
        try:
            count = int(count)
        except (TypeError, ValueError) as err:
            raise ValueError(f"the number of pairs must be a whole number; got {count!r}") from err
        return self.judge_label(count)

    def view(self) -> AgreementView:
        with self.sm.begin() as s:
            report = agreement_report(load_judgements(s), events=label_event_counts(s))
            return AgreementView(report, judge_followed(s), overlap_k(s), self_label_agreement(s))

    def set_overlap(self, k: Any) -> str:
        """Set k; a message for the admin. Raises ValueError for a bad k."""
        try:
            k = int(k) if float(k) == int(float(k)) else k
        except (TypeError, ValueError) as err:
            raise ValueError(f"overlap must be a whole number of annotators; got {k!r}") from err
        with self.sm.begin() as s:
            set_overlap_k(s, k, self.team_size())
        if k == 1:
            return "Overlap off: each pair is judged once."
        return f"Each pair is now judged by {k} annotators: queues offer judged pairs first."

    def export_json(self) -> Path:
        fd, name = tempfile.mkstemp(prefix="agreement-", suffix=".json")
        with open(fd, "w", encoding="utf-8") as fh:
            json.dump(self.view().to_dict(), fh, indent=2)
        return Path(name)


@dataclass
class AgreementPanel:
    summary: gr.Markdown
    annotators: gr.Dataframe
    contested: gr.Dataframe
    overlap: gr.Number
    overlap_btn: gr.Button
    overlap_message: gr.Markdown
    download_btn: gr.Button
    download: gr.File
    judge_row: gr.Row
    judge_count: gr.Number
    judge_btn: gr.Button


def refresh(service: AgreementService, panel: AgreementPanel) -> dict[Any, Any]:
    view = service.view()
    return {
        panel.summary: view.summary(),
        panel.annotators: view.annotator_frame(),
        panel.contested: view.contested_frame(),
        panel.overlap: view.overlap_k,
    }


def set_overlap(
    service: AgreementService, panel: AgreementPanel, k: float, request: gr.Request
) -> dict[Any, Any]:
    require_role(request, ADMIN, "change the overlap")
    try:
        message = f"✅ {service.set_overlap(k)}"
    except ValueError as err:
        return {panel.overlap_message: f"⚠️ {err}"}
    return {panel.overlap_message: message, **refresh(service, panel)}


def layout() -> AgreementPanel:
    with gr.Accordion("Agreement between annotators", open=False, elem_id="data-agreement"):
        summary = gr.Markdown(elem_id="agreement-summary")
        annotators = gr.Dataframe(
            headers=ANNOTATOR_COLUMNS,
            label="Per annotator",
            interactive=False,
            elem_id="agreement-annotators",
        )
        contested = gr.Dataframe(
            headers=CONTESTED_COLUMNS,
            label="Most contested pairs (response ids)",
            interactive=False,
            elem_id="agreement-contested",
        )
        with gr.Row():
            overlap = gr.Number(
                value=1,
                precision=0,
                minimum=1,
                label="Annotators per pair (admins)",
                elem_id="agreement-overlap",
            )
            overlap_btn = gr.Button("Set overlap", scale=0, elem_id="agreement-set-overlap")
            download_btn = gr.Button("Download", scale=0, elem_id="agreement-download")
        with gr.Row(visible=False) as judge_row:
            judge_count = gr.Number(
                value=10, precision=0, minimum=1, label="Pairs for the AI judge to label (admins)"
            )
            judge_btn = gr.Button("Let the judge label", scale=0, elem_id="agreement-judge")
        overlap_message = gr.Markdown(elem_id="agreement-message")
        download = gr.File(label="Agreement", interactive=False, visible=False)
    return AgreementPanel(
        summary,
        annotators,
        contested,
        overlap,
        overlap_btn,
        overlap_message,
        download_btn,
        download,
        judge_row,
        judge_count,
        judge_btn,
    )


def build_agreement_panel(
    service: AgreementService, demo: gr.Blocks, tab_block: gr.Tab | None = None
) -> AgreementPanel:
    """Declare the panel inside the open Data tab and wire its events."""
    panel = layout()
    outputs = [panel.summary, panel.annotators, panel.contested, panel.overlap]
    private = {"api_visibility": "private"}
    demo.load(lambda: refresh(service, panel), outputs=outputs, **private)
    if tab_block is not None:
        tab_block.select(lambda: refresh(service, panel), outputs=outputs, **private)

    def on_set(k: float, request: gr.Request) -> dict[Any, Any]:
        return set_overlap(service, panel, k, request)

    def on_download(request: gr.Request) -> dict[Any, Any]:
        require_role(request, ADMIN, "export data")
        return {panel.download: gr.File(value=str(service.export_json()), visible=True)}

    panel.overlap_btn.click(
        on_set, inputs=[panel.overlap], outputs=[panel.overlap_message, *outputs], **private
    )
    panel.download_btn.click(on_download, outputs=[panel.download], **private)

    def show_admin_controls(request: gr.Request) -> dict[Any, Any]:
        admin = request_role(request) == ADMIN
        return {
            panel.overlap_btn: gr.Button(visible=admin),
            panel.judge_row: gr.Row(visible=admin and service.judge_label is not None),
        }

    def on_judge(count: float, request: gr.Request) -> dict[Any, Any]:
        require_role(request, ADMIN, "let the judge label")
        try:
            message = f"✅ {service.run_judge(count)}"
        except ValueError as err:
            return {panel.overlap_message: f"⚠️ {err}"}
        return {panel.overlap_message: message, **refresh(service, panel)}

    demo.load(show_admin_controls, outputs=[panel.overlap_btn, panel.judge_row], **private)
    panel.judge_btn.click(
        on_judge, inputs=[panel.judge_count], outputs=[panel.overlap_message, *outputs], **private
    )
    return panel


def register_api(service: AgreementService) -> None:
    """/agreement (anyone signed in) and /set_overlap (admins)."""

    def agreement() -> dict[str, Any]:
        """Alpha, AC1, per-annotator quality, contested pairs, judges followed, people's
        agreement with each version's own labels, overlap k."""
        return service.view().to_dict()

    def set_overlap_api(k: int, request: gr.Request = None) -> str:  # type: ignore[assignment]
        """Set how many annotators judge each pair (1 = no overlap). Admins only."""
        require_role(request, ADMIN, "change the overlap")
        try:
            return service.set_overlap(k)
        except ValueError as err:
            raise gr.Error(str(err), title="Overlap") from err

    def judge_label_api(count: int = 10, request: gr.Request = None) -> str:  # type: ignore[assignment]
        """Let the AI judge label `count` pairs of its queue as `judge:<name>`. Admins only."""
        require_role(request, ADMIN, "let the judge label")
        try:
            return service.run_judge(count)
        except ValueError as err:
            raise gr.Error(str(err), title="AI judge") from err

    gr.api(agreement, api_name="agreement")
    gr.api(judge_label_api, api_name="judge_label")
    gr.api(set_overlap_api, api_name="set_overlap")
