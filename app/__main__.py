"""`python -m app`: serve DPO Studio (Label, Train, Compare) in the browser."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import AppConfig
from common.cli import setup_logging
from storage.db import default_data_dir


@dataclass
class AppState:
    config: AppConfig
    lm: Any
    model_name: str
    services: Any = None  # app.services.Services: database, model versions, training, compare
    judge: Any = None  # dpo_core.judge.Judge: suggestions beside each pair (None: no judge)


def build_parser() -> argparse.ArgumentParser:
    from dpo_core.modeling import add_model_args

    p = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    p.add_argument(
        "--host",
        default=os.environ.get("DPO_STUDIO_HOST", "127.0.0.1"),
        help="bind address (default $DPO_STUDIO_HOST or 127.0.0.1)",
    )
    p.add_argument("--port", type=int, default=7860)
    add_model_args(p, adapter=False)
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="database and adapters (default $DPO_STUDIO_DATA or ./data)",
    )
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default sqlite in the data dir)")
    p.add_argument(
        "--auth-file",
        type=Path,
        default=os.environ.get("DPO_STUDIO_AUTH_FILE") or None,
        help="users file: turns sign-in and roles on (manage it with `python -m app users`)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    add_judge_flags(p)
    from app.serving.flags import add_serving_flags

    add_serving_flags(p)
    return p


def add_judge_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("AI judge (suggestions beside each pair)")
    g.add_argument("--judge", default=None, help="a local judge: embedded, a HF id or a directory")
    g.add_argument("--judge-url", default=None, help="an OpenAI-compatible API, e.g. .../v1")
    g.add_argument("--judge-model", default=None, help="the model name --judge-url serves")
    g.add_argument(
        "--judge-key-env",
        default="DPO_STUDIO_JUDGE_KEY",
        help="environment variable holding the endpoint's API key (never stored)",
    )


def config_from_args(args: argparse.Namespace) -> AppConfig:
    from app.label.team import JudgeSettings
    from app.serving.flags import engine_limits

    return AppConfig(
        model=args.model,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        device=args.device,
        data_dir=args.data_dir or default_data_dir(),
        db_url=args.db,
        host=args.host,
        port=args.port,
        auth_file=args.auth_file,
        engine_limits=engine_limits(args),
        judge=JudgeSettings(args.judge, args.judge_url, args.judge_model, args.judge_key_env),
        prefetch=not args.no_prefetch,
        queue_order=args.queue_order,
        generation_url=args.generation_url,
    )


class StartupError(Exception):
    """The app cannot start; the message says why and what to change."""


def data_dir_problem(data_dir: Path) -> str | None:
    """Why votes and adapters could not be saved in `data_dir`, or None when they can."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the data directory {data_dir}: {err.strerror}"
    if not os.access(data_dir, os.W_OK):
        return (
            f"the data directory {data_dir} is read-only (a read-only file system or no write "
            "permission); the database and adapter versions are written there. Use --data-dir "
            "(or $DPO_STUDIO_DATA) to point at a writable directory."
        )
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["users"]:
        from app.auth.cli import main as users_main

        return users_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, server=True)
    try:
        config = config_from_args(args)
        sign_in = sign_in_for(config)
        state = start(config)
    except (StartupError, ValueError) as err:  # ValueError: flags that do not go together
        print(f"error: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, systemd: end as Ctrl-C does
    serve(state, sign_in)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C: Gradio stops serving and `serve` closes the services (the default
    would end the process at once, with the training watcher perhaps loading weights)."""
    raise KeyboardInterrupt


def sign_in_for(config: AppConfig) -> dict[str, Any]:
    """Gradio's launch options for the sign-in gate, checked before anything slow is loaded;
    StartupError for a bad users file or an unusable data directory."""
    from app.auth.users import AuthFileError
    from app.auth.web import sign_in_options

    try:
        sign_in = sign_in_options(config.auth_file, config.host)
    except AuthFileError as err:
        raise StartupError(err) from err
    problem = data_dir_problem(config.data_dir)
    if problem:
        raise StartupError(problem)
    return sign_in


def start(config: AppConfig) -> AppState:
    """Load the model and open the services (database, versions, training, compare)."""
    from app.label.team import make_judge
    from app.services import open_services
    from dpo_core.modeling import ModelLoadError, load_model
    from storage.db import StorageError

    try:
        lm = load_model(
            config.model, dtype=config.dtype, load_in_4bit=config.load_in_4bit, device=config.device
        )
        judge = make_judge(config.judge, config.device) if config.judge else None
        services = open_services(config, lm)
    except (ModelLoadError, StorageError) as err:
        raise StartupError(err) from err
    return AppState(config=config, lm=lm, model_name=config.model, services=services, judge=judge)


def serve(state: AppState, sign_in: dict[str, Any]) -> None:
    """Build the page, add the vote route inside the sign-in gate, and serve until stopped;
    then close the services, however serving ended (Ctrl-C, an error)."""
    from app.auth.web import share_sign_in

    try:
        share_sign_in(sign_in, state.services.sm)  # replicas: sessions in the shared database
        demo = build_demo(state, sign_in)
        demo.queue().launch(server_name=state.config.host, server_port=state.config.port, **sign_in)
    finally:
        if state.services is not None:
            state.services.close()


def build_demo(state: AppState, sign_in: dict[str, Any]) -> Any:
    """The page, with the Label service behind it and its vote route added to `sign_in`'s
    middleware (inside the sign-in gate)."""
    from starlette.middleware import Middleware

    from app.label.route import VoteRoute
    from app.label.service import open_label_service
    from app.serving.flags import for_device
    from app.ui import build_ui

    config, services = state.config, state.services
    if config.engine_limits is not None:
        engine = services.models.engine
        remote = services.models.remote is not None  # the server's device, not this one's
        engine.limits = (
            config.engine_limits
            if remote
            else for_device(config.engine_limits, services.models.lm.device)
        )
    label = open_label_service(
        services.sm,
        services.models,
        config.model,
        config.data_dir,
        prefetch=config.prefetch,
        judge=state.judge,
        queue_order=config.queue_order,
    )
    demo = build_ui(state, label)
    # Everything loaded so far (model, tokenizer, Gradio) lives as long as the app: keep it out
    # of the collector's full passes, whose pauses otherwise stall every request.
    gc.collect()
    gc.freeze()
    # Votes get a plain HTTP route (app/label/route.py), inside the sign-in gate.
    app_kwargs = sign_in.setdefault("app_kwargs", {})
    vote_route = Middleware(VoteRoute, service=label)
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), vote_route]
    return demo


if __name__ == "__main__":
    sys.exit(main())
