"""The one reader of user-named datasets (st_synth.data.reader): every format, a saved folder's splits, and
one clear message for anything it cannot read."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from st_synth.data.reader import FILE_FORMATS, load_saved, read_dataset

ROWS = {"query": ["q1", "q2"], "positive": ["p1", "p2"]}


def _write(folder, suffix):
    path = folder / f"pairs{suffix}"
    data = Dataset.from_dict(ROWS)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in data))
    elif suffix == ".json":
        path.write_text(json.dumps(list(data)))
    elif suffix == ".csv":
        data.to_csv(str(path), index=False)
    else:
        data.to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", sorted(FILE_FORMATS))
def test_every_file_format_reads_as_one_split(tmp_path, suffix):
    data = read_dataset(_write(tmp_path, suffix), "Training data")
    assert isinstance(data, Dataset) and data.to_dict() == ROWS


def test_a_saved_folder_and_its_splits(tmp_path):
    DatasetDict({"sts": Dataset.from_dict(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    whole = read_dataset(tmp_path / "saved", "Training data")
    assert isinstance(whole, DatasetDict) and whole["sts"].to_dict() == ROWS
    assert read_dataset(tmp_path / "saved", "Training data", split="sts").to_dict() == ROWS
    assert load_saved(tmp_path / "saved")["sts"].num_rows == 2
    with pytest.raises(ValueError, match=r"Training data .*saved has no split 'dev'; it has: sts"):
        read_dataset(tmp_path / "saved", "Training data", split="dev")


def test_a_folder_of_data_files_reads_like_a_hub_repo(tmp_path):
    folder = tmp_path / "pairs-repo"
    folder.mkdir()
    _write(folder, ".parquet")
    data = read_dataset(folder, "Training data", split="train")
    assert data.to_dict() == ROWS


def test_what_cannot_be_read_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "notes.xyz").write_text("x")
    with pytest.raises(
        ValueError, match=r"Corpus file .*notes.xyz: unknown format; use one of .jsonl, .json"
    ):
        read_dataset(tmp_path / "notes.xyz", "Corpus")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl could not be read as json"):
        read_dataset(tmp_path / "broken.jsonl", "Corpus")
    (tmp_path / "header-only.csv").write_text("query,positive\n")
    with pytest.raises(ValueError, match=r"header-only.csv is empty: it has no rows"):
        read_dataset(tmp_path / "header-only.csv", "Corpus")
    (tmp_path / "folder").mkdir()
    with pytest.raises(
        ValueError, match=r"folder is a folder that neither `save_to_disk` wrote nor `datasets` can"
    ):
        read_dataset(tmp_path / "folder", "Pairs")
    with pytest.raises(ValueError, match=r"is not a folder that `save_to_disk` wrote"):
        load_saved(tmp_path / "folder")
    with pytest.raises(ValueError, match=r"'someone/nothing' is no file or folder here.*HF_HUB_OFFLINE"):
        read_dataset("someone/nothing", "Training data")


@pytest.mark.parametrize("suffix", sorted(FILE_FORMATS))
def test_streamed_files_give_the_same_rows_and_leave_no_cache(tmp_path, monkeypatch, suffix):
    """``streaming=True``: every format comes back as an IterableDataset of the same rows, and nothing is copied
    into the datasets cache (a corpus larger than the disk can be read); what cannot be read is named alike."""
    from datasets import IterableDataset

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", cache)
    path = _write(tmp_path, suffix)
    streamed = read_dataset(path, "Corpus", streaming=True)
    assert isinstance(streamed, IterableDataset) and list(streamed) == list(Dataset.from_dict(ROWS))
    assert not list(cache.rglob("*.arrow"))
    read_dataset(path, "Corpus")  # read whole, the same file is copied into the cache: what streaming avoids
    assert list(cache.rglob("*.arrow"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl could not be read as json"):
        read_dataset(tmp_path / "broken.jsonl", "Corpus", streaming=True)
    (tmp_path / "header-only.csv").write_text("query,positive\n")
    with pytest.raises(ValueError, match=r"header-only.csv is empty: it has no rows"):
        read_dataset(tmp_path / "header-only.csv", "Corpus", streaming=True)


def test_a_corpus_file_is_streamed_into_documents(tmp_path, monkeypatch):
    from st_synth.data.corpus import load_documents

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", cache)
    rows = [{"id": i, "text": f"Document {i} about rivers."} for i in range(5)] + [{"id": 5, "text": None}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert load_documents(str(tmp_path / "docs.jsonl")) == [f"Document {i} about rivers." for i in range(5)]
    assert not list(cache.rglob("*.arrow"))
    with pytest.raises(ValueError, match=r"has no text column 'body'; it has: id, text"):
        load_documents(str(tmp_path / "docs.jsonl"), "body")
