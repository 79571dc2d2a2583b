"""Faults of the machine and mistakes of the user: each named in one message, nothing lost, no traceback.

A managed local server is stood in for by the fake OpenAI server run as its command, dying by a signal on
its first chat request (like llama.cpp built with AMX kernels on an AMX CPU) or after N answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from datasets import DatasetDict

from st_synth.cli import main
from st_synth.common.names import REPORT_FILE
from st_synth.generation import local_llm
from st_synth.generation.cache import AnswerCache
from st_synth.generation.client import describe_connection_error
from st_synth.generation.local_llm import PORTABLE_CMAKE_ARGS, LocalLLMServer, LocalServerError
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
FAKE_MODEL = "fake-llm"


@pytest.fixture
def stand_in(monkeypatch):
    """``stand_in(llama=..., transformers=...)``: each backend's server becomes the fake server, dying after
    that many answers (None: never). Both backends count as installed."""

    def install(llama: int | None = None, transformers: int | None = None, sig: str = "SIGSEGV") -> None:
        die_after = {"llama.cpp": llama, "transformers": transformers}

        def command(self):
            base = [sys.executable, "-m", "st_synth.testing.openai_server", "--port", str(self.port),
                    "--model", FAKE_MODEL, "--no-fence"]  # fmt: skip
            after = die_after[self.backend]
            return base if after is None else [*base, "--die-after", str(after), "--die-signal", sig]

        real = local_llm.resolve_backend
        monkeypatch.setattr(
            local_llm,
            "resolve_backend",
            lambda backend="auto": "llama.cpp" if backend == "auto" else real(backend),
        )
        monkeypatch.setattr(local_llm, "packaged_smollm2_gguf", lambda: Path("stand-in.gguf"))
        monkeypatch.setattr(LocalLLMServer, "command", command)
        monkeypatch.setattr(LocalLLMServer, "served_model", property(lambda self: FAKE_MODEL))

    if importlib_missing("fastapi") or importlib_missing("llama_cpp"):
        pytest.skip("the local extra is not installed")
    return install


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def generate(tmp_path: Path, *extra: str, name: str = "out") -> list[str]:
    return ["generate", "--output", str(tmp_path / name), "--cache", str(tmp_path / "cache.sqlite"),
            "--num-examples", "12", "--kinds", "sts", "--languages", "English", "--no-progress", "--seed", "3",
            *extra]  # fmt: skip


# -- the managed local server -------------------------------------------------------------------------------
def test_a_server_that_crashes_on_its_first_completion_is_named_within_seconds(stand_in, tmp_path, capsys):
    stand_in(llama=0)
    started = time.monotonic()
    with pytest.raises(LocalServerError) as caught:
        LocalLLMServer(backend="llama.cpp").start()
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "llama.cpp server" in message and "killed by SIGSEGV (signal 11)" in message
    assert "dying with SIGSEGV after 0 answers" in message  # the log's last lines
    assert f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --no-cache-dir --force-reinstall' in message
    assert "--set generate.llm_backend=transformers" in message

    # The same through the command line: one message, no traceback, no request beyond the warm-up.
    code = main(generate(tmp_path, "--local", "--local-backend", "llama.cpp"))
    err = capsys.readouterr().err
    assert code == 1 and "SIGSEGV" in err and "Traceback" not in err
    assert AnswerCache.count(tmp_path / "cache.sqlite") == 0


def test_auto_falls_back_to_transformers_serve_and_says_so(stand_in, tmp_path, capsys, caplog):
    stand_in(llama=0)
    code = main(generate(tmp_path, "--local"))
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["num_examples_kept"] == 12
    assert report["local_server"]["backend"] == "transformers"
    assert report["local_server"]["fallback_from"] == "llama.cpp"
    assert "SIGSEGV" in report["local_server"]["fallback_reason"]
    assert report["max_tokens"] == 384  # the transformers backend's own limits came with it
    assert any("Falling back to `transformers serve`" in r.getMessage() for r in caplog.records)


def test_a_server_dying_mid_run_stops_it_at_once_and_the_rerun_resumes(stand_in, tmp_path, capsys):
    answers = 5
    stand_in(llama=1 + answers)  # the warm-up, then five answers
    started = time.monotonic()
    code = main(generate(tmp_path, "--local", "--local-backend", "llama.cpp", "--concurrency", "1"))
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - started < 20
    assert "killed by SIGSEGV" in err and "during generation" in err and "Traceback" not in err
    assert AnswerCache.count(tmp_path / "cache.sqlite") == answers, err
    assert not (tmp_path / "out").exists()

    stand_in(llama=None)  # a working server: the five answers come from the cache
    assert main(generate(tmp_path, "--local", "--local-backend", "llama.cpp", "--concurrency", "1")) == 0
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["cache_hits"] == answers and report["num_examples_kept"] == 12


# -- remote endpoints --------------------------------------------------------------------------------------
def test_a_port_nobody_listens_on_is_reported_as_refused(tmp_path, capsys):
    port = free_port()
    started = time.monotonic()
    code = main(generate(tmp_path, "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m"))
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - started < 10
    assert f"Cannot reach the endpoint at http://127.0.0.1:{port}/v1: connection refused" in err


class _Misbehaving:
    """A TCP server on 127.0.0.1 that reads each request and then resets the connection (``reset``) or
    never answers (``silent``): the faults a real endpoint shows, through a real socket."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                conn.recv(65536)
            if self.behaviour == "reset":
                # Linger 0: close() sends RST instead of FIN, as a crashed proxy or server does.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize(
    ("fault", "named"),
    [("refused", "connection refused"), ("reset", "connection dropped by the server"), ("silent", "timeout")],
)
def test_connection_errors_are_named_by_their_cause(transport, fault, named):
    """The exceptions the installed openai client really raises, on both transports a run may use."""
    server = None if fault == "refused" else _Misbehaving(fault)
    port = free_port() if server is None else server.port

    async def post() -> BaseException:
        options = {"http_client": openai.DefaultAioHttpClient()} if transport == "aiohttp" else {}
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0,
                                    timeout=0.5, **options)  # fmt: skip
        try:
            await client.post("/chat/completions", content=b"{}", cast_to=object)
        except openai.APIConnectionError as error:
            return error
        finally:
            await client.close()
        raise AssertionError("the request did not fail")

    try:
        error = asyncio.run(post())
    finally:
        if server is not None:
            server.close()
    assert describe_connection_error(error) == named, repr(error)


def test_a_spent_retry_budget_says_what_failed_and_for_how_long(fake_server, tmp_path, capsys):
    server = fake_server()
    server.faults.extend(["503"] * 10)
    code = main(generate(tmp_path, "--base-url", server.base_url, "--model", server.model, "--max-retries", "2",
                         "--concurrency", "1"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "after 3 failures over" in err and "(3 x http_503)" in err and "run the same command again" in err


# -- the user's mistakes and the machine's faults, through the command line --------------------------------
def test_a_cache_file_that_is_not_a_database_is_refused_before_any_request(fake_server, tmp_path, capsys):
    server = fake_server()
    (tmp_path / "cache.sqlite").write_bytes(b"these are not the answers you are looking for\n" * 100)
    code = main(generate(tmp_path, "--base-url", server.base_url, "--model", server.model))
    err = capsys.readouterr().err
    assert code == 2 and "file is not a database" in err and "Pass another cache path" in err
    assert "Traceback" not in err and server.chat_requests == 0


def test_an_unusable_output_is_refused_before_any_request(fake_server, tmp_path, capsys):
    server = fake_server()
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("not a dataset")
    for name, message in [("taken", "is an existing file"), ("taken/sub", "which is a file, not a folder"),
                          ("busy", "a folder with other files in it")]:  # fmt: skip
        code = main(generate(tmp_path, "--base-url", server.base_url, "--model", server.model, name=name))
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    assert server.chat_requests == 0


def test_disk_full_while_saving_keeps_every_answer(fake_server, tmp_path, capsys, monkeypatch):
    server = fake_server()
    command = generate(tmp_path, "--base-url", server.base_url, "--model", server.model)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DatasetDict, "save_to_disk", full)
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "cannot save the dataset" in err and "No space left on device" in err and "Traceback" not in err
    paid = server.chat_requests
    monkeypatch.undo()
    assert main(command) == 0
    assert server.chat_requests == paid  # the re-run sent nothing


def test_disk_full_while_writing_the_cache_keeps_what_was_written(fake_server, tmp_path, capsys, monkeypatch):
    server = fake_server()
    command = generate(tmp_path, "--base-url", server.base_url, "--model", server.model, "--concurrency", "1")
    real_connect = sqlite3.connect

    class FillsUp:
        """A connection whose disk fills after four answers."""

        def __init__(self, *args, **kwargs):
            self._db, self._inserts = real_connect(*args, **kwargs), 0

        def execute(self, sql, *args):
            if sql.startswith("INSERT OR REPLACE INTO answers"):
                self._inserts += 1
                if self._inserts > 4:
                    raise sqlite3.OperationalError("database or disk is full")
            return self._db.execute(sql, *args)

        def close(self):
            self._db.close()

    monkeypatch.setattr("st_synth.generation.cache.sqlite3.connect", FillsUp)
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "Cannot write the answer cache" in err and "database or disk is full" in err
    assert "The 4 answers already in it are kept" in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(command) == 0
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["cache_hits"] == 4


def test_ctrl_c_says_what_is_safe_and_the_same_command_resumes(fake_server, tmp_path):
    server = fake_server(latency=0.2)
    cache = tmp_path / "cache.sqlite"
    command = [sys.executable, "-m", "st_synth.cli", *generate(tmp_path, "--base-url", server.base_url, "--model",
               server.model, "--concurrency", "1", "--num-examples", "60")]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": ""}
    with (tmp_path / "stderr.txt").open("w") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 60
        while AnswerCache.count(cache) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    err = (tmp_path / "stderr.txt").read_text()
    assert "interrupted" in err and "safe in the cache" in err and "Traceback" not in err, err
    safe = AnswerCache.count(cache)
    assert f"{safe} answers from this run are safe" in err
    assert main(generate(tmp_path, "--base-url", server.base_url, "--model", server.model, "--concurrency", "1",
                         "--num-examples", "60")) == 0  # fmt: skip
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["cache_hits"] == safe


def test_two_runs_sharing_one_cache_at_once_agree(fake_server, tmp_path):
    server = fake_server(latency=0.01)
    env = {**os.environ, "OPENAI_API_KEY": ""}
    commands = [
        [sys.executable, "-m", "st_synth.cli", *generate(tmp_path, "--base-url", server.base_url, "--model",
         server.model, "--num-examples", "30", name=name)]
        for name in ("a", "b")
    ]  # fmt: skip
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), results
    from datasets import load_from_disk

    a, b = (load_from_disk(str(tmp_path / name)) for name in ("a", "b"))
    assert {k: list(v) for k, v in a.items()} == {k: list(v) for k, v in b.items()}


def test_a_cache_another_process_is_creating_is_waited_for_not_refused(tmp_path):
    # Another run holds a write transaction on the fresh file (it is creating the tables): switching the
    # journal to WAL answers "database is locked" at once, without SQLite's busy wait. The stop-28 CI
    # failure of the test above, made deterministic.
    path = tmp_path / "answers.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    other.execute("INSERT INTO answers VALUES ('k', '{\"from\": \"other\"}')")
    release = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    release.start()
    cache = AnswerCache(path)
    release.join()
    other.close()
    assert cache.get("k") == {"from": "other"}
    cache.put("mine", {"a": 1})
    assert len(cache) == 2
    cache.close()


def test_busy_and_locked_are_told_from_other_errors_with_or_without_a_result_code():
    from st_synth.generation.cache import held_by_another

    for message in ("database is locked", "database table is locked", "database schema is locked: main"):
        assert held_by_another(sqlite3.OperationalError(message))  # Python 3.10: no result code
    assert not held_by_another(sqlite3.OperationalError("disk I/O error"))
    busy, full = sqlite3.OperationalError("x"), sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode, full.sqlite_errorcode = 5 | (1 << 8), 13  # SQLITE_BUSY_RECOVERY; SQLITE_FULL
    assert held_by_another(busy) and not held_by_another(full)


def test_the_install_script_and_the_rebuild_hint_use_the_same_flags():
    script = ROOT / "scripts" / "llama-cpp-cmake-args.sh"
    x86 = subprocess.run(
        ["sh", str(script)], env={**os.environ, "ST_SYNTH_ARCH": "x86_64"}, capture_output=True, text=True
    )
    arm = subprocess.run(
        ["sh", str(script)], env={**os.environ, "ST_SYNTH_ARCH": "aarch64"}, capture_output=True, text=True
    )
    assert x86.stdout.strip() == PORTABLE_CMAKE_ARGS
    assert arm.stdout.strip() == ""  # ARM keeps llama.cpp's native build (no AMX there)
