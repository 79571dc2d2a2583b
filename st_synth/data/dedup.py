"""``st-synth dedup``: one dataset from the shards of a generation, repeats across shards removed.

Each shard removes exact and near-duplicates among its own examples while it generates (and asks again, so
it keeps its N); two shards cannot see each other's examples. This step walks the union, shard by shard in
``shard_index`` order and each shard's rows in order (so the lower shard, then the earlier row, wins, for
any order the folders are given in), and drops every example that repeats one before it: the same
normalised texts (the generator's key, :func:`st_synth.data.neardup.exact_key`), or (unless turned off) a near-duplicate by the generator's rule (:mod:`st_synth.data.neardup`).
Nothing is asked again (there is no endpoint here), so the union may keep a little less than the sum of the
shards; ``dedup_report.json`` says how much, per kind and reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import DatasetDict, concatenate_datasets

from st_synth.common.names import REPORT_FILE
from st_synth.common.taxonomy import PROVENANCE_COLUMNS
from st_synth.common.text import normalize
from st_synth.data.examples import load_examples, saved_format
from st_synth.data.neardup import ExactKeys, NearDuplicateIndex, check_threshold, exact_key, signature

DEDUP_REPORT = "dedup_report.json"


def _load(folder: Path) -> tuple[int, DatasetDict, dict[str, Any]]:
    if not (folder / "dataset_dict.json").is_file():
        raise ValueError(f"{folder} is not a saved DatasetDict (an `st-synth generate` output folder).")
    report_file = folder / REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return int(report.get("shard_index", 0)), load_examples(folder, "Shard"), report


def dedup_shards(
    folders: list[str | Path], near_duplicates: bool = True, threshold: float = 0.8
) -> tuple[DatasetDict, dict[str, Any]]:
    """The union of the generation folders ``folders`` without repeats (the working form,
    :mod:`st_synth.data.examples`), and its report."""
    if near_duplicates:
        check_threshold(threshold)
    if not folders:
        raise ValueError("Give at least one `st-synth generate` folder.")
    loaded = sorted(((*_load(Path(f)), str(f)) for f in folders), key=lambda item: item[0])
    shards = [shard for shard, *_ in loaded]
    if len(set(shards)) != len(shards):
        raise ValueError(
            f"Two folders are the same shard (shard_index {sorted(shards)}): give each shard once."
        )
    formats = {saved_format(folder) for *_, folder in loaded}
    if len(formats) > 1:
        raise ValueError(f"The shards carry their instructions differently ({sorted(f.mode for f in formats)}); "
                         "generate every shard with the same --instructions and --instruction_template.")  # fmt: skip
    kinds = list(dict.fromkeys(kind for _, data, _, _ in loaded for kind in data))
    splits, removed, kept_by_kind = {}, {}, {}
    for kind in kinds:
        parts = [data[kind] for _, data, _, _ in loaded if kind in data]
        union = concatenate_datasets(parts)
        text_columns = [c for c in union.column_names if c != "instruction" and c not in PROVENANCE_COLUMNS]
        seen = ExactKeys()
        near = NearDuplicateIndex(threshold) if near_duplicates else None
        keep: list[int] = []
        counts = {"duplicate": 0, "near_duplicate": 0}
        for row_number, row in enumerate(union.select_columns(text_columns)):
            texts = [row[c] for c in text_columns]
            key = exact_key(kind, [normalize(t) for t in texts])
            if key in seen:
                counts["duplicate"] += 1
                continue
            if near is not None:
                sig = signature(texts)
                if near.find(sig) is not None:
                    counts["near_duplicate"] += 1
                    continue
                near.add(sig, row_number)
            seen.add(key)
            keep.append(row_number)
        if near is not None:
            near.close()
        splits[kind] = union.select(keep) if len(keep) < len(union) else union
        removed[kind] = counts
        kept_by_kind[kind] = len(keep)
    report = {
        "inputs": [
            {"folder": folder, "shard_index": shard, "examples": sum(len(d) for d in data.values())}
            for shard, data, _, folder in loaded
        ],
        "near_duplicates": near_duplicates,
        **({"near_duplicate_threshold": threshold} if near_duplicates else {}),
        "num_examples_in": sum(len(d) for _, data, _, _ in loaded for d in data.values()),
        "num_examples_kept": sum(kept_by_kind.values()),
        "kept_by_kind": kept_by_kind,
        "removed_by_kind": removed,
        "instructions": formats.pop().describe(),
    }
    return DatasetDict(splits), report
