"""LLM answers are untrusted data: parse with ``json``, check shape, types and sizes, reject trivia.

Every rejection is a :class:`Rejected` with a short machine-readable reason that the generation report
counts; nothing here ever evaluates model output.
"""

from __future__ import annotations

import json
import re

from st_synth.common.taxonomy import TaskKind
from st_synth.common.text import normalize

MAX_ANSWER_CHARS = 60_000
MAX_FIELD_CHARS = 12_000
MAX_TASK_CHARS = 400
MIN_TASK_CHARS = 8
MIN_TASK_WORDS = 3  # "write_list" is not a task description
# A template slot the model echoed instead of filling: "[topic]", "[the-important-content]", "{query}".
_PLACEHOLDER = re.compile(r"\[[a-z][a-z0-9 _-]{2,40}\]|\{[a-z_][a-z0-9 _-]{1,40}\}|<[a-z][a-z _-]{2,40}>")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_SPACES = re.compile(r"\s+")


class Rejected(ValueError):
    """An answer that cannot become training data; ``reason`` is a stable key for the report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def extract_json(content: str | None) -> object:
    """Parse an answer as JSON, tolerating a fenced block or prose around one JSON value."""
    if not content or not content.strip():
        raise Rejected("empty_answer")
    if len(content) > MAX_ANSWER_CHARS:
        raise Rejected("answer_too_long", f"{len(content)} characters")
    candidates = [content.strip(), *(m.strip() for m in _FENCE.findall(content))]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", content):
        try:
            value, _ = decoder.raw_decode(content, match.start())
            return value
        except json.JSONDecodeError:
            continue
    raise Rejected("invalid_json")


def parse_example(content: str | None, kind: TaskKind) -> tuple[str, ...]:
    """Return the example's texts in the kind's (anchor, positive[, negative]) key order."""
    return parse_example_keyed(content, kind)[0]


def answer_fields(content: str | None, keys: tuple[str, ...], clean=str.strip) -> list[str]:
    """The string values of ``keys`` in a JSON answer object, each passed through ``clean`` and checked:
    present, a string, non-empty, within the size cap, no echoed template slot."""
    value = extract_json(content)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0]  # a lone object wrapped in a list is still the object that was asked for
    if not isinstance(value, dict):
        raise Rejected("not_an_object", type(value).__name__)
    missing = [key for key in keys if key not in value]
    if missing:
        raise Rejected("missing_keys", ",".join(missing))
    texts = []
    for key in keys:
        field = value[key]
        if not isinstance(field, str):
            raise Rejected("wrong_type", f"{key} is {type(field).__name__}")
        field = clean(field)
        if not field:
            raise Rejected("empty_field", key)
        if len(field) > MAX_FIELD_CHARS:
            raise Rejected("field_too_long", key)
        if _PLACEHOLDER.search(field):
            raise Rejected("unfilled_placeholder", key)
        texts.append(field)
    return texts


def parse_example_keyed(content: str | None, kind: TaskKind) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """:func:`parse_example`, plus the texts in :func:`normalize`'d form: what duplicates are judged on."""
    texts = answer_fields(content, kind.keys)
    normalized = [normalize(text) for text in texts]
    if normalized[0] == normalized[1]:
        raise Rejected("query_equals_positive")
    if len(normalized) == 3 and normalized[2] in normalized[:2]:
        raise Rejected(
            "negative_equals_positive" if normalized[2] == normalized[1] else "negative_equals_query"
        )
    return tuple(texts), tuple(normalized)


def parse_tasks(content: str | None) -> list[str]:
    """Return the deduplicated task descriptions of a brainstorm answer (a JSON list of strings).

    A single-key object holding the list is accepted too: structured-output endpoints only allow an
    object at the root, so the schema we send wraps the list as ``{"tasks": [...]}``.
    """
    value = extract_json(content)
    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    if not isinstance(value, list):
        raise Rejected("not_a_list", type(value).__name__)
    seen: set[str] = set()
    tasks = []
    for item in value:
        if not isinstance(item, str):
            continue
        task = _SPACES.sub(" ", item).strip()
        key = normalize(task)
        usable = MIN_TASK_CHARS <= len(task) <= MAX_TASK_CHARS and len(task.split()) >= MIN_TASK_WORDS
        if usable and key not in seen and not _PLACEHOLDER.search(task):
            seen.add(key)
            tasks.append(task)
    if not tasks:
        raise Rejected("no_usable_tasks")
    return tasks
