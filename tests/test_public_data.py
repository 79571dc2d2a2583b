"""The paper's public-data recipe (recipes/configs/e5-mistral-7b-full.yaml), offline: each Hub dataset replaced
by a local stand-in of the same schema, loaded, sampled, instructed and mined through the real code path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict

from st_synth.model.embedder import DEFAULT_INSTRUCTION_TEMPLATE, format_instruction
from st_synth.testing.tiny import WORDS
from st_synth.training.arguments import DataArguments, make_train_parser
from st_synth.training.sources import load_sources

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "recipes" / "configs" / "e5-mistral-7b-full.yaml"
ROWS = 60


def sentence(rng: random.Random, words: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def stand_in(entry: dict, folder: Path, rng: random.Random) -> tuple[str, int]:
    """A local dataset with the schema the entry's Hub dataset has; returns its path and row count."""
    path, splits = entry["path"], entry.get("split") or "train"
    splits = [splits] if isinstance(splits, str) else splits
    if path.startswith("cfli/"):  # BGE's copy of the e5 data: query, pos (list), neg (list), prompt
        data = DatasetDict({split: Dataset.from_dict({
            "query": [sentence(rng, 6) for _ in range(ROWS)], "pos": [[sentence(rng)] for _ in range(ROWS)],
            "neg": [[sentence(rng), sentence(rng)] for _ in range(ROWS)], "prompt": ["p"] * ROWS,
        }) for split in splits})  # fmt: skip
        data.save_to_disk(str(folder / entry["name"]))
        return str(folder / entry["name"]), ROWS * len(splits)
    if entry.get("subset") == "triplet":  # sentence-transformers' triplet subsets
        first = "query" if "msmarco" in path else "anchor"
        columns = {first: [sentence(rng, 6) for _ in range(ROWS)], "positive": [sentence(rng) for _ in range(ROWS)],
                   "negative": [sentence(rng) for _ in range(ROWS)]}  # fmt: skip
        DatasetDict({"train": Dataset.from_dict(columns)}).save_to_disk(str(folder / entry["name"]))
        return str(folder / entry["name"]), ROWS
    # sentence-transformers' pair datasets: question / answer (eli5, squad) or query / answer (natural-questions)
    first = "query" if "natural-questions" in path else "question"
    file = folder / f"{entry['name']}.jsonl"
    file.write_text("".join(json.dumps({first: sentence(rng, 6), "answer": sentence(rng)}) + "\n"
                            for _ in range(ROWS)))  # fmt: skip
    return str(file), ROWS


def test_the_papers_mix_loads_samples_instructs_and_mines_offline(tmp_path, monkeypatch):
    config = yaml.safe_load(FULL.read_text())
    entries = config["public_datasets"]
    assert [e["name"] for e in entries] == ["eli5", "hotpotqa", "fever", "miracl", "msmarco_passage", "nq", "nli",
                                            "squad", "triviaqa", "quora", "dureader", "t2ranking"]  # fmt: skip
    ratios = {e["name"]: e.get("sample_ratio", 1.0) for e in entries}
    assert {k: v for k, v in ratios.items() if v != 1.0} == {"eli5": 0.1, "msmarco_passage": 0.5, "quora": 0.1,
                                                              "t2ranking": 0.5}  # the paper's  # fmt: skip
    rng, sizes = random.Random(0), {}
    for entry in entries:
        entry["path"], sizes[entry["name"]] = stand_in(entry, tmp_path, rng)
    args = DataArguments(
        public_datasets=json.dumps(entries), public_cache=str(tmp_path / "cache")
    )  # as a flag
    sources, report = load_sources(args, DEFAULT_INSTRUCTION_TEMPLATE)
    assert list(sources) == list(ratios)
    for entry in entries:
        name, data, facts = entry["name"], sources[entry["name"]], report["public_data"][entry["name"]]
        assert facts["sampled"] == round(ratios[name] * sizes[name]) and facts["rows"] == sizes[name]
        assert data.column_names == ["query", "positive", "negative"]
        prefixes = [format_instruction(i, DEFAULT_INSTRUCTION_TEMPLATE) for i in entry["instructions"]]
        assert all(any(q.startswith(p) for p in prefixes) for q in data["query"]), name
        assert all(any(p.startswith(x) for x in prefixes) for p in data["positive"]) == entry.get(
            "symmetric", False
        )
        if facts["negatives"] == "the dataset's own":
            assert data.num_rows == facts["sampled"]
        else:  # pairs got a negative mined among the dataset's own positives, never their own positive
            assert facts["negatives"]["mined_with"] == "all-MiniLM-L6-v2" and data.num_rows > 0
            for row in data:
                assert row["negative"] != row["positive"]
    assert {n for n, f in report["public_data"].items() if f["negatives"] != "the dataset's own"} == {
        "eli5",
        "nq",
        "squad",
    }
    assert len(set(sources["nli"]["query"])) > 1  # NLI's two instructions are both drawn
    assert {q.split("\nQuery: ")[0] for q in sources["nli"]["query"]} == {
        "Instruct: " + i for i in entries[6]["instructions"]}  # fmt: skip
    # Prepared once: a second load (another process, a re-run) reads the cache and mines nothing.
    monkeypatch.setattr("st_synth.data.mining.mine_negatives", lambda *a, **k: pytest.fail("mined again"))
    again, _ = load_sources(args, DEFAULT_INSTRUCTION_TEMPLATE)
    assert again["eli5"]["negative"] == sources["eli5"]["negative"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sample_ratio": 0}, r"sample_ratio must be in \(0, 1\]"),
        ({"instructions": []}, "missing instructions"),
        ({"ratio": 0.5}, r"unknown keys \['ratio'\]; valid keys: name, path, instructions"),
        ({"columns": {"answer": "x"}}, "columns maps roles query, positive, negative"),
    ],
)
def test_bad_entries_fail_before_anything_loads(change, message):
    entry = {"name": "eli5", "path": "nowhere/at-all", "instructions": ["Find it"], **change}
    with pytest.raises(ValueError, match=message):
        DataArguments(public_datasets=[entry])


def test_missing_columns_and_splits_are_named(tmp_path):
    file = tmp_path / "pairs.jsonl"
    file.write_text(json.dumps({"title": "a", "body": "b"}) + "\n")
    args = DataArguments(public_datasets=[{"name": "x", "path": str(file), "instructions": ["Find it"]}],
                         public_cache=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(ValueError, match=r"'x': no column for query and positive among title, body"):
        load_sources(args, DEFAULT_INSTRUCTION_TEMPLATE)
    DatasetDict({"train": Dataset.from_dict({"query": ["q"], "positive": ["p"]})}).save_to_disk(
        str(tmp_path / "d")
    )
    args = DataArguments(public_datasets=[{"name": "y", "path": str(tmp_path / "d"), "split": "dev",
                                           "instructions": ["Find it"]}], public_cache=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(ValueError, match=r"'y' .*has no split 'dev'; it has: train"):
        load_sources(args, DEFAULT_INSTRUCTION_TEMPLATE)


def test_the_full_config_reads_through_the_training_parser():
    from st_synth.common.arguments import with_yaml

    parser = make_train_parser()
    flags = with_yaml(parser, [str(FULL), "--use_cpu", "true", "--bf16", "false"])
    _, data, *_ = parser.parse_args_into_dataclasses(args=flags)
    assert len(data.public_datasets) == 12 and data.public_mining_model == "intfloat/multilingual-e5-base"
    assert data.public_mining_corpus_prompt == "passage: "
