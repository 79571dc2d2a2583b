"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions API, for tests and benchmarks.

Answers are a pure function of the request (messages, seed, schema), so a repeated request gets the
same answer, like a seeded sampler. Faults come two ways:

* ``faults``: a queue of fault names applied to the next requests in arrival order (``"429"``, ``"500"``,
  ``"503"``, ``"slow"``, ``"drop"``, ``"malformed"``, ``"truncated"``, ``"duplicate"``, ``"near_duplicate"``:
  the same long text with a few characters changed);
* ``bad_answer_rate``: a share of requests, chosen by a hash of the request itself (so the same requests
  every run), answered with one of ``bad_answers`` (by default ``malformed``, ``truncated`` or ``duplicate``).

It also serves the files and batches API (``server.batch_api``, :mod:`st_synth.testing.batch_api`): batches
whose lines get the same answers, with scripted outcomes (expired, cancelled, failed) and failed lines.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from st_synth.testing.batch_api import FakeBatchAPI

KNOWN_KEYS = (
    "user_query", "positive_document", "hard_negative_document", "input_text", "label",
    "misleading_label", "input", "S1", "S2", "S3",
)  # fmt: skip
REPEATED_TEXT = (
    "The committee reviewed the quarterly figures in detail and agreed that the new distribution centre had "
    "reduced delivery times across the northern region, although costs rose faster than expected during the "
    "winter months because of fuel prices and overtime."
)
# "slow" answers 503 after sleeping past the client's timeout: the client has gone by then, and the
# server's usage counter stays equal to what clients received.
TRANSIENT = {"429": 429, "500": 500, "503": 503, "slow": 503}
UNAUTHORIZED = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
NOT_FOUND = {"error": {"message": "not found"}}
# Like FastAPI-based servers (vLLM, TGI's router): a body not declared as JSON is not read as JSON.
NOT_JSON = {"error": {"message": "Content-Type must be application/json"}}


def is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "application/json"


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog: hundreds of clients may connect at once
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-answer (a run stopped on purpose) is not the server's error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _words(digest: str) -> str:
    """Eight made-up words spelt from a digest: answers that share no more than their frame, as two real
    answers would (near-duplicate removal must not take them for repeats)."""
    letters = "".join("etaoinshrdlucmfw"[int(c, 16)] for c in digest)
    return " ".join(letters[i : i + 3 + int(digest[i], 16) % 5] for i in range(0, 64, 8))


class FakeOpenAIServer:
    """Start with ``with FakeOpenAIServer() as server:``; point clients at ``server.base_url``."""

    def __init__(
        self,
        *,
        model: str = "fake-llm",
        latency: Callable[[random.Random], float] | float = 0.0,
        bad_answer_rate: float = 0.0,
        bad_answers: tuple[str, ...] = ("malformed", "truncated", "duplicate"),
        reject_json_schema: bool = False,
        slow_seconds: float = 2.0,
        api_key: str | None = None,
        fence_text_answers: bool = True,
        port: int = 0,
        seed: int = 0,
        die_after: int | None = None,
        die_signal: str = "SIGSEGV",
    ) -> None:
        """``die_after``: the process kills itself with ``die_signal`` when a chat request arrives after that
        many answers (a stand-in for a local server that crashes, e.g. llama.cpp on an AMX CPU)."""
        self.model = model
        self.die_after = die_after
        self.die_signal = signal.Signals[die_signal]
        self._answered = 0
        self.latency = latency
        self.bad_answer_rate = bad_answer_rate
        self.bad_answers = bad_answers
        self.reject_json_schema = reject_json_schema
        self.slow_seconds = slow_seconds
        self.api_key = api_key
        self.fence_text_answers = fence_text_answers
        self.faults: deque[str] = deque()
        self.received: list[dict] = []
        self.fault_log: list[str] = []
        self.model_listings = 0
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        # Where a throughput shortfall comes from: requests in flight here (integrated over time) and time
        # spent per request beyond the latency drawn for it; when the last request arrived (system-wide
        # monotonic clock), after which a run only waits for its slowest answers.
        self.timing = {"inflight_seconds": 0.0, "handled": 0, "handler_seconds": 0.0, "drawn_seconds": 0.0,
                       "last_arrival": 0.0}  # fmt: skip
        self._inflight = 0
        self._inflight_since = time.perf_counter()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.batch_api = FakeBatchAPI(self._answer_line)
        self._httpd = _Server(("127.0.0.1", port), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def chat_requests(self) -> int:
        with self._lock:
            return len(self.received)

    # -- answers ---------------------------------------------------------------------------------------
    def answer_for(self, body: dict, fault: str | None) -> tuple[str, str]:
        """(content, finish_reason) for a request body."""
        prompt = body["messages"][-1]["content"]
        digest = _digest(body["messages"], body.get("seed"))
        fmt = body.get("response_format") or {}
        schema = (fmt.get("json_schema") or {}).get("schema") or fmt.get("schema") or {}
        properties = list((schema.get("properties") or {}).keys())
        if not fmt and not any(f'"{key}"' in prompt for key in KNOWN_KEYS) and "task strings" not in prompt:
            # Asked for prose (no format, no JSON keys): two sentences of made-up words; cut mid-sentence
            # when the fault is a truncation, as a token cap cuts one.
            salt = "constant" if fault == "duplicate" else digest
            prose = f"In short, {_words(_digest(salt, 1))}. It adds {_words(_digest(salt, 2))}."
            if fault == "malformed":
                return "Sure", "stop"
            return (prose + " Then the tow", "length") if fault == "truncated" else (prose, "stop")
        if fault == "malformed":
            return '{"user_query": "unterminated', "stop"
        if fault == "truncated":
            return '{"input": "a long answer that ran out of tok', "length"
        if properties == ["tasks"] or "task strings" in prompt:
            tasks = [
                f"Task {digest[:6]}-{n}: retrieve passages that answer questions on topic {n}"
                if "labels after a colon" not in prompt  # a grounded classification brainstorm: label sets
                else f"Classify texts by aspect {digest[:6]}-{n}: red, green, blue, amber"
                for n in range(5)
            ]
            return json.dumps({"tasks": tasks} if properties == ["tasks"] else tasks), "stop"
        keys = properties or [key for key in KNOWN_KEYS if f'"{key}"' in prompt]
        salt = "constant" if fault == "duplicate" else digest
        example = {key: f"{key} {n}: {_words(_digest(salt, key))}" for n, key in enumerate(keys)}
        if fault == "near_duplicate":  # one long text said again with a few characters changed
            example = {key: f"{key} {n}: {REPEATED_TEXT} ({digest[:4]})" for n, key in enumerate(keys)}
        if "label" in keys and (labels := re.search(r"^Task: [^\n]*: ([^\n]+)$", prompt, re.MULTILINE)):
            # A grounded classification request names its label set: answer with two of its labels.
            names = [name.strip(" .") for name in labels.group(1).split(",")]
            first = int(_digest(salt)[:8], 16) % len(names)
            example.update(label=names[first], misleading_label=names[(first + 1) % len(names)])
        content = json.dumps(example, ensure_ascii=False)
        fenced = not fmt and self.fence_text_answers
        return (f"Here you go:\n```json\n{content}\n```" if fenced else content), "stop"

    def respond(self, body: dict) -> tuple[int | None, dict, dict[str, str], float]:
        """``(status, payload, headers, delay)`` for a chat-completions request body: wait ``delay``
        seconds, then send; status None means drop the connection instead."""
        with self._lock:
            self.received.append(body)
        if body.get("model") != self.model:
            return 404, {"error": {"message": f"model {body.get('model')} does not exist"}}, {}, 0.0
        with self._lock:
            if self.die_after is not None and self._answered >= self.die_after:
                print(f"dying with {self.die_signal.name} after {self._answered} answers", flush=True)
                # Raised in this thread, so that it dies before it could answer (a signal sent to the
                # process may be taken by another thread a moment later); the sleep only holds it there.
                signal.raise_signal(self.die_signal)
                time.sleep(60)
            self._answered += 1
        fmt = body.get("response_format") or {}
        if self.reject_json_schema and fmt.get("type") == "json_schema":
            return 500, {"error": {"message": "response_format json_schema is not supported"}}, {}, 0.0
        fault = self._next_fault(body)
        if fault:
            with self._lock:
                self.fault_log.append(fault)
        delay = self.slow_seconds if fault == "slow" else self._delay()
        if fault in TRANSIENT:
            headers = {"Retry-After": "0", "retry-after-ms": "20"} if fault == "429" else {}
            return TRANSIENT[fault], {"error": {"message": f"injected {fault}"}}, headers, delay
        if fault == "drop":
            return None, {}, {}, delay
        content, finish = self.answer_for(body, fault)
        prompt_tokens = len(re.findall(r"\S+", body["messages"][-1]["content"]))
        completion_tokens = len(content.split())
        with self._lock:
            self.usage["prompt_tokens"] += prompt_tokens
            self.usage["completion_tokens"] += completion_tokens
        return 200, {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": self.model,
            "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }, {}, delay  # fmt: skip

    def _answer_line(self, body: dict) -> tuple[int, dict]:
        """A batch line's answer: the chat answer, without the latency (a dropped connection is a 500)."""
        status, payload, _, _ = self.respond(body)
        return (500, {"error": {"message": "injected drop"}}) if status is None else (status, payload)

    def respond_get(self, path: str) -> tuple[int, dict]:
        """``(status, payload)`` for a GET: the model list, or, not OpenAI's but for benchmarks, ``/timing``
        and ``/reseed/N`` (the latencies drawn from now on are those of seed N, so that clients compared
        one after the other meet the same draws in the order their requests arrive)."""
        path = path.rstrip("/")
        if path.endswith("/timing"):
            return 200, self.timing_snapshot()
        head, _, seed = path.rpartition("/")
        if head.endswith("/reseed") and seed.isdigit():
            with self._lock:
                self._rng = random.Random(int(seed))
            return 200, {"seed": int(seed)}
        if path.endswith("/models"):
            with self._lock:
                self.model_listings += 1
            return 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        return 404, NOT_FOUND

    def authorized(self, header: str | None) -> bool:
        return self.api_key is None or header == f"Bearer {self.api_key}"

    def refuse_post(
        self, authorization: str | None, path: str, content_type: str | None
    ) -> tuple[int, dict] | None:
        """``(status, payload)`` when a POST is refused before its body is read: bad key, unknown path, or
        a body not declared as JSON; None when it may go on to :meth:`respond`."""
        if not self.authorized(authorization):
            return 401, UNAUTHORIZED
        if not path.rstrip("/").endswith("/chat/completions"):
            return 404, NOT_FOUND
        if not is_json(content_type):
            return 415, NOT_JSON
        return None

    def _next_fault(self, body: dict) -> str | None:
        with self._lock:
            if self.faults:
                return self.faults.popleft()
        if self.bad_answer_rate > 0:
            h = int(_digest(body["messages"], body.get("seed"), "fault")[:8], 16)
            if (h % 10_000) / 10_000 < self.bad_answer_rate:
                return self.bad_answers[h % len(self.bad_answers)]
        return None

    def _track(self, change: int, handler_seconds: float = 0.0, drawn_seconds: float = 0.0) -> None:
        with self._lock:
            now = time.perf_counter()
            self.timing["inflight_seconds"] += self._inflight * (now - self._inflight_since)
            self._inflight, self._inflight_since = self._inflight + change, now
            if change > 0:
                self.timing["last_arrival"] = time.monotonic()
            if change < 0:
                self.timing["handled"] += 1
                self.timing["handler_seconds"] += handler_seconds
                self.timing["drawn_seconds"] += drawn_seconds

    def timing_snapshot(self) -> dict[str, float]:
        self._track(0)
        with self._lock:
            return dict(self.timing)

    def _delay(self) -> float:
        if callable(self.latency):
            with self._lock:
                return self.latency(self._rng)
        return self.latency

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; with Nagle on, the second waits ~40 ms for the
            # client's delayed ACK, which would add to every request's latency.
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if server.authorized(self.headers.get("Authorization")):
                    return True
                self._send_json(401, UNAUTHORIZED)
                return False

            def _send_bytes(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                if server.batch_api.handles(self.path):
                    status, payload = server.batch_api.get(self.path)
                    if isinstance(payload, bytes):
                        self._send_bytes(payload)
                    else:
                        self._send_json(status, payload)
                    return
                self._send_json(*server.respond_get(self.path))

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = self.headers
                if server.batch_api.handles(self.path) and self._authorized():
                    self._send_json(*server.batch_api.post(self.path, headers.get("Content-Type"), data))
                    return
                if refusal := server.refuse_post(
                    headers.get("Authorization"), self.path, headers.get("Content-Type")
                ):
                    self._send_json(*refusal)
                    return
                body = json.loads(data or b"{}")
                started = time.perf_counter()
                server._track(+1)
                delay = 0.0
                try:
                    status, payload, headers, delay = server.respond(body)
                    time.sleep(delay)
                    if status is None:
                        self.close_connection = True
                        self.connection.close()
                    else:
                        self._send_json(status, payload, headers)
                finally:
                    server._track(-1, time.perf_counter() - started, delay)

        return Handler


def serve_asyncio(server: FakeOpenAIServer, port: int) -> None:
    """Serve ``server``'s answers from one asyncio (aiohttp) event loop until killed. For benchmarks: a
    thread per connection spends CPU (and GIL hand-offs) that the client under test needs on a small
    machine. Everything but the ``"drop"`` fault behaves as in the threaded server."""
    import asyncio

    from aiohttp import web

    async def get(request: web.Request) -> web.Response:
        if not server.authorized(request.headers.get("Authorization")):
            return web.json_response(UNAUTHORIZED, status=401)
        status, payload = server.respond_get(request.path)
        return web.json_response(payload, status=status)

    async def post(request: web.Request) -> web.Response:
        headers = request.headers
        if refusal := server.refuse_post(
            headers.get("Authorization"), request.path, headers.get("Content-Type")
        ):
            status, payload = refusal
            return web.json_response(payload, status=status)
        body = await request.json()
        started = time.perf_counter()
        server._track(+1)
        delay = 0.0
        try:
            status, payload, headers, delay = server.respond(body)
            await asyncio.sleep(delay)
            if status is None:
                raise ValueError("the asyncio server does not inject dropped connections")
            return web.json_response(payload, status=status, headers=headers)
        finally:
            server._track(-1, time.perf_counter() - started, delay)

    app = web.Application()
    app.router.add_route("GET", "/{path:.*}", get)
    app.router.add_route("POST", "/{path:.*}", post)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def start_server_process(mean_latency: float) -> tuple[subprocess.Popen, str]:
    """For benchmarks: the asyncio fake server in its own process on a free loopback port, log-normal latency
    of ``mean_latency`` seconds, bare JSON answers; returns the process and its base URL once it answers."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "st_synth.testing", "--port", str(port), "--mean-latency", str(mean_latency),
               "--no-fence", "--asyncio"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{base_url}/models", timeout=1)
            return process, base_url
        except OSError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError("fake server did not start within 60 s")


def get_json(base_url: str, path: str, timeout: float = 5.0) -> dict:
    """The JSON answer to a GET of ``base_url/path`` on a running fake server, e.g. its benchmark-only
    ``timing`` and ``reseed/N``."""
    with urllib.request.urlopen(f"{base_url}/{path}", timeout=timeout) as response:
        return json.loads(response.read())


def heavy_tailed_latency(mean: float, sigma: float = 1.0) -> Callable[[random.Random], float]:
    """Log-normal latency with the given mean: most answers fast, a few very slow, like real endpoints."""
    mu = math.log(mean) - sigma**2 / 2
    return lambda rng: rng.lognormvariate(mu, sigma)


def answer_batch(
    server: FakeOpenAIServer, requests: str | Path, results: str | Path, fail: dict[str, int] | None = None
) -> int:
    """A batch engine for tests: answer each OpenAI Batch API request line of ``requests`` with the server's
    answer (no HTTP), writing result lines to ``results`` in reverse order (engines do not keep the order).
    ``fail``: custom_id -> HTTP status to answer instead (0: an expired line, with no response). Returns
    the lines answered."""
    lines = [
        json.loads(line) for line in Path(requests).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    out = []
    for number, line in enumerate(lines):
        status = (fail or {}).get(line["custom_id"])
        if status == 0:
            response, error = (
                None,
                {"code": "batch_expired", "message": "This request could not be executed."},
            )
        elif status is not None:
            response = {"status_code": status, "request_id": f"req-{number}",
                        "body": {"error": {"message": f"injected {status}"}}}  # fmt: skip
            error = None
        else:
            code, payload, _, _ = server.respond(line["body"])
            response, error = {"status_code": code, "request_id": f"req-{number}", "body": payload}, None
        out.append(
            {
                "id": f"batch_req_{number}",
                "custom_id": line["custom_id"],
                "response": response,
                "error": error,
            }
        )
    Path(results).write_text("".join(json.dumps(entry) + "\n" for entry in reversed(out)), encoding="utf-8")
    return len(out)


def main() -> None:
    """Serve until killed: ``python -m st_synth.testing --port 8000 --mean-latency 0.2``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="fake-llm")
    parser.add_argument("--mean-latency", type=float, default=0.0, help="Seconds; log-normal, sigma 1.")
    parser.add_argument("--no-fence", action="store_true", help="Answer text-mode requests with bare JSON.")
    parser.add_argument(
        "--asyncio", action="store_true", help="One event loop instead of a thread per connection."
    )
    parser.add_argument("--die-after", type=int, default=None, help="Kill this process at the chat request "
                        "after this many answers (a crashing local server).")  # fmt: skip
    parser.add_argument("--die-signal", default="SIGSEGV", help="The signal it dies by.")
    parser.add_argument("--answer-batch", nargs=2, metavar=("REQUESTS", "RESULTS"), help="Serve nothing: answer "
                        "an OpenAI Batch API requests file into a results file, as a batch engine would.")  # fmt: skip
    args = parser.parse_args()
    if args.answer_batch:
        answered = answer_batch(FakeOpenAIServer(model=args.model, fence_text_answers=not args.no_fence),
                                *args.answer_batch)  # fmt: skip
        print(f"answered {answered} requests -> {args.answer_batch[1]}")
        return
    latency = heavy_tailed_latency(args.mean_latency) if args.mean_latency > 0 else 0.0
    server = FakeOpenAIServer(
        model=args.model, latency=latency, port=0 if args.asyncio else args.port,
        fence_text_answers=not args.no_fence, die_after=args.die_after, die_signal=args.die_signal,
    )  # fmt: skip
    if args.asyncio:
        serve_asyncio(server, args.port)
        return
    with server:
        print(f"serving {server.base_url}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
