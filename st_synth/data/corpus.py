"""A user's corpus as passages: loaded from any common format, cut by tokens, deduplicated, sampled by seed.

SOURCE is one of:

- a folder of ``.txt`` / ``.md`` files (one document per file, read recursively, in sorted order);
- a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file, or a folder written by ``datasets``' ``save_to_disk``, or a
  Hub dataset id, each with a text column (``text_column``, default ``text``);
- ``builtin:NAME``: documents that ship in packages st-synth already depends on, chosen among texts no
  shipped evaluation task uses (:mod:`st_synth.data.builtin`).

Documents are cut into passages of at most ``passage_tokens`` tokens of ``tokenizer`` (whole sentences where
a sentence fits; a longer sentence is cut at the token limit), passages under ``min_tokens`` are dropped, and
passages equal after normalisation are kept once (the first). Sampling is a pure function of
``(seed, index)``, so the same seed gives the same passages on any machine and for any sharding.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from datasets import DatasetDict, IterableDataset, IterableDatasetDict

from st_synth.common.arguments import decode_json
from st_synth.common.text import name_list, normalize, seeded_rng
from st_synth.data.builtin import PREFIX
from st_synth.data.builtin import names as builtin_names
from st_synth.data.guide import resolve_guide
from st_synth.data.reader import FILE_FORMATS, read_dataset

TEXT_FILES = (".txt", ".md")


@dataclass
class CorpusArguments:
    """Where grounded generation and hard-negative mining take their passages from."""

    corpus: str | list[str] | None = field(default=None, metadata={
        "help": "SOURCE[,SOURCE...] (a list in YAML): a folder of .txt/.md files, a .jsonl/.json/.csv/.parquet file, a "
        f"`datasets` folder or Hub id, or builtin:NAME ({', '.join(builtin_names('documents'))}). Generation is then grounded "
        "in its passages.", "flag_type": str | None, "metavar": "SOURCE"})  # fmt: skip
    text_column: str = field(
        default="text", metadata={"help": "The text column of a table or dataset corpus."}
    )
    passage_tokens: int = field(
        default=256, metadata={"help": "Longest passage, in tokens of passage_tokenizer."}
    )
    min_tokens: int = field(default=16, metadata={"help": "Shorter passages are dropped."})
    passage_tokenizer: str = field(
        default="all-MiniLM-L6-v2",
        metadata={
            "help": "Tokenizer that measures passages: a Hub id or folder, or all-MiniLM-L6-v2 (packaged)."
        },
    )

    def __post_init__(self) -> None:
        self.corpus = name_list(decode_json(self.corpus, "corpus")) or None
        if self.passage_tokens < 8:
            raise ValueError(f"passage_tokens must be at least 8, got {self.passage_tokens}")
        if not 1 <= self.min_tokens <= self.passage_tokens:
            raise ValueError(f"min_tokens must be in 1..passage_tokens, got {self.min_tokens}")


def _column(rows: list[dict[str, Any]] | Any, column: str, source: str, found: list[str]) -> list[str]:
    if column not in found:
        raise ValueError(f"Corpus {source} has no text column {column!r}; it has: {', '.join(found) or 'none'}. "
                         "Name one with --text_column.")  # fmt: skip
    return [str(row[column]) for row in rows if row.get(column) is not None]


def _columns_of(dataset: Any) -> list[str]:
    """The columns of a dataset, streamed or not (a streamed one without known features: its first row's)."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None) if isinstance(dataset, IterableDataset) else None
    return list(first or {})


def load_documents(source: str, text_column: str = "text") -> list[str]:
    """The documents of ``source`` (see the module docstring); fails naming what it found."""
    if source.startswith(PREFIX):
        documents = list(read_dataset(source, "Corpus", builtin="documents")["text"])
    else:
        path = Path(source)
        if (
            path.is_dir()
            and not (path / "dataset_info.json").is_file()
            and not (path / "dataset_dict.json").is_file()
        ):
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_FILES and p.is_file())
            if not files:
                raise ValueError(f"Corpus folder {source} holds no {' or '.join(TEXT_FILES)} files.")
            documents = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        elif path.is_file() and path.suffix.lower() not in FILE_FORMATS:
            raise ValueError(f"Corpus file {source}: unknown format; use one of {', '.join(FILE_FORMATS)}, "
                             f"or a folder of {'/'.join(TEXT_FILES)} files.")  # fmt: skip
        else:  # data files and Hub ids streamed: read once, row by row, never copied into the datasets cache
            dataset = read_dataset(source, "Corpus", streaming=True)
            if isinstance(dataset, DatasetDict | IterableDatasetDict):
                dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
            documents = _column(dataset, text_column, source, _columns_of(dataset))
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise ValueError(f"Corpus {source} is empty: no document has any text.")
    return documents


def _tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_guide(name))


def split_passages(
    documents: list[str], tokenizer: Any, passage_tokens: int, min_tokens: int = 1
) -> list[str]:
    """Documents cut into passages of at most ``passage_tokens`` tokens: whole sentences together while they
    fit, a sentence longer than the limit cut at it; short passages dropped, duplicates kept once."""
    return [passage for passage, _ in split_documents(documents, tokenizer, passage_tokens, min_tokens)]


def split_documents(
    documents: list[str], tokenizer: Any, passage_tokens: int, min_tokens: int = 1
) -> list[tuple[str, int]]:
    """:func:`split_passages`, each passage with the index of its document."""

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    passages: list[tuple[str, int]] = []
    for number, document in enumerate(documents):
        current: list[str] = []
        size = 0
        for sentence in re.split(r"(?<=[.!?])\s+|\n{2,}", document.strip()):
            sentence = " ".join(sentence.split())
            if not sentence:
                continue
            offsets = tokenizer(sentence, add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"
            ]
            tokens = len(offsets)
            if tokens > passage_tokens:  # cut at the limit, by the tokenizer's own offsets
                pieces = [sentence[offsets[i][0] : offsets[min(i + passage_tokens, len(offsets)) - 1][1]]
                          for i in range(0, len(offsets), passage_tokens)]  # fmt: skip
            else:
                pieces = [sentence]
            for piece in pieces:
                piece_tokens = min(tokens, passage_tokens) if len(pieces) == 1 else length(piece)
                if current and size + piece_tokens > passage_tokens:
                    passages.append((" ".join(current), number))
                    current, size = [], 0
                current.append(piece)
                size += piece_tokens
        if current:
            passages.append((" ".join(current), number))
    seen: set[str] = set()
    kept = []
    for passage, number in passages:
        key = normalize(passage)
        if key not in seen and length(passage) >= min_tokens:
            seen.add(key)
            kept.append((passage, number))
    return kept


@dataclass
class Corpus:
    """The passages of one or more sources (duplicates across sources kept once), and a seeded draw of them."""

    sources: list[str]
    documents: dict[str, int]
    passages: list[str]
    passage_sources: list[str]  # the source of each passage
    passage_documents: list[int] = field(default_factory=list)  # its document, numbered across sources

    @property
    def name(self) -> str:
        return ",".join(self.sources)

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the passages: the same corpus gives the same draws wherever its files lie."""
        digest = hashlib.sha256()
        for passage in self.passages:
            digest.update(passage.encode() + b"\0")
        return digest.hexdigest()[:16]

    @classmethod
    def load(cls, settings: CorpusArguments) -> Corpus:
        sources = name_list(settings.corpus)
        if not sources:
            raise ValueError("No corpus given: pass --corpus SOURCE.")
        tokenizer = _tokenizer(settings.passage_tokenizer)
        documents: dict[str, int] = {}
        passages: list[str] = []
        origin: list[str] = []
        numbers: list[int] = []
        seen: set[str] = set()
        for source in sources:
            texts = load_documents(source, settings.text_column)
            offset = sum(documents.values())
            documents[source] = len(texts)
            cut = split_documents(texts, tokenizer, settings.passage_tokens, settings.min_tokens)
            if not cut:
                raise ValueError(f"Corpus {source} has no passage of at least {settings.min_tokens} tokens.")
            for passage, number in cut:
                if (key := normalize(passage)) not in seen:
                    seen.add(key)
                    passages.append(passage)
                    origin.append(source)
                    numbers.append(offset + number)
        return cls(sources, documents, passages, origin, numbers)

    def document_of(self) -> dict[str, int]:
        """Passage text -> its document: mining never takes a negative from the positive's own document."""
        return dict(zip(self.passages, self.passage_documents, strict=True))

    def draw(self, seed: int, index: int) -> int:
        """The passage of example ``index``: a pure function of ``(seed, index)`` and the corpus's passages."""
        return seeded_rng(seed, "passage", self.fingerprint, index).randrange(len(self.passages))

    def describe(self) -> dict[str, object]:
        return {"sources": self.sources, "documents": self.documents, "passages": len(self.passages),
                "fingerprint": self.fingerprint}  # fmt: skip
