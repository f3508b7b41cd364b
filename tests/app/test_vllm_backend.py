"""`python -m app --generation-url`: every answer from a real vLLM server (its CPU build, from
.venv-vllm, which `make test` installs), started here on loopback with a tiny random Llama
(head size 64, which vLLM's CPU attention takes). Through the app's services and a real
SQLite database: a pair labeled with answers from vLLM, v1 trained and loaded into vLLM,
answering unlike the base; the server killed mid-answer (the page says so, a vote is still
stored, the pair completes after the restart, v1 loaded again); adapters the server refuses;
the server down at start. When vLLM cannot run here the tests that need it skip, saying why."""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from app.config import AppConfig
from app.label.modes import DEFAULT_MODE
from app.label.service import LabelService, LabelSettings, PairProgress, open_label_service
from app.label.texts import status_text
from app.services import Services, open_services
from app.train import worker
from app.train.service import TrainRequest
from dpo_core.generation import SamplingParams
from dpo_core.modeling import ModelLoadError, load_model
from storage import runs
from storage.models import Preference
from tests.tiny import build_tiny_tokenizer, save_random_adapter
from tests.vllm_server import VLLM_PYTHON, VllmServer, free_port

ROOT = Path(__file__).resolve().parents[2]
SHORT = LabelSettings(max_new_tokens=16)
LONG = LabelSettings(temperatures=(1.0, 1.0), max_new_tokens=1500)


def save_tiny_model_64(path: Path) -> Path:
    """The tests' tiny chat model with head size 64 (vLLM's CPU attention has no 16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def served_roots(server: VllmServer) -> dict[str, str]:
    """Each model the server lists, and the directory it read it from."""
    models = httpx.get(f"{server.url}/models", timeout=10).json()["data"]
    return {m["id"]: m["root"] for m in models}


def save_adapter_of_rank(model_dir: Path, path: Path, rank: int) -> Path:
    from dpo_core.modeling import LoraSettings, attach_lora, save_adapter

    lm = load_model(str(model_dir), dtype="fp32", device="cpu")
    return save_adapter(attach_lora(lm.model, LoraSettings(r=rank, alpha=2 * rank)), path)


def vllm_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "vLLM's CPU build runs on Linux only"
    if not VLLM_PYTHON.exists() or not (ROOT / ".venv-vllm" / ".stamp").exists():
        log = ROOT / ".venv-vllm.log"
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        why = f"its install failed: {lines[-1]} (.venv-vllm.log)" if lines else "not installed"
        return f"vLLM in .venv-vllm: {why}; `make .venv-vllm/.stamp` installs it"
    return None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_64(tmp_path_factory.mktemp("tiny-llama-64"))


@pytest.fixture(scope="module")
def vllm(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """One server for the module (the kill test starts it once more)."""
    if reason := vllm_unavailable():
        pytest.skip(reason)
    server = VllmServer(model_dir, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        server.start()
    except RuntimeError as err:
        pytest.skip(f"vLLM cannot run on this machine: {err}")
    yield server
    server.stop()
    print(f"vLLM server starts: {[round(s, 1) for s in server.start_s]} s")


def studio(model_dir: Path, data_dir: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> Services:
    """The app's services as `python -m app --generation-url URL` opens them; training runs
    its worker here, in process, when the test says so."""
    config = AppConfig(model=str(model_dir), dtype="fp32", device="cpu", data_dir=data_dir,
                       generation_url=url)  # fmt: skip
    lm = load_model(str(model_dir), dtype="fp32", device="cpu")
    services = open_services(config, lm)
    monkeypatch.setattr(services.training, "_launch", lambda run_id, devices=1: None)
    return services


def label(services: Services, model_dir: Path, data_dir: Path) -> LabelService:
    return open_label_service(
        services.sm, services.models, str(model_dir), data_dir, prefetch=False
    )


def labeled_pair(
    service: LabelService, prompt: str, settings: LabelSettings = SHORT
) -> PairProgress:
    last = list(service.generate_pair("ann", typed=prompt, settings=settings))[-1]
    assert last.done and all(a.response_id for a in last.answers), last
    return last


def served_logprobs(url: str, model: str, prompt: str) -> list[float]:
    """The server's greedy answer by `model` as its tokens' log-probs (16 tokens, never ended
    early: a tiny random model's answers may be empty text, its log-probs are not)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 1}  # fmt: skip
    response = httpx.post(f"{url}/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["logprobs"]["token_logprobs"]


def vote(service: LabelService, pair: PairProgress, choice: str = "a") -> None:
    a, b = (answer.response_id for answer in pair.answers)
    assert a is not None and b is not None
    assert service.vote("ann", a, b, choice).new


def test_a_pair_from_vllm_then_v1_trained_loaded_there_and_answering_unlike_the_base(
    vllm: VllmServer, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    services = studio(model_dir, tmp_path, vllm.url, monkeypatch)
    remote = services.models.remote
    assert remote is not None and remote.check() == "base"
    service = label(services, model_dir, tmp_path)
    for i, topic in enumerate(("cats", "rain", "tea", "maps", "jazz")):
        vote(service, labeled_pair(service, f"Tell me about {topic}."), "ab"[i % 2])
    started = services.training.start(
        TrainRequest(epochs=1, lora_r=8, max_length=64, heldout_fraction=0.0, learning_rate=2e-2)
    )
    assert started.ok, started.message
    assert worker.run_job(services.sm, started.run_id, tmp_path) == 0
    assert services.training.status(started.run_id).status == "succeeded"  # and now served
    assert services.models.active == "v1" and "v1" in remote.served_models()
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=24)
    both = services.models.generate("Tell me about cats.", ["base", "v1"], seed=1, params=greedy)
    assert both.done  # (the tiny random model may end both answers at once: compare below)
    base, v1 = (served_logprobs(vllm.url, m, "Tell me about owls.") for m in ("base", "v1"))
    assert base != v1, "v1 answers as the base does on the server: its adapter is not applied"
    after = labeled_pair(service, "Tell me about owls.")
    assert after.version == "v1"
    services.close()


def test_the_server_killed_mid_answer_says_so_loses_no_vote_and_the_pair_completes_after_restart(
    vllm: VllmServer, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    adapter = save_random_adapter(model_dir, tmp_path / "adapters" / "v1")
    services = studio(model_dir, tmp_path, vllm.url, monkeypatch)
    with services.sm.begin() as s:
        v1 = runs.register_adapter_version(s, base_model=str(model_dir), adapter_path=str(adapter))
        runs.activate_version(s, v1.id)
    services.training.sync_active_version()  # v1 to the server (replacing the first test's)
    assert services.models.active == "v1" and served_roots(vllm)["v1"] == str(adapter.resolve())
    service = label(services, model_dir, tmp_path)
    earlier = labeled_pair(service, "Name a colour.")
    seen: list[PairProgress] = []
    writing = threading.Event()

    def read() -> None:
        for progress in service.generate_pair("ann", typed="Write a long story.", settings=LONG):
            seen.append(progress)
            if progress.answers and any(a.text for a in progress.answers):
                writing.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert writing.wait(300), seen[-1:]
    vllm.kill()
    while not any(p.waiting and p.notice and "not answering" in p.notice for p in seen):
        assert reader.is_alive(), seen[-1]
        time.sleep(0.2)
    vote(service, earlier, "b")  # while the server is down: stored all the same
    vllm.start()  # it knows no adapter now: v1 is loaded again on the first request's 404
    reader.join(600)
    assert not reader.is_alive()
    last = seen[-1]
    assert last.done and last.version == "v1" and all(a.response_id for a in last.answers)
    assert "v1" in services.models.remote.served_models()
    with services.sm.begin() as s:
        assert s.scalar(select(func.count()).select_from(Preference)) == 1
    services.close()


def test_an_adapter_the_server_cannot_read_or_load_is_refused_in_words(
    vllm: VllmServer, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    services = studio(model_dir, tmp_path, vllm.url, monkeypatch)
    remote = services.models.remote
    assert remote is not None
    with pytest.raises(ModelLoadError, match="must read the adapter directory at this same path"):
        remote.add_version("v7", str(tmp_path / "not-there"))
    services.close()
    refused = save_adapter_of_rank(model_dir, tmp_path / "adapters" / "v1", rank=128)
    with services.sm.begin() as s:  # the server takes rank 64 at most
        v1 = runs.register_adapter_version(s, base_model=str(model_dir), adapter_path=str(refused))
        runs.activate_version(s, v1.id)
    with pytest.raises(ModelLoadError, match=r"refused version v1 .*max_lora_rank 64"):
        studio(model_dir, tmp_path, vllm.url, monkeypatch)  # at start, before serving anyone


def test_the_server_down_at_start_the_app_starts_and_a_pair_waits_saying_why(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    services = studio(tiny_model_dir, tmp_path, url, monkeypatch)
    service = label(services, tiny_model_dir, tmp_path)
    stream = service.generate_pair("ann", typed="Hello?", settings=SHORT)
    for progress in stream:
        if progress.waiting and progress.notice:
            page = status_text(progress, DEFAULT_MODE)  # the Label page's status line
            assert page.startswith(f"⏳ The generation server ({url}) is not answering"), page
            assert "starts again as soon as the server is back" in page
            break
    stream.close()  # the tab closed: the request is cancelled
    services.close()


def test_compare_with_the_server_down_says_so_instead_of_holding_the_page(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Compare waits for its answers in one call: while the server is down it gives up in words
    (the Label tab's requests wait and say so instead)."""
    import gradio as gr

    from app.compare.tab import CompareHandlers, layout
    from app.serving.versions import SERVER_DOWN

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    services = studio(tiny_model_dir, tmp_path, url, monkeypatch)
    try:
        with gr.Blocks():
            tab = layout(services.compare)
        h = CompareHandlers(services.compare, tab, random.Random(0))
        out = h.side_by_side("base", "base", "Hello?", 0)
        assert out == {tab.message: f"⚠️ {SERVER_DOWN}"}
        assert "try again when it is back" in SERVER_DOWN
        for _ in range(600):  # the request is given up, not left in the line (bounded wait)
            if services.models.engine.waiting() == 0:
                break
            time.sleep(0.1)
        assert services.models.engine.waiting() == 0, "the cancelled request stayed in line"
    finally:
        services.close()
