"""Chat-completion requests to any OpenAI-compatible endpoint: cached, retried, accounted.

One :class:`ChatClient` serves a whole generation run. It looks every request up in the answer cache
first, bounds the number of requests in flight, retries rate limits, server errors, timeouts and dropped
connections with exponential backoff and jitter (honouring ``Retry-After``), negotiates the strongest
response format the endpoint accepts, and counts every request, retry and token.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import logging
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai

from st_synth.generation.cache import AnswerCache, request_key
from st_synth.generation.prompting import ChatRequest

logger = logging.getLogger(__name__)

# Strongest first: the exact JSON schema (OpenAI, vLLM), llama.cpp's schema-constrained JSON mode, plain
# JSON mode, then free text parsed tolerantly.
RESPONSE_FORMATS = ("json_schema", "json_object_schema", "json_object", "text")
_FORMAT_WORDS = ("response_format", "json_schema", "schema", "grammar", "json_object")


URL = "/v1/chat/completions"


def deferred_line(key: str, body: dict[str, Any]) -> dict[str, Any]:
    """The Batch API request line of one request (``custom_id`` = its cache key)."""
    return {"custom_id": key, "method": "POST", "url": URL, "body": body}


class EndpointError(RuntimeError):
    """The endpoint refused the run as a whole (bad key, unknown model, unreachable, outage)."""


class Deferred(Exception):
    """A request not answered yet that waits for a batch (a client with ``deferred`` set); not a failure."""


class RequestRefused(RuntimeError):
    """The endpoint refused this one request for a reason that a retry cannot fix."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Answer:
    """One answer: its text, the tokens it cost, and whether it came from the cache."""

    content: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    mode: str
    cached: bool
    via: str = (
        "online"  # "batch": answered by a batch engine (st_synth.generation.batch), priced at the batch rate
    )

    def cache_value(self) -> dict[str, Any]:
        """What the answer cache keeps of it (``cached`` is where this copy came from, not part of it)."""
        return {name: value for name, value in self.__dict__.items() if name != "cached"}


def is_transient(status: int) -> bool:
    """An HTTP status worth asking again for (timeout, conflict, rate limit, server error)."""
    return status in (408, 409, 429) or status >= 500


@dataclass
class ClientStats:
    """What a client did in a run: requests sent, cache hits, retries and tokens (paid and cached), for the
    generation report's accounting."""

    requests_sent: int = 0
    answers_stored: int = 0
    cache_hits: int = 0
    retries: int = 0
    format_downgrades: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    # Of all the tokens (this run's and cached), those of answers a batch engine gave.
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    tokens_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    modes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    def add_usage(self, kind: str, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        per_kind = self.tokens_by_kind.setdefault(kind, {"prompt_tokens": 0, "completion_tokens": 0})
        per_kind["prompt_tokens"] += prompt
        per_kind["completion_tokens"] += completion


@dataclass
class RetryPolicy:
    """How transient failures are retried: at most ``max_retries`` times, waiting a random time up to
    ``base_delay * 2**retry`` seconds (full jitter, capped at ``max_delay``), or the server's ``Retry-After``
    when it sends one."""

    max_retries: int = 8
    base_delay: float = 0.5
    max_delay: float = 60.0

    def delay(self, retry: int, rng: random.Random, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay)
        # Full jitter: spreads the retries of many workers that failed together.
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2**retry))


def redact_url(url: str) -> str:
    """Drop user info and query strings, where keys sometimes hide."""
    parts = urlsplit(str(url))
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def is_loopback(url: str) -> bool:
    """Whether ``url`` points at this machine (a local server needs no API key)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe_connection_error(error: BaseException) -> str:
    """What a failed connection really was (refused, unresolvable host, dropped, TLS, timeout), read from
    the chain of causes under the openai client's generic error. The most specific cause wins: openai's
    aiohttp transport reports a refused connection as a connect *timeout*, with the refusal underneath."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and len(chain) < 12:
        chain.append(seen)
        # aiohttp keeps the operating system's error on .os_error
        seen = getattr(seen, "os_error", None) or seen.__cause__ or seen.__context__
    kinds = [
        ("connection refused", lambda e: isinstance(e, ConnectionRefusedError)),
        ("host name does not resolve", lambda e: isinstance(e, socket.gaierror) or "DNS" in type(e).__name__),
        ("TLS error", lambda e: isinstance(e, ssl.SSLError)),
        ("connection dropped by the server",
         lambda e: isinstance(e, ConnectionResetError | BrokenPipeError) or "Disconnected" in type(e).__name__),
        ("timeout", lambda e: isinstance(e, openai.APITimeoutError | TimeoutError | asyncio.TimeoutError)),
    ]  # fmt: skip
    return next((label for label, match in kinds if any(map(match, chain))), "connection failed")


def _retry_after(error: openai.APIError) -> float | None:
    response = getattr(error, "response", None)
    if response is None:
        return None
    headers = response.headers
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return None if parsed is None else parsed.timestamp() - time.time()


def _mentions_format(error: openai.APIStatusError) -> bool:
    text = f"{error.message} {getattr(error, 'body', '')}".lower()
    return any(word in text for word in _FORMAT_WORDS)


def answer_from(response: object, mode: str) -> Answer:
    """Read content, finish reason and usage from a raw chat-completion JSON body, defensively."""
    response = response if isinstance(response, dict) else {}
    choices = response.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    usage = response.get("usage") or {}
    content = message.get("content") if isinstance(message, dict) else None
    return Answer(
        content=content if isinstance(content, str) else None,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        mode=mode,
        cached=False,
    )


def _mode_key(model: str) -> str:
    return f"response_format:{model}"


def starting_mode(response_format: str, cache: AnswerCache, model: str) -> str:
    """The response format a run starts in: the one asked for, or under "auto" the one an earlier run
    settled on with this model (kept in the cache), else the strictest."""
    if response_format != "auto":
        return response_format
    return cache.get_meta(_mode_key(model)) or RESPONSE_FORMATS[0]


class ChatClient:
    """Chat requests to an OpenAI-compatible endpoint through the ``openai`` client: answers come from the
    cache first, else are sent at most ``concurrency`` at a time, retried on rate limits, 5xx and timeouts
    (:class:`RetryPolicy`), in the most structured response format the endpoint accepts, and stored in the
    cache as they arrive. A deferred client (the batch route) sends nothing: it collects Batch API lines."""

    def __init__(
        self,
        client: openai.AsyncOpenAI | Sequence[openai.AsyncOpenAI],
        model: str,
        cache: AnswerCache,
        *,
        concurrency: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        response_format: str = "auto",
        retry: RetryPolicy | None = None,
        extra_body: dict[str, Any] | None = None,
        health_check: Callable[[], None] | None = None,
        deferred: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """``deferred``: the batch route (``st_synth.generation.batch``): a request not in the cache is not sent but
        put in this mapping (cache key -> Batch API request line) and :class:`Deferred` is raised; one a
        batch refused (HTTP 4xx) is refused again without a request."""
        if response_format != "auto" and response_format not in RESPONSE_FORMATS:
            raise ValueError(
                f"Unknown response format {response_format!r}; choose 'auto' or one of: "
                f"{', '.join(RESPONSE_FORMATS)}."
            )
        # Several clients, each with a small connection pool: httpx scans its whole pool on every
        # request, so one pool of 64 connections costs more CPU per request than eight pools of eight.
        self.clients = [client] if isinstance(client, openai.AsyncOpenAI) else list(client)
        self.client = self.clients[0] if self.clients else None
        self.deferred = deferred
        self.model = model
        self.cache = cache
        self.temperature = temperature
        self.top_p = top_p
        self.retry = retry or RetryPolicy()
        self.extra_body = dict(extra_body or {})
        # Called (in a thread) after a failed connection: raises when a managed server has died, so the
        # run stops at once instead of retrying a dead port until the retry budget runs out.
        self.health_check = health_check
        self.negotiate = response_format == "auto"
        self._mode_key = _mode_key(model)
        self.mode = starting_mode(response_format, cache, model)
        self.stats = ClientStats()
        self._slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(concurrency):
            self._slots.put_nowait(slot)
        self._jitter = random.Random()  # timing only: never influences what is generated
        self._checked: asyncio.Task | None = None
        self._probe = asyncio.Lock()
        self._format_confirmed = not self.negotiate or cache.get_meta(self._mode_key) is not None

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    async def _check_endpoint(self) -> None:
        """Before the first paid request: is the endpoint there, does it take the key, has it the model?

        A run whose answers are all cached never gets here, so it needs no endpoint at all.
        """
        if self._checked is None:
            self._checked = asyncio.ensure_future(self._list_models())
        await asyncio.shield(self._checked)

    async def _list_models(self) -> None:
        try:
            page = await self.client.with_options(max_retries=2, timeout=15).models.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise EndpointError(f"The endpoint refused the API key (HTTP {error.status_code}).") from None
        except openai.APIConnectionError as error:
            raise EndpointError(
                f"Cannot reach the endpoint at {redact_url(self.client.base_url)}: "
                f"{describe_connection_error(error)}. Is the server up and the address right?"
            ) from None
        except openai.APIStatusError:
            return  # some servers have no model listing; the first request will tell
        names = [model.id for model in page.data]
        if names and self.model not in names:
            raise EndpointError(
                f"Model {self.model!r} is not served at {self.client.base_url}; it serves: {', '.join(names[:20])}."
            )

    def body(self, request: ChatRequest) -> dict[str, Any]:
        """The parts of a request that determine its answer (and so its cache key)."""
        return {
            "messages": request.messages,
            "temperature": self.temperature if request.temperature is None else request.temperature,
            "top_p": self.top_p,
            "max_tokens": request.max_tokens,
            "seed": request.seed,
            "schema": request.schema,
            **({"extra_body": self.extra_body} if self.extra_body else {}),
            # From v2 on the prompt version is part of the key, so answers of two versions never mix even where
            # a template is the same in both; v1 keys stay as they were before versions existed.
            **({"prompts_version": request.prompts_version} if request.prompts_version != "v1" else {}),
        }

    async def complete(self, request: ChatRequest) -> Answer:
        key = request_key(self.model, self.body(request))
        if (hit := self.cache.get(key)) is not None:
            self.stats.cache_hits += 1
            self.stats.cached_prompt_tokens += hit["prompt_tokens"]
            self.stats.cached_completion_tokens += hit["completion_tokens"]
            if hit.get("via") == "batch":
                self.stats.batch_prompt_tokens += hit["prompt_tokens"]
                self.stats.batch_completion_tokens += hit["completion_tokens"]
            return Answer(**hit, cached=True)
        if self.deferred is not None:
            if reason := self.cache.refused_reason(key):
                raise RequestRefused(reason)
            self.deferred[key] = deferred_line(key, self.request_body(request, self.mode))
            raise Deferred(key)
        await self._check_endpoint()
        if not self._format_confirmed:
            # Until one answer confirms the response format, send one request at a time, so that an
            # endpoint rejecting the format rejects one request rather than a whole wave of them.
            async with self._probe:
                if not self._format_confirmed:
                    answer = await self._send(request, self.client)
                    self._format_confirmed = True
                    self.cache.set_meta(self._mode_key, self.mode)
                    return self._store(key, request, answer)
        slot = await self._slots.get()
        try:
            answer = await self._send(request, self.clients[slot % len(self.clients)])
        finally:
            self._slots.put_nowait(slot)
        return self._store(key, request, answer)

    def _store(self, key: str, request: ChatRequest, answer: Answer) -> Answer:
        self.cache.put(key, answer.cache_value())
        self.stats.answers_stored += 1
        self.stats.add_usage(request.kind, answer.prompt_tokens, answer.completion_tokens)
        self.stats.modes[answer.mode] += 1
        return answer

    def _format_argument(self, mode: str, request: ChatRequest) -> dict[str, Any]:
        if request.schema is None:  # a prose answer
            return {}
        if mode == "json_schema":
            name = f"{request.kind}_{request.stage}"
            return {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": request.schema, "strict": True},
            }
        if mode == "json_object_schema":
            return {"type": "json_object", "schema": request.schema}
        if mode == "json_object":
            return {"type": "json_object"}
        return {}

    def request_body(self, request: ChatRequest, mode: str) -> dict[str, Any]:
        """The chat-completions JSON body sent for ``request`` in response-format ``mode``."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages,
            "temperature": self.temperature if request.temperature is None else request.temperature,
            "top_p": self.top_p,
            "max_tokens": request.max_tokens,
            "seed": request.seed,
            **self.extra_body,
        }
        if response_format := self._format_argument(mode, request):
            body["response_format"] = response_format
        return body

    async def _send(self, request: ChatRequest, client: openai.AsyncOpenAI) -> Answer:
        retries = 0
        failures: Counter = Counter()
        started = time.monotonic()
        while True:
            mode = self.mode
            body = self.request_body(request, mode)
            self.stats.requests_sent += 1
            try:
                # The raw JSON route of the same client: the typed ``chat.completions.create`` spends
                # more CPU transforming and validating than the whole rest of a request costs. The body
                # goes as ready JSON bytes (the client's default Content-Type is application/json): as a
                # dict, the client deep-copies it twice per request and encodes it with its own encoder.
                content = json.dumps(body, ensure_ascii=False).encode()
                response = await client.post("/chat/completions", content=content, cast_to=object)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
                raise EndpointError(
                    f"The endpoint refused the API key (HTTP {error.status_code}); check the key variable."
                ) from None
            except openai.NotFoundError as error:
                raise EndpointError(
                    f"The endpoint answered 404 for model {self.model!r}: {error.message}"
                ) from None
            except openai.APIStatusError as error:
                # A prose request asks for no response format: there is nothing to step down from.
                if request.schema is not None and self._can_downgrade(error, mode):
                    continue
                if not is_transient(error.status_code):
                    self.stats.errors[f"http_{error.status_code}"] += 1
                    raise RequestRefused(f"http_{error.status_code}") from None
                label = f"http_{error.status_code}"
                failures[label] += 1
                retries = await self._backoff(retries, label, failures, started, _retry_after(error))
                continue
            except (openai.APITimeoutError, openai.APIConnectionError) as error:
                label = describe_connection_error(error)
                failures[label] += 1
                if self.health_check is not None:
                    await asyncio.to_thread(self.health_check)
                retries = await self._backoff(retries, label, failures, started, None)
                continue
            return answer_from(response, mode)

    def _can_downgrade(self, error: openai.APIStatusError, mode: str) -> bool:
        """Step down to a weaker response format when the endpoint rejects the current one."""
        if not self.negotiate:
            return False
        if self.mode != mode:  # a concurrent request already stepped down: resend in the new mode
            return True
        if mode == RESPONSE_FORMATS[-1] or error.status_code not in (400, 422, 500, 501):
            return False
        if not _mentions_format(error):
            return False
        self.mode = RESPONSE_FORMATS[RESPONSE_FORMATS.index(mode) + 1]
        self.stats.format_downgrades += 1
        self.cache.set_meta(self._mode_key, self.mode)
        logger.warning("Endpoint rejected response format %r; using %r from now on.", mode, self.mode)
        return True

    async def _backoff(
        self, retries: int, label: str, failures: Counter, started: float, retry_after: float | None
    ) -> int:
        """Wait before retry number ``retries + 1`` of one request, or give up naming its failures."""
        self.stats.errors[label] += 1
        if retries >= self.retry.max_retries:
            kinds = ", ".join(f"{count} x {kind}" for kind, count in failures.most_common())
            raise EndpointError(
                f"Giving up on a request to {redact_url(self.client.base_url)} after {sum(failures.values())} "
                f"failures over {time.monotonic() - started:.0f} s ({kinds}). Everything answered so far is "
                "in the cache: run the same command again to resume."
            )
        self.stats.retries += 1
        await asyncio.sleep(self.retry.delay(retries, self._jitter, retry_after))
        return retries + 1


CONNECTIONS_PER_CLIENT = 8


def make_clients(config: Any) -> list[openai.AsyncOpenAI]:
    """The openai clients of a run, on openai's aiohttp transport where aiohttp is installed.

    aiohttp costs about a third less CPU per request than httpx, which matters at high concurrency.
    Without it, several httpx clients with small pools: httpx scans a client's whole pool per request.
    """
    kwargs = dict(
        base_url=config.resolved_base_url,
        api_key=config.api_key(),
        max_retries=0,
        timeout=config.request_timeout,
    )
    try:
        return [openai.AsyncOpenAI(**kwargs, http_client=openai.DefaultAioHttpClient())]
    except RuntimeError:
        return [openai.AsyncOpenAI(**kwargs) for _ in range(-(-config.concurrency // CONNECTIONS_PER_CLIENT))]
