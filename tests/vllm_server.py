"""A real vLLM server for tests and benchmarks: `python -m vllm.entrypoints.openai.api_server`
from .venv-vllm (which `make test` installs: the Makefile's `.venv-vllm/.stamp`), on loopback,
with runtime LoRA loading on. It is its own process group, so `kill` ends its engine too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
START_S = 600  # a cold start on a busy 2-core machine; it took 35-47 s there


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` from .venv-vllm, serving `model_dir`."""

    def __init__(self, model_dir: Path, log: Path, kv_cache_gib: int = 1) -> None:
        self.model_dir, self.log, self.port = model_dir, log, free_port()
        self.kv_cache_gib = kv_cache_gib
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen[bytes] | None = None
        self.start_s: list[float] = []

    def start(self) -> None:
        """Start and wait until it lists its models; RuntimeError (with its log) if it dies."""
        env = os.environ | {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),  # GiB
        }
        args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", "base",
                "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "2048",
                "--enable-lora", "--max-lora-rank", "64",
                "--generation-config", "vllm"]  # fmt: skip
        t0 = time.monotonic()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        while time.monotonic() - t0 < START_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    self.start_s.append(time.monotonic() - t0)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM did not answer within {START_S} s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server and its engine process (a crash, not a shutdown)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
