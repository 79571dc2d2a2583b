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

import json
from pathlib import Path
from typing import Any

from st_synth.cache import AnswerCache
from st_synth.client import answer_from, is_transient

URL = "/v1/chat/completions"
_EXPORTED = "batch:exported:"
_REFUSED = "batch:refused:"
_ROUND = "batch:round"


class BatchFileError(ValueError):
    """A results file that cannot be imported (not JSON lines, or lines for requests never exported)."""


def deferred_line(key: str, body: dict[str, Any]) -> dict[str, Any]:
    """The Batch API request line of one request."""
    return {"custom_id": key, "method": "POST", "url": URL, "body": body}


def refused_reason(cache: AnswerCache, key: str) -> str | None:
    return cache.get_meta(_REFUSED + key)


def export_requests(cache: AnswerCache, lines: dict[str, dict[str, Any]], path: str | Path) -> int:
    """Write ``lines`` (sorted by key: the same plan gives the same file) and record them as exported;
    return the round number."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for key in sorted(lines):
            out.write(json.dumps(lines[key], ensure_ascii=False) + "\n")
    partial.replace(path)
    round_number = int(cache.get_meta(_ROUND) or 0) + 1
    for key in lines:
        cache.set_meta(_EXPORTED + key, str(round_number))
    cache.set_meta(_ROUND, str(round_number))
    return round_number


def import_results(cache: AnswerCache, path: str | Path, mode: str) -> dict[str, int]:
    """Store the answers of a Batch API results file in the cache. Every line is checked before any is
    stored: each ``custom_id`` must be one this cache exported. Returns counts: answered, refused (4xx),
    to_retry (transient failures, exported again next round), already (answers the cache had)."""
    path = Path(path)
    if not path.is_file():
        raise BatchFileError(f"No results file at {path}.")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key = entry["custom_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BatchFileError(
                f"{path}, line {number}: not a Batch API result line (JSON with a custom_id)."
            ) from None
        if cache.get_meta(_EXPORTED + str(key)) is None:
            raise BatchFileError(
                f"{path}, line {number}: custom_id {key!r} is not a request this cache exported (another run's "
                "results, or another cache?). Nothing was imported."
            )
        entries.append(entry)
    counts = {"answered": 0, "refused": 0, "to_retry": 0, "already": 0}
    for entry in entries:
        key = entry["custom_id"]
        if cache.get(key) is not None:
            counts["already"] += 1
            continue
        response = entry.get("response") or {}
        status = response.get("status_code")
        if status == 200 and isinstance(response.get("body"), dict):
            cache.put(key, answer_from(response["body"], mode).cache_value())
            counts["answered"] += 1
        elif isinstance(status, int) and status >= 400 and not is_transient(status):
            cache.set_meta(_REFUSED + key, f"http_{status}")
            counts["refused"] += 1
        else:
            counts["to_retry"] += 1
    return counts
