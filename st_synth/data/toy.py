"""A small learnable synthetic dataset in the working form (:mod:`st_synth.data.examples`), saved in the exact
layout `st-synth generate` writes (for tests, smoke runs and CPU benchmarks): topic words make positives
findable and negatives come from other topics."""

from __future__ import annotations

import json
import random
from pathlib import Path

from datasets import Dataset, DatasetDict

from st_synth.common.names import REPORT_FILE
from st_synth.common.taxonomy import TASK_KINDS
from st_synth.data.examples import InstructionFormat, save_examples

TOPICS = {
    "animals": "cat cats dog dogs bird fish horse cow animal pet pets".split(),
    "food": "food eat bread flour yeast oven bake recipe cook kitchen meal dinner".split(),
    "market": "stock market price prices bank money invest investor shares trade economy".split(),
    "sport": "football soccer team game match goal player players score season".split(),
    "computers": "computer code program python software bug error file data model".split(),
    "weather": "weather rain sun snow cold hot wind storm summer winter".split(),
}
INSTRUCTIONS = {
    "retrieval": "find the relevant document",
    "classification": "classify the topic",
    "sts": "Retrieve semantically similar text.",
    "short_short": "find the title of the text",
    "long_long": "find the document on the same topic",
    "bitext": "Retrieve parallel sentences.",
}
TOY_KINDS = ("retrieval", "classification", "sts")


def _phrase(rng: random.Random, topic: str, length: int) -> str:
    return " ".join(rng.choice(TOPICS[topic]) for _ in range(length))


def toy_synthetic(
    rows_per_kind: int | dict[str, int] = 48, seed: int = 0, kinds: tuple[str, ...] = TOY_KINDS
) -> DatasetDict:
    """``kinds`` may name any of the six; short_short and long_long get no negative column, like
    generated data. ``rows_per_kind`` may differ per kind (a mapping)."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    splits: dict[str, dict[str, list[str]]] = {}
    for kind in kinds:
        columns: dict[str, list[str]] = {c: [] for c in TASK_KINDS[kind].columns}
        rows = rows_per_kind[kind] if isinstance(rows_per_kind, dict) else rows_per_kind
        for index in range(rows):
            topic, other = rng.sample(topics, 2)
            columns["instruction"].append(INSTRUCTIONS[kind])
            columns["query"].append(
                _phrase(rng, topic, 3 if kind != "classification" else 6) + f" {index % 10}"
            )
            if kind == "classification":
                columns["positive"].append(topic)
                columns["negative"].append(other)
            else:
                columns["positive"].append(_phrase(rng, topic, 8 if kind != "long_long" else 16))
                negative = _phrase(rng, other, 8)
                if "negative" in columns:
                    columns["negative"].append(negative)
            columns["language"].append("English-German" if kind == "bitext" else "English")
            columns["template"].append("toy")
        splits[kind] = columns
    return DatasetDict({kind: Dataset.from_dict(columns) for kind, columns in splits.items()})


def write_toy_synthetic(
    folder: str | Path,
    rows_per_kind: int | dict[str, int] = 48,
    seed: int = 0,
    kinds: tuple[str, ...] = TOY_KINDS,
) -> Path:
    """Save the toy set like `st-synth generate` does, with a generation report beside it."""
    folder = Path(folder)
    data = toy_synthetic(rows_per_kind, seed, kinds)
    save_examples(data, folder, InstructionFormat())
    report = {
        "generator_model": "toy-generator", "kept_by_kind": {k: v.num_rows for k, v in data.items()},
        "kept_by_language": {"English": sum(v.num_rows for v in data.values())}, "languages": "English",
        "total_prompt_tokens": 1000, "total_completion_tokens": 2000, "total_cost_usd": 0.01,
        "instructions": InstructionFormat().describe(), "prompts_version": "v1", "temperature": 1.0, "top_p": 1.0,
        "seed": seed, "requests_sent": 0, "cache_hits": 0, "retries": 0, "drops": {}, "near_duplicate_threshold": None,
    }  # fmt: skip
    (folder / REPORT_FILE).write_text(json.dumps(report))
    return folder
