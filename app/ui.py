"""Gradio Blocks layout. Handlers live in their own modules; this file only declares the UI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from app.auth.users import UserStore
from app.compare.leaderboard_tab import build_leaderboard
from app.compare.leaderboard_tab import register_api as register_leaderboard_api
from app.compare.tab import build_compare_tab
from app.compare.tab import register_api as register_compare_api
from app.data.agreement import AgreementService, build_agreement_panel
from app.data.agreement import register_api as register_agreement_api
from app.data.service import DataService
from app.data.tab import build_data_tab
from app.data.tab import register_api as register_data_api
from app.label.api import register_api as register_label_api
from app.label.queue_panel import build_queue_panel
from app.label.service import LabelService, open_label_service
from app.label.tab import build_label_tab
from app.train.export_panel import build_export_panel
from app.train.export_panel import register_api as register_export_api
from app.train.tab import build_train_tab
from app.train.tab import register_api as register_train_api
from app.train.version_panel import build_version_panel
from app.train.version_panel import register_api as register_version_api

TITLE = "DPO Studio"


def team_size(auth_file: Path | None) -> Callable[[], int | None]:
    """How many people can label: the users file's users (read afresh: users come and go);
    unknown without sign-in."""
    if auth_file is None:
        return lambda: None
    return lambda: len(UserStore(Path(auth_file)).users())


def build_ui(state: Any, label: LabelService | None = None) -> gr.Blocks:
    """Build the app. `state` carries the loaded model, the sessionmaker and the config;
    `label` is the Label tab's service (opened here if not given)."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nLabel answer pairs, train DPO, compare versions.")
        label = label or open_label_service(
            state.services.sm, state.services.models, state.config.model, state.config.data_dir
        )
        training = state.services.training
        with gr.Tab("Label"):
            build_label_tab(service=label, demo=demo)
        with gr.Tab("Train") as train_tab:
            build_train_tab(training, train_tab, state.services.self_labels)
            build_version_panel(service=training, demo=demo, tab_block=train_tab)
            build_export_panel(training, demo, train_tab)
        with gr.Tab("Compare") as compare_tab:
            build_compare_tab(service=state.services.compare, tab_block=compare_tab)
            build_leaderboard(state.services.sm, state.config.model, compare_tab)
        data = DataService(state.services.sm, Path(get_upload_folder()) / "dpo-studio-exports")
        judge = label.judge_label if label.suggestions.judge is not None else None
        agreement = AgreementService(state.services.sm, team_size(state.config.auth_file), judge)
        with gr.Tab("Data") as data_tab:
            build_data_tab(service=data, demo=demo, tab_block=data_tab)
            build_agreement_panel(service=agreement, demo=demo, tab_block=data_tab)
            build_queue_panel(label.scorer, demo, data_tab)
        register_label_api(label)
        register_train_api(training)
        register_compare_api(state.services.compare)
        register_data_api(data)
        register_agreement_api(agreement)
        register_version_api(training)
        register_export_api(training)
        register_leaderboard_api(state.services.sm, state.config.model)
    return demo
