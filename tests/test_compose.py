"""deploy/compose.gpu.yml is checked by reading it (no Docker engine or image registry here):
three services, GPUs for the app and vLLM, flags the app's own parser accepts, the adapters
volume at one path in both, a PostgreSQL URL the app takes, and no secret in the repository."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml  # PyYAML: installed with transformers, huggingface_hub and datasets

from app.__main__ import build_parser
from app.config import adapters_dir
from dpo_core.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose.gpu.yml"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
SECRETS = ("HF_TOKEN", "POSTGRES_PASSWORD", "PGPASSWORD")
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")
GENERATION_FLAG = "--generation-url"  # issue 26 item 1, built on another branch


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def flag(command: list[str], name: str) -> str:
    """The value after `name` in an argv list."""
    return command[command.index(name) + 1]


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """volume name -> (path in the container, mode) for a service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out[source] = (target, mode[0] if mode else "rw")
    return out


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_three_services_and_gpus_for_the_app_and_vllm(services):
    assert {"app", "vllm", "postgres"} <= set(services)
    for name in ("app", "vllm"):
        (device,) = gpu_devices(services[name])
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
    assert not gpu_devices(services["postgres"])
    assert services["app"]["build"]["context"] == ".."
    assert (COMPOSE.parent / ".." / services["app"]["build"]["dockerfile"]).is_file()


def test_vllm_serves_the_apps_base_with_runtime_lora_loading(services):
    vllm, app = services["vllm"], services["app"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm["image"])  # pinned, not latest
    command = vllm["command"]
    assert flag(command, "--model") == flag(app["command"], "--model")
    assert flag(command, "--model") == "meta-llama/Llama-3.1-8B-Instruct"
    assert "--enable-lora" in command
    assert flag(command, "--quantization") == "bitsandbytes"  # the 4-bit base, as the app's
    assert "--load-in-4bit" in app["command"]
    # Every adapter the app trains by default fits vLLM's LoRA slots.
    assert TrainConfig().lora_r <= int(flag(command, "--max-lora-rank")) == 64
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    url = urlsplit(flag(app["command"], GENERATION_FLAG))
    assert (url.hostname, url.port, url.path) == ("vllm", int(flag(command, "--port")), "/v1")
    assert "ports" not in vllm  # /v1/load_lora_adapter loads any path: not published


def test_app_command_uses_flags_the_app_accepts(services):
    command = services["app"]["command"]
    parser = build_parser()
    known = {s for action in parser._actions for s in action.option_strings}
    unknown = [arg for arg in command if arg.startswith("--") and arg not in known]
    assert unknown in ([], [GENERATION_FLAG]), unknown
    if unknown:
        i = command.index(GENERATION_FLAG)
        parser.parse_args(command[:i] + command[i + 2 :])
        pytest.skip(f"{GENERATION_FLAG} (issue 26 item 1) is not in this tree yet")
    args = parser.parse_args(command)
    assert (args.host, args.load_in_4bit) == ("0.0.0.0", True)
    assert args.auth_file == Path(services["app"]["environment"]["DPO_STUDIO_AUTH_FILE"])
    assert f"{args.port}:{args.port}" in services["app"]["ports"]


def test_adapters_volume_is_at_the_same_path_in_the_app_and_vllm(services):
    data_dir = re.search(r"DPO_STUDIO_DATA=(\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    app_target, app_mode = mounts(services["app"])["adapters"]
    vllm_target, vllm_mode = mounts(services["vllm"])["adapters"]
    assert app_target == vllm_target == str(adapters_dir(Path(data_dir)))
    assert (app_mode, vllm_mode) == ("rw", "ro")
    # Both run as the image's uid 1000, after the init service made the volumes theirs.
    assert services["vllm"]["user"] == "1000:1000"
    assert "chown 1000:1000" in services["volumes-init"]["command"][-1]
    for name in ("app", "vllm"):
        depends = services[name]["depends_on"]["volumes-init"]
        assert depends["condition"] == "service_completed_successfully"


def test_postgres_url_has_the_apps_scheme_and_no_password(services):
    app, postgres = services["app"], services["postgres"]
    url = urlsplit(flag(app["command"], "--db"))
    assert url.scheme == "postgresql+psycopg"  # storage.db refuses other back ends
    assert url.password is None  # libpq reads PGPASSWORD from the environment
    assert url.hostname == "postgres" and url.username == postgres["environment"]["POSTGRES_USER"]
    assert url.path == "/" + postgres["environment"]["POSTGRES_DB"]
    same = INTERPOLATION.match(app["environment"]["PGPASSWORD"]).group(1)
    assert same == INTERPOLATION.match(postgres["environment"]["POSTGRES_PASSWORD"]).group(1)
    assert mounts(postgres)["pgdata"][0] == "/var/lib/postgresql/data"


def test_no_secret_values_are_committed(services):
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            if key in SECRETS or re.search(r"TOKEN|PASSWORD|SECRET|_KEY", key):
                assert INTERPOLATION.fullmatch(str(value)), f"{name}: {key} is a literal"
    text = COMPOSE.read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{20,}|postgresql\+psycopg://[^@\s/]*:[^@\s]*@", text)
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example == {"HF_TOKEN": "", "POSTGRES_PASSWORD": ""}
    documented = set(INTERPOLATION.findall(ENV_EXAMPLE.read_text())) | set(
        re.findall(r"^#? ?(\w+)=", ENV_EXAMPLE.read_text(), re.MULTILINE)
    )
    assert set(INTERPOLATION.findall(text)) <= documented  # every variable is in the example
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert "deploy" in (ROOT / ".dockerignore").read_text().split()  # .env stays out of builds


def test_healthchecks_probe_the_served_ports(services):
    app, vllm = services["app"], services["vllm"]
    assert f"http://127.0.0.1:{flag(app['command'], '--port')}/" in app["healthcheck"]["test"][-1]
    vllm_health = f"http://127.0.0.1:{flag(vllm['command'], '--port')}/health"
    assert vllm_health in vllm["healthcheck"]["test"][-1]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    for name in ("postgres", "vllm"):
        assert app["depends_on"][name]["condition"] == "service_healthy"
    for name in ("app", "vllm", "postgres"):
        assert "start_period" in services[name]["healthcheck"], name


def test_every_named_volume_is_declared(services):
    declared = set(yaml.safe_load(COMPOSE.read_text())["volumes"])
    used = {source for service in services.values() for source in mounts(service)}
    assert used == declared == {"pgdata", "studio-data", "adapters", "model-cache"}


def test_deployment_page_links_the_file_and_says_it_was_not_run():
    page = (ROOT / "docs" / "deployment.md").read_text()
    section = page[page.index("## A GPU host with vLLM and PostgreSQL") :]
    assert "(../deploy/compose.gpu.yml)" in section
    assert "Not built or run here" in section and "tests/test_compose.py" in section
