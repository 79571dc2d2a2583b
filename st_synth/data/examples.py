"""What a folder of st-synth examples holds: the texts sentence-transformers trains on, as they are, and
beside them the metadata st-synth's own stages read.

:func:`save_examples` writes, for one split per task kind:

- ``folder/`` (``save_to_disk``): the columns ``anchor``, ``positive`` [, ``negative``] and nothing else, in
  the order sentence-transformers' losses read them. The task instruction is formatted into the texts as
  :class:`InstructionFormat` says (by default the e5 way: before the anchor, and before every text of a
  symmetric kind), so ``SentenceTransformerTrainer(train_dataset=load_from_disk(folder)[kind], ...)`` trains
  on it with no conversion.
- ``folder/metadata/`` (``save_to_disk``): the same splits and rows, in the same order: ``instruction``,
  ``instruction_prefix`` (the exact text put before each instructed text; "" when none),
  ``instructed_columns`` (which text columns carry it), ``language`` and ``template``. On the Hub this is the
  dataset's ``metadata`` configuration (:func:`st_synth.cards.hub.push_dataset`).

:func:`load_examples` joins the two back into the working form the stages use, the texts without their
prefixes (columns ``instruction``, ``query``, ``positive`` [, ``negative``], ``language``, ``template``),
and reads a folder written by st-synth 0.1 (which held that working form itself) with a warning.

Example::

    from datasets import load_from_disk

    data = load_from_disk("outputs/local-smollm2/data")   # anchor, positive[, negative] per kind
    data["retrieval"][0]["anchor"]                       # 'Instruct: ...\\nQuery: ...'
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets

from st_synth.common.names import REPORT_FILE
from st_synth.common.taxonomy import PROVENANCE_COLUMNS, TASK_KINDS
from st_synth.data.reader import read_dataset
from st_synth.model.embedder import (
    DEFAULT_INSTRUCTION_TEMPLATE,
    check_instruction_template,
    format_instruction,
)

logger = logging.getLogger(__name__)

# The working form's text columns and the saved (sentence-transformers) names of the same texts.
TEXT_COLUMNS = ("query", "positive", "negative")
SAVED_TEXT_COLUMNS = ("anchor", "positive", "negative")
METADATA = "metadata"  # the sidecar folder, and the Hub configuration of the same name
METADATA_COLUMNS = ("instruction", "instruction_prefix", "instructed_columns", *PROVENANCE_COLUMNS)
INSTRUCTION_MODES = {
    "e5": "the paper's way: before the anchor, and before every text of a symmetric kind (sts, bitext, ...)",
    "anchor": "before the anchor only, for every kind",
    "none": "not in the texts (in the metadata only)",
}


@dataclass(frozen=True)
class InstructionFormat:
    """How the instruction is put into the saved texts: ``mode`` (one of :data:`INSTRUCTION_MODES`) and the
    ``template`` that holds it (``{instruction}`` exactly once; the embedder's query template)."""

    mode: str = "e5"
    template: str = DEFAULT_INSTRUCTION_TEMPLATE

    def __post_init__(self) -> None:
        if self.mode not in INSTRUCTION_MODES:
            choices = "; ".join(f"{name} ({what})" for name, what in INSTRUCTION_MODES.items())
            raise ValueError(f"instructions {self.mode!r} is unknown; choose one of: {choices}.")
        check_instruction_template(self.template)

    def instructed(self, kind: str, columns: list[str]) -> list[str]:
        """The saved text ``columns`` of split ``kind`` that get the instruction."""
        if self.mode == "none":
            return []
        symmetric = kind in TASK_KINDS and TASK_KINDS[kind].symmetric
        return list(columns) if self.mode == "e5" and symmetric else columns[:1]

    def describe(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def of(cls, report: dict[str, Any]) -> InstructionFormat:
        """The format a generation report records (the default for reports written before it did)."""
        return cls(**report.get("instructions", {}))


def to_saved(examples: DatasetDict, instructions: InstructionFormat) -> tuple[DatasetDict, DatasetDict]:
    """The working form -> (texts for sentence-transformers, metadata), split by split, rows aligned."""
    texts, metadata = {}, {}
    for kind, split in examples.items():
        present = [c for c in TEXT_COLUMNS if c in split.column_names]
        saved = [SAVED_TEXT_COLUMNS[TEXT_COLUMNS.index(c)] for c in present]
        instructed = instructions.instructed(kind, saved)
        formatted = apply_instructions(
            split, kind, instructions.template, bool(instructed), instructed == saved
        )
        texts[kind] = formatted.rename_columns(dict(zip(present, saved, strict=True)))

        def describe(row: dict[str, Any], instructed=instructed) -> dict[str, str]:
            prefix = format_instruction(row["instruction"], instructions.template) if instructed else ""
            return {"instruction_prefix": prefix, "instructed_columns": ",".join(instructed)}

        described = split.map(describe, desc=f"Describing {kind}")
        metadata[kind] = described.select_columns(
            [c for c in METADATA_COLUMNS if c in described.column_names]
        )
    return DatasetDict(texts), DatasetDict(metadata)


def from_saved(texts: DatasetDict, metadata: DatasetDict, where: str) -> DatasetDict:
    """(texts, metadata) as saved -> the working form: the instruction prefixes taken off again."""
    if set(texts) != set(metadata):
        raise ValueError(
            f"{where}: the texts have splits {sorted(texts)} but {METADATA}/ has {sorted(metadata)}."
        )
    examples = {}
    for kind, split in texts.items():
        meta = metadata[kind]
        if meta.num_rows != split.num_rows:
            raise ValueError(
                f"{where}: split {kind!r} has {split.num_rows} rows but {meta.num_rows} in {METADATA}/."
            )
        saved = [c for c in SAVED_TEXT_COLUMNS if c in split.column_names]

        def strip(row: dict[str, Any], saved=saved, kind=kind) -> dict[str, Any]:
            prefix, instructed = row["instruction_prefix"], row["instructed_columns"].split(",")
            out = {}
            for column in saved:
                text = row[column]
                if prefix and column in instructed:
                    if not text.startswith(prefix):
                        raise ValueError(
                            f"{where}: a {kind} {column} lacks the instruction its metadata names."
                        )
                    text = text[len(prefix) :]
                out[TEXT_COLUMNS[SAVED_TEXT_COLUMNS.index(column)]] = text
            return out

        joined = concatenate_datasets([split, meta], axis=1)
        stripped = joined.map(strip, remove_columns=[*saved, "instruction_prefix", "instructed_columns"],
                              desc=f"Reading {kind}")  # fmt: skip
        order = [
            "instruction",
            *(TEXT_COLUMNS[SAVED_TEXT_COLUMNS.index(c)] for c in saved),
            *PROVENANCE_COLUMNS,
        ]
        examples[kind] = stripped.select_columns([c for c in order if c in stripped.column_names])
    return DatasetDict(examples)


def save_examples(examples: DatasetDict, folder: str | Path, instructions: InstructionFormat) -> DatasetDict:
    """Save the working-form ``examples`` to ``folder`` (texts, and ``metadata/`` beside them); return the
    texts as saved (what ``load_from_disk(folder)`` gives)."""
    texts, metadata = to_saved(examples, instructions)
    write_saved(texts, metadata, folder)
    return texts


def write_saved(texts: DatasetDict, metadata: DatasetDict, folder: str | Path) -> None:
    """Write what :func:`to_saved` gave to ``folder`` (the texts) and ``folder/metadata``."""
    texts.save_to_disk(str(folder))
    metadata.save_to_disk(str(Path(folder) / METADATA))


def load_examples(source: str | Path, what: str = "Examples") -> DatasetDict:
    """The working form of a saved folder (or Hub dataset) of examples: see the module docstring.

    Raises:
        ValueError: naming ``source`` when it holds no st-synth examples.
    """
    examples, instructions = read_examples(source, what)
    if instructions is None:
        columns = sorted({c for split in examples.values() for c in split.column_names})
        raise ValueError(
            f"{what} {source} has columns {columns} and no {METADATA} part: it is not a dataset st-synth saved "
            f"({', '.join(SAVED_TEXT_COLUMNS)} per kind, with instructions, languages and templates in {METADATA}/)."
        )
    return examples


def read_examples(source: str | Path, what: str) -> tuple[DatasetDict, InstructionFormat | None]:
    """st-synth's examples in the working form with the format they were saved in, or any other dataset as it
    is (one split is named ``train``) with None. ``source``: a folder ``save_examples`` wrote, a Hub dataset
    :func:`st_synth.cards.hub.push_dataset` uploaded (or its downloaded folder), or anything
    :func:`st_synth.data.reader.read_dataset` reads."""
    local = Path(source)
    if (local / "dataset_dict.json").is_file():  # save_to_disk's folder: the metadata beside it, if any
        metadata = read_dataset(local / METADATA, what) if (local / METADATA).is_dir() else None
        texts = read_dataset(source, what)
    else:  # a Hub dataset: one subset per kind and a `metadata` subset, if st-synth uploaded it
        try:
            metadata = read_dataset(source, what, subset=METADATA)
        except ValueError:
            metadata = None
        texts = (
            DatasetDict({kind: read_dataset(source, what, subset=kind, split="train") for kind in metadata})
            if isinstance(metadata, DatasetDict)
            else read_dataset(source, what)
        )
    texts = texts if isinstance(texts, DatasetDict) else DatasetDict({"train": texts})
    columns = {c for split in texts.values() for c in split.column_names}
    if {"instruction", "query"} <= columns:
        logger.warning("%s %s was saved by st-synth 0.1 (instructions, languages and templates beside the texts); "
                       "read as such. Save it again to get sentence-transformers' columns.", what, source)  # fmt: skip
        return texts, saved_format(source)
    if metadata is None or not columns <= set(SAVED_TEXT_COLUMNS):
        return texts, None
    return from_saved(texts, metadata, f"{what} {source}"), saved_format(source)


def save_like(data: DatasetDict, folder: str | Path, instructions: InstructionFormat | None) -> None:
    """Save what :func:`read_examples` gave (changed by a stage) the way it came: st-synth's examples with their
    format, anything else as it is."""
    if instructions is None:
        data.save_to_disk(str(folder))
    else:
        save_examples(data, folder, instructions)


def saved_format(folder: str | Path) -> InstructionFormat:
    """The instruction format a saved folder's generation report records (the default without a report, or
    for a Hub dataset)."""
    report = Path(folder) / REPORT_FILE
    return InstructionFormat.of(json.loads(report.read_text()) if report.is_file() else {})


def apply_instructions(
    split: Dataset, name: str, template: str, use_instructions: bool, symmetric: bool
) -> Dataset:
    """A working-form split -> its text columns only (query, positive[, negative]), the instruction in
    ``template`` before the query (and before every text where ``symmetric``); training's own settings."""
    _check_working(name, split)
    texts = [column for column in TEXT_COLUMNS if column in split.column_names]

    def instruct(row: dict[str, str]) -> dict[str, str]:
        prefix = format_instruction(row["instruction"], template) if use_instructions else ""
        return {
            column: (prefix + row[column] if column == "query" or symmetric else row[column])
            for column in texts
        }

    return split.map(instruct, remove_columns=[c for c in split.column_names if c not in texts])


def _check_working(name: str, split: Dataset) -> None:
    missing = [column for column in ("instruction", "query", "positive") if column not in split.column_names]
    if missing:
        raise ValueError(f"Split {name!r} lacks columns {missing}; it has {split.column_names}.")
