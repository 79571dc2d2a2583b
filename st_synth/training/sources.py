"""The training sources of a run, one split each: the generated dataset (each kind its own source), extra
datasets and public data, instructions applied the e5 way, evaluation texts removed (decontamination)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets

from st_synth.common.names import REPORT_FILE
from st_synth.common.taxonomy import TASK_KINDS, get_kind
from st_synth.data.examples import TEXT_COLUMNS, apply_instructions, load_examples
from st_synth.data.mining import MiningArguments
from st_synth.data.public_data import parse_sources, prepare_public
from st_synth.data.reader import read_dataset
from st_synth.evaluation.decontamination import Decontaminator, evaluation_texts
from st_synth.model.embedder import (
    check_instruction_template,
    format_instruction,
)
from st_synth.training.arguments import DataArguments

logger = logging.getLogger(__name__)


# What load_sources' report holds beside the generated dataset's own report (its generation_report.json).
SOURCE_REPORTS = ("public_data", "decontamination")


def load_sources(data: DataArguments, instruction_template: str) -> tuple[DatasetDict, dict[str, Any]]:
    """The training sources (one split each), instructions applied, plus the synthetic generation report
    with the public data's and decontamination's reports under :data:`SOURCE_REPORTS`.

    Refuses, before any model is loaded: a missing dataset, unknown kinds, missing columns, empty splits.
    """
    check_instruction_template(instruction_template)
    sources: dict[str, Dataset] = {}
    report: dict[str, Any] = {}
    clean = _decontaminator(data.decontaminate)
    if data.dataset:
        synthetic = load_examples(data.dataset, "Training data")
        report_path = Path(data.dataset) / REPORT_FILE
        if report_path.is_file():
            report = json.loads(report_path.read_text())
        wanted = data.kinds or list(synthetic)
        for kind in wanted:
            get_kind(kind)
        absent = [kind for kind in wanted if kind not in synthetic]
        if absent:
            raise ValueError(f"Kinds {absent} are not in {data.dataset}; it has: {', '.join(synthetic)}.")
        for kind in wanted:
            _refuse_empty(kind, synthetic[kind])
            sources[kind] = _prepare_synthetic(
                clean(kind, synthetic[kind]), kind, instruction_template, data.use_instructions,
                data.symmetric_instructions,
            )  # fmt: skip
    for spec in data.extra_datasets:
        name, dataset = _prepare_extra(spec, instruction_template, data.use_instructions, clean)
        sources[name] = dataset
    if data.public_datasets:
        for name, (dataset, symmetric) in _public_sources(data, report).items():
            if name in sources:
                raise ValueError(
                    f"Public dataset {name!r} has the name of another training source; rename it."
                )
            sources[name] = apply_instructions(clean(name, dataset), name, instruction_template, data.use_instructions,
                                        symmetric and data.symmetric_instructions)  # fmt: skip
    if not data.hard_negatives:
        sources = {name: ds.remove_columns([c for c in ds.column_names if c == "negative"])
                   for name, ds in sources.items()}  # fmt: skip
    if not sources:
        raise ValueError(
            "No training data: pass --dataset (a `st-synth generate` folder) or --extra_datasets."
        )
    for name, dataset in sources.items():
        _refuse_empty(name, dataset)
        if data.max_examples_per_source:
            sources[name] = dataset.select(range(min(dataset.num_rows, data.max_examples_per_source)))
    if data.decontaminate:
        report = {**report, "decontamination": {"tasks": list(data.decontaminate), "sources": clean.report}}
    if data.mix_sources:
        sources = {MIXED_SOURCE: _mixed(sources)}
    return DatasetDict(sources), report


MIXED_SOURCE = "mixed"


def _public_sources(data: DataArguments, report: dict[str, Any]) -> dict[str, tuple[Dataset, bool]]:
    """The public datasets (``public_datasets``), prepared or read from their cache; their report goes in
    ``report["public_data"]``. Name -> (rows with an instruction column, symmetric)."""
    specs = parse_sources(data.public_datasets)
    mining = MiningArguments(mining_model=data.public_mining_model, query_prompt=data.public_mining_query_prompt,
                             corpus_prompt=data.public_mining_corpus_prompt)  # fmt: skip
    cache = Path(data.public_cache) if data.public_cache else Path.home() / ".cache" / "st_synth" / "public"
    prepared, report["public_data"] = prepare_public(specs, data.public_seed, mining, cache)
    symmetric = {spec.name: spec.symmetric for spec in specs}
    return {name: (prepared[name], symmetric[name]) for name in prepared}


def _mixed(sources: dict[str, Dataset]) -> Dataset:
    """All sources as one dataset (``mix_sources``): they must have the same columns."""
    columns = {name: tuple(ds.column_names) for name, ds in sources.items()}
    if len(set(columns.values())) > 1:
        listed = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in columns.items())
        raise ValueError(
            f"mix_sources needs sources with the same columns, and these differ ({listed}). Drop the negatives "
            "(--hard_negatives false) or train on sources of one shape (--kinds)."
        )
    return concatenate_datasets(list(sources.values()))


def _decontaminator(tasks: list[str]) -> Any:
    """A function (name, raw dataset) -> the dataset without rows overlapping the texts of ``tasks``, that
    counts what it dropped in its ``report`` (the identity when no task is named)."""
    checker = Decontaminator(evaluation_texts(tasks)) if tasks else None

    def clean(name: str, dataset: Dataset) -> Dataset:
        if checker is None:
            return dataset
        kept, report = checker.apply(DatasetDict({name: dataset}))
        clean.report[name] = report["sources"][name]
        return kept[name]

    clean.report = {}
    return clean


def _refuse_empty(name: str, dataset: Dataset) -> None:
    if dataset.num_rows == 0:
        raise ValueError(f"Training source {name!r} is empty; drop it or generate examples of that kind.")


def _prepare_synthetic(split: Dataset, kind: str, template: str, use_instructions: bool = True,
                       symmetric_instructions: bool = True) -> Dataset:  # fmt: skip
    symmetric = TASK_KINDS[kind].symmetric and symmetric_instructions
    return apply_instructions(split, kind, template, use_instructions, symmetric)


def _prepare_extra(spec: str, template: str, use_instructions: bool = True,
                   clean: Any = None) -> tuple[str, Dataset]:  # fmt: skip
    name, sep, rest = spec.partition("=")
    path, bar, instruction = rest.partition("|")
    if not sep or not bar or not name.strip() or not path.strip() or not instruction.strip():
        raise ValueError(f"Extra dataset {spec!r} must look like NAME=PATH_OR_HUB_ID|INSTRUCTION.")
    dataset = read_dataset(path.strip(), f"Extra dataset {name.strip()!r}")
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{path} has no 'train' split; it has: {', '.join(dataset)}.")
        dataset = dataset["train"]
    columns = dataset.column_names
    if len(columns) < 2:
        raise ValueError(f"{path} needs at least (query, positive) columns; it has {columns}.")
    kept = columns[:3]
    dataset = dataset.select_columns(kept).rename_columns(dict(zip(kept, TEXT_COLUMNS, strict=False)))
    if clean is not None:
        dataset = clean(name.strip(), dataset)
    if not use_instructions:
        return name.strip(), dataset
    prefix = format_instruction(instruction, template)
    return name.strip(), dataset.map(lambda row: {"query": prefix + row["query"]})
