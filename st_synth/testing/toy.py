"""A small learnable synthetic dataset in the exact layout `st-synth generate` writes (for tests, smoke
runs and CPU benchmarks): topic words make positives findable and negatives come from other topics."""

from __future__ import annotations

import json
import random
from pathlib import Path

from datasets import Dataset, DatasetDict

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
}


def _phrase(rng: random.Random, topic: str, length: int) -> str:
    return " ".join(rng.choice(TOPICS[topic]) for _ in range(length))


def toy_synthetic(rows_per_kind: int = 48, seed: int = 0) -> DatasetDict:
    rng = random.Random(seed)
    topics = list(TOPICS)
    splits: dict[str, dict[str, list[str]]] = {}
    for kind in ("retrieval", "classification", "sts"):
        columns: dict[str, list[str]] = {
            c: [] for c in ("instruction", "query", "positive", "negative", "language")
        }
        for index in range(rows_per_kind):
            topic, other = rng.sample(topics, 2)
            columns["instruction"].append(INSTRUCTIONS[kind])
            columns["query"].append(
                _phrase(rng, topic, 3 if kind != "classification" else 6) + f" {index % 10}"
            )
            if kind == "classification":
                columns["positive"].append(topic)
                columns["negative"].append(other)
            else:
                columns["positive"].append(_phrase(rng, topic, 8))
                columns["negative"].append(_phrase(rng, other, 8))
            columns["language"].append("English")
        splits[kind] = columns
    return DatasetDict({kind: Dataset.from_dict(columns) for kind, columns in splits.items()})


def write_toy_synthetic(folder: str | Path, rows_per_kind: int = 48, seed: int = 0) -> Path:
    """Save the toy set like `st-synth generate` does, with a generation report beside it."""
    folder = Path(folder)
    data = toy_synthetic(rows_per_kind, seed)
    data.save_to_disk(str(folder))
    report = {
        "generator_model": "toy-generator", "kept_by_kind": {k: v.num_rows for k, v in data.items()},
        "kept_by_language": {"English": sum(v.num_rows for v in data.values())}, "languages": "English",
        "total_prompt_tokens": 1000, "total_completion_tokens": 2000, "total_cost_usd": 0.01,
    }  # fmt: skip
    (folder / "generation_report.json").write_text(json.dumps(report))
    return folder
