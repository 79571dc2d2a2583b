"""The public-data half of the paper's recipe: labelled datasets mixed with the synthetic data.

The paper's best model trains on its synthetic data plus 13 public datasets, some sampled down (ELI5 0.1,
MS-MARCO passages 0.5 and documents 0.2, Quora 0.1, T2Ranking 0.5), each with its training instruction, hard
negatives mined with mE5-base. ``recipes/configs/e5-mistral-7b-full.yaml`` lists them; any list of the same
shape works (your own datasets too). One entry::

    - name: eli5                          # the training source's name
      path: sentence-transformers/eli5    # a Hub id, a `datasets` folder, or a .jsonl/.json/.csv/.parquet file
      subset: null                        # the Hub config, if any
      split: train                        # one split, or several (a list or comma-separated): concatenated
      columns: {query: question, positive: answer}   # optional: else query/anchor/question, ...
      sample_ratio: 0.1                   # the share of rows kept (drawn with the seed)
      instructions: ["Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum"]
      symmetric: false                    # true: the instruction goes on both texts (NLI, Quora)

A text column may hold a list (the first item is taken) or a passage mapping (its title and text). Rows
without a negative get one mined from the dataset's own positives (:mod:`st_synth.data.mining`). The prepared
sources are cached on disk by a digest of the entries and settings, so a second run (or a second process of
the same training) reads them instead of mining again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets

from st_synth.common.arguments import decode_json
from st_synth.common.prepared import build_once
from st_synth.common.text import name_list
from st_synth.data.guide import load_guide
from st_synth.data.mining import MiningArguments, mine_negatives
from st_synth.data.reader import load_saved, read_dataset

logger = logging.getLogger(__name__)

TEXT_ROLES = ("query", "positive", "negative")
# Column names tried, in order, when an entry does not map a role (sentence-transformers', BGE's, plain QA).
ROLE_COLUMNS = {
    "query": ("query", "anchor", "question", "sentence1"),
    "positive": ("positive", "pos", "answer", "document", "sentence2"),
    "negative": ("negative", "neg", "hard_negative"),
}


@dataclass(frozen=True)
class PublicSource:
    """One labelled dataset of the mix (see the module docstring for the fields)."""

    name: str
    path: str
    instructions: tuple[str, ...]
    sample_ratio: float = 1.0
    subset: str | None = None
    split: tuple[str, ...] = ("train",)
    columns: Mapping[str, str] = field(default_factory=dict)
    symmetric: bool = False

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "subset": self.subset, "split": list(self.split), "sample_ratio": self.sample_ratio,
                "instructions": list(self.instructions), "symmetric": self.symmetric}  # fmt: skip


def parse_sources(value: Any) -> list[PublicSource]:
    """Entries from YAML (a list of mappings, or its JSON through a flag), checked before anything loads."""
    entries = decode_json(value, "public_datasets")
    if isinstance(entries, Mapping) or not isinstance(entries, list):
        raise ValueError(
            "public_datasets takes a list of entries (mappings with name, path, instructions, ...)."
        )
    known = [f.name for f in fields(PublicSource)]
    sources, names = [], set()
    for position, entry in enumerate(entries, 1):
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"public_datasets entry {position} is {entry!r}, not a mapping of {', '.join(known)}."
            )
        label = f"public_datasets entry {position} ({entry.get('name', 'no name')})"
        unknown = sorted(set(entry) - set(known))
        if unknown:
            raise ValueError(f"{label}: unknown keys {unknown}; valid keys: {', '.join(known)}.")
        missing = [key for key in ("name", "path", "instructions") if not entry.get(key)]
        if missing:
            raise ValueError(f"{label}: missing {', '.join(missing)}.")
        instructions = entry["instructions"]
        instructions = tuple([instructions] if isinstance(instructions, str) else instructions)
        if not instructions or not all(isinstance(i, str) and i.strip() for i in instructions):
            raise ValueError(f"{label}: instructions must be one or more non-empty strings.")
        ratio = float(entry.get("sample_ratio", 1.0))
        if not 0 < ratio <= 1:
            raise ValueError(f"{label}: sample_ratio must be in (0, 1], got {ratio}.")
        split = entry.get("split") or "train"
        split = tuple(name_list(split))
        columns = dict(entry.get("columns") or {})
        if set(columns) - set(TEXT_ROLES):
            raise ValueError(f"{label}: columns maps roles {', '.join(TEXT_ROLES)}; got {sorted(columns)}.")
        if entry["name"] in names:
            raise ValueError(f"{label}: the name {entry['name']!r} is used twice.")
        names.add(entry["name"])
        sources.append(PublicSource(
            name=str(entry["name"]), path=str(entry["path"]), instructions=tuple(i.strip() for i in instructions),
            sample_ratio=ratio, subset=entry.get("subset"), split=split, columns=columns,
            symmetric=bool(entry.get("symmetric", False)),
        ))  # fmt: skip
    return sources


def _load_split(source: PublicSource, split: str) -> Dataset:
    """One split of a public source: a saved folder's split, a data file (one split), or a Hub split."""
    label = f"Public dataset {source.name!r}"
    if source.subset:
        label += f" (subset {source.subset})"
    return read_dataset(source.path, label, subset=source.subset, split=split)


def _role_columns(source: PublicSource, available: list[str]) -> dict[str, str]:
    roles: dict[str, str] = {}
    for role in TEXT_ROLES:
        if role in source.columns:
            if source.columns[role] not in available:
                raise ValueError(f"Public dataset {source.name!r}: column {source.columns[role]!r} (its {role}) is "
                                 f"not there; it has: {', '.join(available)}.")  # fmt: skip
            roles[role] = source.columns[role]
        elif found := next((c for c in ROLE_COLUMNS[role] if c in available), None):
            roles[role] = found
    absent = [role for role in ("query", "positive") if role not in roles]
    if absent:
        raise ValueError(f"Public dataset {source.name!r}: no column for {' and '.join(absent)} among "
                         f"{', '.join(available)}; map it with columns: {{{absent[0]}: COLUMN}}.")  # fmt: skip
    return roles


def _text(value: Any) -> str:
    """A text cell: a string, the first item of a list, or a passage mapping's title and text."""
    if isinstance(value, list):
        return _text(value[0]) if value else ""
    if isinstance(value, Mapping):
        return " ".join(str(value[k]).strip() for k in ("title", "text") if value.get(k))
    return "" if value is None else str(value).strip()


def load_source(source: PublicSource, seed: int) -> tuple[Dataset, dict[str, Any]]:
    """``source`` as (instruction, query, positive[, negative]) rows: sampled, instructed, empty texts dropped."""
    parts = [_load_split(source, split) for split in source.split]
    raw = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    roles = _role_columns(source, raw.column_names)
    keep = round(source.sample_ratio * raw.num_rows)
    picked = random.Random(f"{seed}:public:{source.name}").sample(range(raw.num_rows), keep)
    raw = raw.select(sorted(picked))
    rows: dict[str, list[str]] = {"instruction": [], **{role: [] for role in roles}}
    chooser = random.Random(f"{seed}:instruction:{source.name}")
    empty = 0
    for row in raw.select_columns(list(roles.values())):
        texts = {role: _text(row[column]) for role, column in roles.items()}
        if not all(texts.values()):
            empty += 1
            continue
        rows["instruction"].append(chooser.choice(source.instructions))
        for role, text in texts.items():
            rows[role].append(text)
    report = {**source.describe(), "rows": sum(p.num_rows for p in parts), "sampled": keep, "empty_dropped": empty,
              "columns": roles}  # fmt: skip
    return Dataset.from_dict(rows), report


def fingerprint(sources: list[PublicSource], seed: int, mining: MiningArguments) -> str:
    """A digest of what the prepared public data depends on (sources, seed, mining): its cache key."""
    state = {"sources": [s.describe() | {"name": s.name, "columns": dict(s.columns)} for s in sources],
             "seed": seed, "mining": mining.__dict__}  # fmt: skip
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_public(sources: list[PublicSource], seed: int, mining: MiningArguments,
                   cache_dir: str | Path) -> tuple[DatasetDict, dict[str, Any]]:  # fmt: skip
    """Every source loaded, sampled, instructed, and given mined negatives where it has none; cached in
    ``cache_dir/<digest>``, prepared by one process while any others wait (:func:`st_synth.common.prepared.build_once`).
    Returns the sources (one split each) and a report per source."""
    folder = build_once(Path(cache_dir) / fingerprint(sources, seed, mining),
                        lambda into: _prepare_into(into, sources, seed, mining),
                        complete=lambda path: (path / "public_data_report.json").is_file())  # fmt: skip
    return load_saved(folder / "data"), json.loads((folder / "public_data_report.json").read_text())


def _prepare_into(folder: Path, sources: list[PublicSource], seed: int, mining: MiningArguments) -> None:
    splits, report, model = {}, {}, None
    for source in sources:
        data, entry = load_source(source, seed)
        if "negative" not in data.column_names and data.num_rows:
            if model is None:
                model = load_guide(mining.mining_model)
            corpus = list(dict.fromkeys(data["positive"]))
            data, mined = mine_negatives(data, corpus, mining, model=model)
            entry["negatives"] = {"mined_with": mining.mining_model, **mined}
        else:
            entry["negatives"] = "the dataset's own"
        entry["kept"] = data.num_rows
        report[source.name] = entry
        if data.num_rows:
            splits[source.name] = data
    if not splits:
        raise ValueError("No public dataset kept any row: " + json.dumps(report, default=str))
    DatasetDict(splits).save_to_disk(str(folder / "data"))
    (folder / "public_data_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
