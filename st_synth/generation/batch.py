"""Generation through batch engines by files: OpenAI Batch API request lines out, result lines in.

The plan of a run does not change: each round replays it from the answer cache, and the requests the cache
cannot answer are written as Batch API lines (``custom_id`` = the cache key) instead of being sent. Any engine
that reads that format answers them (vLLM: ``python -m vllm.entrypoints.openai.run_batch -i requests.jsonl -o
results.jsonl``; OpenAI's Batch API; ``python -m st_synth.testing --answer-batch`` for tests); importing its
results puts the answers in the cache, and the next round goes on from there (examples after their
brainstorms, replacements for dropped answers) until every example is settled. The last round is then an
ordinary run whose every answer comes from the cache: for an engine that answers a request as a pure function
of it, the dataset is the one an online run gives for the same seed.

No request is made, so the file route needs no endpoint and no API key. The cache records which keys were
exported (a result for any other key is refused before anything is stored) and which ones an engine refused
(HTTP 4xx: dropped like a refused online request, never exported again); a line that failed transiently (429,
5xx, expired, no response) is exported again in the next round.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from st_synth.generation.builder import SyntheticDatasetBuilder
from st_synth.generation.cache import AnswerCache
from st_synth.generation.client import URL, answer_from, is_transient, starting_mode

_EXPORTED = "batch:exported:"
_ROUND = "batch:round"


class BatchFileError(ValueError):
    """A results file that cannot be imported (not JSON lines, or lines for requests never exported)."""


def request_file(lines: dict[str, dict[str, Any]]) -> bytes:
    """The requests file of ``lines``, sorted by key: the same requests give the same bytes."""
    return "".join(json.dumps(lines[key], ensure_ascii=False) + "\n" for key in sorted(lines)).encode("utf-8")


def split_requests(lines: dict[str, dict[str, Any]], max_requests: int,
                   max_bytes: int) -> list[dict[str, dict[str, Any]]]:  # fmt: skip
    """``lines`` cut, in key order, into parts of at most ``max_requests`` lines and ``max_bytes`` bytes of
    requests file each (a provider's limits per batch: OpenAI's are 50,000 requests and 200 MB). The same
    lines give the same parts."""
    if max_requests < 1 or max_bytes < 1:
        raise ValueError(f"Batch limits must be positive, got {max_requests} requests and {max_bytes} bytes.")
    parts: list[dict[str, dict[str, Any]]] = [{}]
    size = 0
    for key in sorted(lines):
        length = len(json.dumps(lines[key], ensure_ascii=False).encode("utf-8")) + 1
        if length > max_bytes:
            raise BatchAPIError(f"One request is {length} bytes, more than the {max_bytes} bytes a batch may hold "
                                "(--batch_max_bytes); nothing was submitted.")  # fmt: skip
        if parts[-1] and (len(parts[-1]) >= max_requests or size + length > max_bytes):
            parts.append({})
            size = 0
        parts[-1][key] = lines[key]
        size += length
    return [part for part in parts if part]


def mark_exported(cache: AnswerCache, keys: Any) -> int:
    """Record ``keys`` as sent to a batch engine in a new round; return its number."""
    round_number = int(cache.get_meta(_ROUND) or 0) + 1
    for key in keys:
        cache.set_meta(_EXPORTED + key, str(round_number))
    cache.set_meta(_ROUND, str(round_number))
    return round_number


def export_requests(cache: AnswerCache, lines: dict[str, dict[str, Any]], path: str | Path) -> int:
    """Write ``lines`` and record them as exported; return the round number."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(request_file(lines))
    partial.replace(path)
    return mark_exported(cache, lines)


def import_results(cache: AnswerCache, path: str | Path, mode: str) -> dict[str, int]:
    """Store the answers of a Batch API results file in the cache (:func:`import_lines`)."""
    path = Path(path)
    if not path.is_file():
        raise BatchFileError(f"No results file at {path}.")
    return import_lines(cache, path.read_text(encoding="utf-8").splitlines(), mode, str(path))


def import_lines(cache: AnswerCache, lines: list[str], mode: str, source: str) -> dict[str, int]:
    """Store the answers of Batch API result lines in the cache. Every line is checked before any is stored:
    each ``custom_id`` must be one this cache exported. Returns counts: answered, refused (4xx), to_retry
    (transient failures and lines never run: exported again next round), already (answers the cache had),
    and the answered lines' prompt_tokens and completion_tokens."""
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key = entry["custom_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BatchFileError(
                f"{source}, line {number}: not a Batch API result line (JSON with a custom_id)."
            ) from None
        if cache.get_meta(_EXPORTED + str(key)) is None:
            raise BatchFileError(
                f"{source}, line {number}: custom_id {key!r} is not a request this cache exported (another "
                "run's results, or another cache?). Nothing was imported."
            )
        entries.append(entry)
    counts = dict.fromkeys(
        ("answered", "refused", "to_retry", "already", "prompt_tokens", "completion_tokens"), 0
    )
    for entry in entries:
        key = entry["custom_id"]
        if cache.get(key) is not None:
            counts["already"] += 1
            continue
        response = entry.get("response") or {}
        status = response.get("status_code")
        if status == 200 and isinstance(response.get("body"), dict):
            answer = answer_from(response["body"], mode)
            answer.via = "batch"
            cache.put(key, answer.cache_value())
            counts["answered"] += 1
            counts["prompt_tokens"] += answer.prompt_tokens
            counts["completion_tokens"] += answer.completion_tokens
        elif isinstance(status, int) and status >= 400 and not is_transient(status):
            cache.mark_refused(key, f"http_{status}")
            counts["refused"] += 1
        else:
            counts["to_retry"] += 1
    return counts


# -- the OpenAI Batch API (st-synth generate --batch) -------------------------------------------------------
_API = "batch:api:"  # + batch id -> JSON record of a submitted batch
_SUBMITTING = "batch:api:submitting:"  # + digest of a requests file -> round: its batch may exist unrecorded
_UPLOADED = "batch:api:file:"  # + digest -> id of the uploaded requests file
TERMINAL = ("completed", "expired", "cancelled", "failed")
# OpenAI's limits per batch: 50,000 requests, an input file of at most 200 MB.
MAX_REQUESTS = 50_000
MAX_BYTES = 200_000_000
COMPLETION_WINDOW = "24h"


class BatchAPIError(RuntimeError):
    """A batch the API refused (validation failed) or one that ended without a single answer."""


class BatchAPIRun:
    """``st-synth generate --batch``: the plan's rounds as OpenAI Batch API batches.

    Each round: every batch this cache submitted and has not collected yet is polled until it ends and its
    output and error files are imported (:func:`import_lines`: answers to the cache, 4xx lines refused, lines
    never run or failed transiently exported again); then the plan is replayed from the cache and the requests
    it still needs go as one new batch. A batch is recorded in the cache as soon as it is created, so a run
    killed at any point and restarted polls it instead of submitting its requests again. The one gap, a kill
    between the API creating a batch and the record, is closed by a mark written before the create and the
    batch's ``metadata`` (the digest of its requests file): a restart that finds the mark looks for that
    batch in the API's list and adopts it.
    """

    def __init__(
        self, config: Any, cache: AnswerCache, *, client: Any = None, poll_interval: float = 30.0,
        max_rounds: int = 50, log: Any = print, max_requests: int = MAX_REQUESTS, max_bytes: int = MAX_BYTES,
    ) -> None:  # fmt: skip
        import openai

        self.config, self.cache, self.log = config, cache, log
        self.poll_interval, self.max_rounds = poll_interval, max_rounds
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.client = client or openai.OpenAI(
            base_url=config.resolved_base_url, api_key=config.api_key(), max_retries=config.max_retries,
            timeout=config.request_timeout,
        )  # fmt: skip
        self.mode = starting_mode(config.response_format, cache, config.model)
        self.imported = dict.fromkeys(("answered", "refused", "to_retry", "already", "prompt_tokens",
                                       "completion_tokens"), 0)  # fmt: skip
        self.submitted: list[str] = []

    # -- records ---------------------------------------------------------------------------------------
    def records(self) -> dict[str, dict[str, Any]]:
        """Every batch this cache submitted, by round: id -> record (round, digest, requests, state, status,
        counts)."""
        records = {
            batch_id: json.loads(value)
            for batch_id, value in self.cache.meta_items(_API).items()
            if not batch_id.startswith(("submitting:", "file:"))
        }
        return dict(sorted(records.items(), key=lambda item: item[1]["round"]))

    def _record(self, batch_id: str, record: dict[str, Any]) -> None:
        self.cache.set_meta(_API + batch_id, json.dumps(record, sort_keys=True))

    # -- rounds ----------------------------------------------------------------------------------------
    def run(self) -> Any:
        """Rounds until the plan needs no more answers; returns the finished (replayed) builder."""
        for _ in range(self.max_rounds):
            self._adopt_orphans()
            collected = [self.collect(batch_id) for batch_id, record in self.records().items()
                         if record["state"] == "submitted"]  # fmt: skip
            builder = SyntheticDatasetBuilder(self.config, deferred=True)
            builder.build()
            if not builder.pending:
                return builder
            if collected and not any(counts["answered"] or counts["refused"] for counts in collected):
                raise BatchAPIError(
                    "The last batch ended without a single answer; nothing more is submitted in this run. Run "
                    "the same command again to submit its requests again (answers already collected are kept)."
                )
            parts = split_requests(builder.pending, self.max_requests, self.max_bytes)
            round_number = mark_exported(self.cache, builder.pending)
            for index, part in enumerate(parts, 1):
                label = f" (part {index} of {len(parts)})" if len(parts) > 1 else ""
                self.submit(part, builder.report["batch"]["waiting_examples"], round_number, label)
        raise BatchAPIError(
            f"Still unfinished after {self.max_rounds} batch rounds; run the same command again."
        )

    def submit(
        self, pending: dict[str, dict[str, Any]], waiting: int, round_number: int, part: str = ""
    ) -> str:
        """Create one batch of ``pending`` (``part`` of round ``round_number``, for the log) and record it."""
        content = request_file(pending)
        digest = hashlib.sha256(content).hexdigest()[:32]
        batch = self._adopt(digest) if self.cache.get_meta(_SUBMITTING + digest) else None
        if batch is None:
            file_id = self.cache.get_meta(_UPLOADED + digest)
            if file_id is None:
                file_id = self.client.files.create(file=(f"st-synth-round-{round_number}.jsonl", content),
                                                   purpose="batch").id  # fmt: skip
                self.cache.set_meta(_UPLOADED + digest, file_id)
            self.cache.set_meta(_SUBMITTING + digest, str(round_number))
            batch = self.client.batches.create(
                input_file_id=file_id, endpoint=URL, completion_window=COMPLETION_WINDOW,
                metadata={"st_synth_requests": digest, "st_synth_round": str(round_number)},
            )  # fmt: skip
        self._record(batch.id, {"round": round_number, "digest": digest, "requests": len(pending),
                                "state": "submitted"})  # fmt: skip
        self.submitted.append(batch.id)
        self.log(f"round {round_number}{part}: batch {batch.id} submitted with {len(pending)} requests for {waiting} "
                 "examples")  # fmt: skip
        return batch.id

    def _adopt_orphans(self) -> None:
        """Record every batch the API created but this cache never recorded (a kill between the two), found by
        the digest of its requests file, before the plan is replayed: the next round's parts may be cut
        differently, so a later submit would not recognise it."""
        recorded = {record["digest"] for record in self.records().values()}
        for digest, round_number in self.cache.meta_items(_SUBMITTING).items():
            if digest not in recorded and (batch := self._adopt(digest)) is not None:
                total = batch.request_counts.total if batch.request_counts else 0
                self._record(batch.id, {"round": int(round_number), "digest": digest, "requests": total,
                                        "state": "submitted"})  # fmt: skip

    def _adopt(self, digest: str) -> Any:
        """The batch of this requests file that the API created but this cache never recorded (a run killed
        between the two), or None."""
        known = set(self.records())
        for scanned, batch in enumerate(self.client.batches.list(limit=100)):
            if (batch.metadata or {}).get("st_synth_requests") == digest and batch.id not in known:
                self.log(f"found batch {batch.id} submitted before the last run stopped: polling it instead of "
                         "submitting again")  # fmt: skip
                return batch
            if scanned >= 1000:
                break
        return None

    def collect(self, batch_id: str) -> dict[str, int]:
        """Poll a submitted batch until it ends, then import its output and error files."""
        from tqdm.auto import tqdm

        record = self.records()[batch_id]
        batch = self.client.batches.retrieve(batch_id)
        with tqdm(total=record["requests"], desc=f"batch {batch_id}", unit="req",
                  disable=not self.config.show_progress) as bar:  # fmt: skip
            while batch.status not in TERMINAL:
                counts = batch.request_counts
                bar.n = (counts.completed + counts.failed) if counts else 0
                bar.set_postfix_str(batch.status)
                time.sleep(self.poll_interval)
                batch = self.client.batches.retrieve(batch_id)
        counts = dict.fromkeys(self.imported, 0)
        if batch.status == "failed":
            self._record(batch_id, {**record, "state": "collected", "status": "failed"})
            errors = "; ".join(f"{e.message} (line {e.line})" if e.line else str(e.message)
                               for e in ((batch.errors.data or []) if batch.errors else []))  # fmt: skip
            raise BatchAPIError(
                f"Batch {batch_id} failed validation, nothing in it ran or was charged: {errors or 'no reason given'}. "
                "Fix that and run the same command again."
            )
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                lines = self.client.files.content(file_id).text.splitlines()
                for name, value in import_lines(self.cache, lines, self.mode, f"file {file_id}").items():
                    counts[name] += value
        for name, value in counts.items():
            self.imported[name] += value
        self._record(batch_id, {**record, "state": "collected", "status": batch.status, "counts": counts})
        self.log(f"batch {batch_id} {batch.status}: {counts['answered']} answers, {counts['refused']} refused "
                 f"(dropped), {counts['to_retry']} not run or failed transiently (submitted again)")  # fmt: skip
        return counts

    def describe(self) -> dict[str, Any]:
        """The report's account of the Batch API route: batches, this run's imports and their price."""
        return {
            "route": "openai_batch_api",
            "batches": self.records(),
            "submitted_this_run": self.submitted,
            "imported_this_run": dict(self.imported),
            **({"imported_cost_usd": self.config.cost(self.imported["prompt_tokens"],
                                                      self.imported["completion_tokens"], batch=True)}
               if self.config.priced else {}),
        }  # fmt: skip
