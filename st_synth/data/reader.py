"""The one reader of datasets the user names: every stage that takes a dataset (the corpus, the training data,
extra and public datasets, mining, the filter, dedup, the run) reads it here.

A source is a folder written by ``datasets``' ``save_to_disk``, a data file (:data:`FILE_FORMATS`), a Hub
dataset id (with its subset and split), or ``builtin:NAME`` (:mod:`st_synth.data.builtin`: real documents or
pairs that ship in packages). A name that is none of these fails with one message that says what
was looked for and why it was not found (no such file or folder, a format it cannot read, the Hub
unreachable or offline), before any request is paid for.

Example::

    from st_synth.data.reader import read_dataset

    pairs = read_dataset("pairs.jsonl", "Training data")            # a Dataset
    synthetic = read_dataset("outputs/run/data", "Training data")   # the DatasetDict a run saved
    nq = read_dataset("sentence-transformers/natural-questions", "Public dataset", split="train")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk

from st_synth.data.builtin import PREFIX, Gives, load_builtin

# File suffix -> the `datasets` builder that reads it.
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_saved(folder: str | Path) -> Dataset | DatasetDict:
    """A folder written by ``save_to_disk`` (a stage's own output), memory-mapped.

    Raises:
        ValueError: naming ``folder`` when ``save_to_disk`` did not write it.
    """
    try:
        return load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise ValueError(f"{folder} is not a folder that `save_to_disk` wrote: {error}") from None


def _saved_to_disk(folder: Path) -> bool:
    """Whether ``save_to_disk`` wrote ``folder`` (a DatasetDict or a Dataset)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else "no detail"


def read_dataset(source: str | Path, what: str, *, subset: str | None = None, split: str | None = None,
                 builtin: Gives = "pairs", streaming: bool = False,
                 **kwargs: Any) -> Dataset | DatasetDict | IterableDataset | IterableDatasetDict:  # fmt: skip
    """``source`` as a dataset: a saved folder, a data file, or a Hub dataset id.

    Args:
        source: a folder written by ``save_to_disk``, a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet``
            file, a folder of such files (a downloaded Hub dataset repo too), or a Hub dataset id.
        what: names the source in errors ("Corpus", "Training data", ...).
        subset: the Hub dataset's configuration, if it has several.
        split: the split to return (of a saved DatasetDict or a Hub dataset); all splits when None. A data
            file is one split.
        builtin: what a ``builtin:NAME`` source must give here: ``pairs`` (training data) or ``documents``
            (a corpus).
        streaming: read data files, folders of them and Hub ids as they are iterated (an ``IterableDataset``):
            nothing is downloaded ahead or copied into the ``datasets`` cache, so a corpus larger than the
            disk or memory can be read in one pass. Saved folders are memory-mapped anyway, and ``builtin:``
            sources are small; those come back as they are.
        kwargs: passed to ``datasets.load_dataset`` for a Hub id.

    Raises:
        ValueError: naming ``source`` and what went wrong.
    """
    source = str(source)
    if source.startswith(PREFIX):
        return load_builtin(source, builtin)
    path = Path(source)
    if path.is_dir() and not _saved_to_disk(path):  # data files, or a downloaded Hub dataset repo
        try:
            return load_dataset(source, subset, split=split, streaming=streaming, **kwargs)
        except Exception as error:  # any failure to find or parse its files, named
            raise ValueError(f"{what} {source} is a folder that neither `save_to_disk` wrote nor `datasets` can "
                             f"read as data files ({type(error).__name__}: {_first_line(error)}).") from None  # fmt: skip
    if path.is_dir():
        data = load_from_disk(source)
        if split is not None and isinstance(data, DatasetDict):
            if split not in data:
                raise ValueError(f"{what} {source} has no split {split!r}; it has: {', '.join(data)}")
            return data[split]
        return data
    if path.is_file():
        if path.suffix.lower() not in FILE_FORMATS:
            raise ValueError(f"{what} file {source}: unknown format; use one of "
                             f"{', '.join(FILE_FORMATS)}, a `save_to_disk` folder or a Hub dataset id.")  # fmt: skip
        try:
            data = load_dataset(FILE_FORMATS[path.suffix.lower()], data_files=source, split="train",
                                streaming=streaming)  # fmt: skip
            # Streamed, a parse error or a file without rows shows on the first row: found here, named alike.
            if streaming and next(iter(data), None) is None:
                raise ValueError("corresponds to no data")
            return data
        except Exception as error:  # any parse failure of the file, named
            if "corresponds to no data" in str(error):  # `datasets`' words for a file without rows
                raise ValueError(f"{what} {source} is empty: it has no rows.") from None
            raise ValueError(f"{what} {source} could not be read as {FILE_FORMATS[path.suffix.lower()]}: "
                             f"{_first_line(error)}") from None  # fmt: skip
    try:
        return load_dataset(source, subset, split=split, streaming=streaming, **kwargs)
    # No such repo, no network, offline mode.
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{what} {source!r} is no file or folder here, and loading it as a Hub dataset failed "
            f"({type(error).__name__}: {_first_line(error)}). Check the "
            "path, or the Hub id and your network (HF_HUB_OFFLINE)."
        ) from None
