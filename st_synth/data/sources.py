"""The data stage before training: the training sources of a run, one split each, read from the generated
dataset (each kind its own source), extra datasets and public data, evaluation texts removed
(decontamination), instructions applied the e5 way. Its settings are :class:`DataArguments` (the data flags
of ``st-synth train`` and keys of the run's ``train`` section); training consumes its output."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets

from st_synth.common.arguments import decode_json
from st_synth.common.names import REPORT_FILE
from st_synth.common.taxonomy import TASK_KINDS, get_kind
from st_synth.data.decontamination import Decontaminator
from st_synth.data.examples import TEXT_COLUMNS, apply_instructions, load_examples
from st_synth.data.mining import MiningArguments
from st_synth.data.public_data import parse_sources, prepare_public
from st_synth.data.reader import read_dataset
from st_synth.model.embedder import check_instruction_template, format_instruction

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    """The training data: the generated dataset (a saved folder or Hub id; each task kind one source), extra
    and public datasets, instructions, hard negatives, held-out rows and the evaluation tasks whose texts no
    training row may contain. The fields are the flags of ``st-synth train`` and the keys of its YAML file."""

    dataset: str = field(default="", metadata={"help": "Folder written by `st-synth generate`, or a Hub id."})
    kinds: list[str] | None = field(default=None, metadata={"help": "Train on these kinds (splits) only."})
    extra_datasets: list[str] = field(
        default_factory=list,
        metadata={"help": "Your own labeled data as NAME=PATH_OR_HUB_ID|INSTRUCTION; its first three columns "
                  "are read as (query, positive[, negative]). PATH may be builtin:lee-background-pairs (real "
                  "half-document pairs from news gensim ships) or builtin:wikipedia-section-pairs (real heading/passage "
                  "pairs from its Wikipedia sample)."},
    )  # fmt: skip
    max_examples_per_source: int | None = field(default=None)
    eval_examples: int = field(
        default=0,
        metadata={"help": "Rows held out of each source: their loss, and nDCG@10 of ranking each held-out query's "
                  "positive among the held-out texts (retrieval-like sources), at every evaluation step "
                  "(--eval_strategy steps --eval_steps N) and once after training, on the card."},
    )  # fmt: skip
    use_instructions: bool = field(
        default=True,
        metadata={"help": "Prefix queries with their task instruction (the paper). Off: plain text, and the "
                  "saved model's query prompt is empty too, so encode_query() reads texts as trained."},
    )  # fmt: skip
    decontaminate: list[str] = field(
        default_factory=list,
        metadata={"help": "mteb task names whose texts no training row may contain: a row with a text equal to "
                  "one of theirs (after normalisation) or sharing a 13-word run with one is dropped, and counted "
                  "per source (the training summary's `decontamination`)."},
    )  # fmt: skip
    hard_negatives: bool = field(
        default=True,
        metadata={"help": "Train on the generated hard negatives. Off: in-batch negatives only."},
    )
    symmetric_instructions: bool = field(
        default=True,
        metadata={"help": "Symmetric kinds (sts, bitext) put the instruction on both texts, as the paper does. "
                  "Off: on the query only, like the other kinds."},
    )  # fmt: skip
    public_datasets: str | list[Any] | None = field(
        default=None,
        metadata={"help": "Labelled datasets to mix in, the paper's way (a YAML list: name, path, split, columns, "
                  "sample_ratio, instructions, symmetric; st_synth.data.public_data): sampled with public_seed, each "
                  "query instructed, negatives mined where a dataset has none. recipes/configs/"
                  "e5-mistral-7b-full.yaml lists the paper's.", "flag_type": str | None, "metavar": "JSON"},
    )  # fmt: skip
    public_mining_model: str = field(
        default="all-MiniLM-L6-v2",
        metadata={
            "help": "Mines negatives for public datasets without any (the paper: intfloat/multilingual-e5-base)."
        },
    )
    public_mining_query_prompt: str | None = field(
        default=None, metadata={"help": "e.g. 'query: ' for e5 models."}
    )
    public_mining_corpus_prompt: str | None = field(
        default=None, metadata={"help": "e.g. 'passage: ' for e5 models."}
    )
    public_seed: int = field(
        default=42, metadata={"help": "Draws the sampled rows and instructions of public data."}
    )
    public_cache: str | None = field(
        default=None, metadata={"help": "Prepared public data (default ~/.cache/st_synth/public)."}
    )
    mix_sources: bool = field(
        default=False,
        metadata={"help": "Train all sources as one, so that a batch mixes tasks (in-batch negatives from other "
                  "tasks, which are easy). Default off: one source per batch (the recipe's choice; the paper does "
                  "not say). The sources must have the same columns."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.public_datasets:  # a bad entry fails here, before any data or model is loaded
            self.public_datasets = decode_json(self.public_datasets, "public_datasets")
            parse_sources(self.public_datasets)


# What load_sources' report holds beside the generated dataset's own report (its generation_report.json).
SOURCE_REPORTS = ("public_data", "decontamination")


def prepare_sources(
    data: DataArguments, instruction_template: str, evaluation_texts: Iterable[str] | None = None
) -> tuple[DatasetDict, dict[str, Any]]:
    """The data stage before training: the training sources (one split each), decontaminated, public data
    prepared, instructions applied; plus the synthetic generation report with the public data's and
    decontamination's reports under :data:`SOURCE_REPORTS`. Training consumes what this returns.

    Args:
        data: the data settings (the ``train`` section's data keys, ``st-synth train``'s data flags).
        instruction_template: the model's template, e.g. ``"Instruct: {instruction}\\nQuery: "``.
        evaluation_texts: the texts of the tasks ``data.decontaminate`` names
            (:func:`st_synth.evaluation.decontamination.evaluation_texts`); required when it names any.

    Example::

        texts = evaluation_texts(["LeeDocSTS"])
        sources, report = prepare_sources(DataArguments(dataset="outputs/run/data", decontaminate=["LeeDocSTS"]),
                                          "Instruct: {instruction}\\nQuery: ", texts)

    Refuses, before any model is loaded: a missing dataset, unknown kinds, missing columns, empty splits.
    """
    check_instruction_template(instruction_template)
    sources: dict[str, Dataset] = {}
    report: dict[str, Any] = {}
    clean = _decontaminator(data.decontaminate, evaluation_texts)
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


def _decontaminator(tasks: list[str], texts: Iterable[str] | None) -> Any:
    """A function (name, raw dataset) -> the dataset without rows overlapping ``texts`` (those of ``tasks``),
    that counts what it dropped in its ``report`` (the identity when no task is named)."""
    if tasks and texts is None:
        raise ValueError(
            f"decontaminate names {', '.join(tasks)} but no evaluation texts were given: pass "
            "evaluation_texts(data.decontaminate) (st_synth.evaluation.decontamination), or use "
            "st_synth.training.sources.load_sources, which does."
        )
    checker = Decontaminator(texts) if tasks else None

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
