"""The training recipe on a tiny in-place model: real script, YAML config, losses, batches, outputs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from sentence_transformers import SentenceTransformer

from st_synth.data.toy import TOPICS, write_toy_synthetic
from st_synth.testing.tiny import build_tiny_mistral
from st_synth.training.arguments import (
    DataArguments,
    ModelArguments,
    OutputArguments,
    RecipeTrainingArguments,
)
from st_synth.training.losses import LossArguments
from st_synth.training.sources import load_sources
from st_synth.training.trainer import build_losses, build_model, train
from tests.helpers import assert_images_linked, free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return str(build_tiny_mistral(tmp_path_factory.mktemp("backbone") / "tiny", "bos_only", hidden_size=32))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return str(write_toy_synthetic(tmp_path_factory.mktemp("data") / "synthetic", rows_per_kind=48))


def small_config(backbone: str, synthetic: str, output: Path, **extra) -> dict:
    return {
        "base_model": backbone, "dataset": synthetic, "max_seq_length": 32, "lora_r": 8, "lora_alpha": 16,
        "lora_dropout": 0.0, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "num_train_epochs": 3,
        "warmup_steps": 0, "weight_decay": 0.0, "logging_steps": 1, "save_strategy": "no", "use_cpu": True,
        "output_dir": str(output), "seed": 7, "temperature": 0.05, "batch_sampler": "no_duplicates", **extra,
    }  # fmt: skip


def test_recipe_script_trains_saves_and_writes_the_card(backbone, synthetic, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(small_config(backbone, synthetic, tmp_path / "run")))
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "train_mistral.py"), str(config), "--max_steps", "30"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    losses = [entry["loss"] for entry in summary["log_history"] if "loss" in entry]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # it learns the toy topics
    adapter, final = tmp_path / "run" / "adapter", tmp_path / "run" / "final"
    assert (adapter / "adapter_model.safetensors").is_file() and (final / "model.safetensors").is_file()
    texts = ["cat dog bird", "stock market price"]
    adapted = SentenceTransformer(str(adapter)).encode_query(texts, convert_to_tensor=True)
    merged = SentenceTransformer(str(final)).encode_query(texts, convert_to_tensor=True)
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-4)
    card = (final / "README.md").read_text()
    for fact in ("rank 8, alpha 16", "temperature 0.05 (scale 20.0)", "`toy-generator`", "retrieval 48",
                 "own negatives only for classification", "merged into the weights", "arXiv:2401.00368",
                 "## Departures from the paper", "`no_in_batch_negatives: []`", "`mix_sources: true`",
                 'prompt="Instruct: Given a claim, find documents that refute the claim\\nQuery: "'):  # fmt: skip
        assert fact in card, fact
    # The loss section names the loss classes trained and cites each with its own `citation`.
    trained = sorted(set(summary["loss"].values()))
    assert summary["loss_citations"].keys() == set(trained) and "OwnNegativesLoss" in trained
    assert "| loss | " + ", ".join(f"`{name}`" for name in summary["loss_citations"]) + ": InfoNCE" in card
    for name, citation in summary["loss_citations"].items():
        assert citation.startswith("@") and f"#### {name}\n\n```bibtex\n{citation}\n```" in card


def capture_batches(losses: dict, model) -> dict[str, list[list[str]]]:
    """Wrap each source's loss to record the decoded texts of every batch it receives."""
    seen: dict[str, list[list[str]]] = {name: [] for name in losses}
    tokenizer = model[0].tokenizer
    for name, loss in losses.items():
        original = loss.forward

        def forward(features, labels=None, _name=name, _original=original):
            seen[_name].append(
                [tokenizer.decode(ids[mask.bool()]) for ids, mask in
                 zip(features[0]["input_ids"], features[0]["attention_mask"], strict=True)]
            )  # fmt: skip
            seen[_name].append(
                [tokenizer.decode(ids[mask.bool()]) for ids, mask in
                 zip(features[1]["input_ids"], features[1]["attention_mask"], strict=True)]
            )  # fmt: skip
            return _original(features, labels)

        loss.forward = forward
    return seen


def test_one_source_per_batch_and_instructions_per_row(backbone, synthetic, tmp_path):
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer

    model_args = ModelArguments(base_model=backbone, max_seq_length=32, lora_r=4, lora_alpha=8)
    data_args = DataArguments(dataset=synthetic)
    sources, _ = load_sources(data_args, model_args.instruction_template)
    model = build_model(model_args)
    losses = build_losses(model, sources, LossArguments())
    assert type(losses["classification"]).__name__ == "OwnNegativesLoss"
    assert (
        type(losses["retrieval"]).__name__ == "MultipleNegativesRankingLoss"
        and losses["retrieval"].scale == 50
    )
    seen = capture_batches(losses, model)
    args = RecipeTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12,
                                      use_cpu=True, save_strategy="no", logging_steps=100)  # fmt: skip
    SentenceTransformerTrainer(model=model, args=args, train_dataset=sources, loss=losses).train()
    assert sum(len(batches) for batches in seen.values()) == 2 * 12
    for name, batches in seen.items():
        for queries, positives in zip(batches[::2], batches[1::2], strict=True):
            assert len(set(queries)) == len(queries)  # no duplicate texts in a batch
            for query, positive in zip(queries, positives, strict=True):
                # every query carries its own row's instruction, so the batch holds one source only
                assert query.startswith("<s> Instruct : " + {"retrieval": "find the relevant document",
                                        "classification": "classify the topic",
                                        "sts": "Retrieve semantically similar text ."}[name])  # fmt: skip
                assert query.endswith("</s>") and positive.endswith("</s>")
                # positives get the instruction only for symmetric kinds
                assert positive.startswith("<s> Instruct :") == (name == "sts")
                if name == "classification":
                    assert positive.removeprefix("<s> ").removesuffix(" </s>") in TOPICS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kinds": ["retreival"]}, "Unknown task kind .retreival.. Did you mean .retrieval."),
        ({"kinds": ["bitext"]}, "not in"),
        ({"extra_datasets": ["broken"]}, "NAME=PATH_OR_HUB_ID|INSTRUCTION"),
    ],
)
def test_bad_data_is_refused_before_loading_a_model(synthetic, change, message):
    with pytest.raises(ValueError, match=message):
        load_sources(DataArguments(dataset=synthetic, **change), "Instruct: {instruction}\nQuery: ")


def test_bad_settings_are_refused(backbone, synthetic, tmp_path):
    from datasets import Dataset

    from st_synth.data.examples import load_examples
    from st_synth.data.sources import _refuse_empty

    with pytest.raises(ValueError, match="'sts' is empty"):
        _refuse_empty("sts", Dataset.from_dict({"query": ["a"]}).select([]))
    data = load_examples(synthetic)
    data["sts"] = data["sts"].remove_columns("instruction")
    data.save_to_disk(str(tmp_path / "nocol"))  # the working form saved as such (st-synth 0.1's layout)
    with pytest.raises(ValueError, match=r"lacks columns \['instruction'\]"):
        load_sources(DataArguments(dataset=str(tmp_path / "nocol")), "Instruct: {instruction}\nQuery: ")
    with pytest.raises(ValueError, match="exactly once"):
        load_sources(DataArguments(dataset=synthetic), "Query: ")
    with pytest.raises(ValueError, match="its linear layers are"):
        build_model(ModelArguments(base_model=backbone, max_seq_length=32, lora_target_modules=["c_attn"]))


def test_push_uploads_weights_configs_and_card(backbone, synthetic, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    model_args = ModelArguments(base_model=backbone, max_seq_length=32, lora_r=4, lora_alpha=8)
    args = RecipeTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                                      max_steps=2, logging_steps=1, use_cpu=True, save_strategy="no", push_to_hub=True,
                                      hub_model_id="me/tiny-e5", hub_token="hf_SECRET")  # fmt: skip
    uploaded: dict[str, bytes] = {}

    def upload_folder(self, *, repo_id, folder_path, repo_type, **kw):
        assert (repo_id, repo_type) == ("me/tiny-e5", "model")
        uploaded.update({str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*")
                         if p.is_file()})  # fmt: skip
        return "https://hub.local/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    summary = train(model_args, DataArguments(dataset=synthetic), args, OutputArguments())
    assert summary["pushed"] == "https://hub.local/commit/1"
    assert {"model.safetensors", "modules.json", "config_sentence_transformers.json", "README.md",
            "chat_template.jinja"} <= set(uploaded)  # fmt: skip
    prompts = json.loads(uploaded["config_sentence_transformers.json"])["prompts"]
    assert prompts["document"] == "" and prompts["query"]
    assert b"me/tiny-e5" in uploaded["README.md"]
    assert_images_linked(uploaded["README.md"].decode(), uploaded, ["loss"])
    assert all(b"hf_SECRET" not in blob for blob in uploaded.values())

    from st_synth.cli import main as cli_main

    uploaded.clear()
    assert cli_main(["push", str(tmp_path / "run" / "final"), "--repo", "me/tiny-e5"]) == 0
    assert "model.safetensors" in uploaded
    assert cli_main(["push", str(tmp_path), "--repo", "me/tiny-e5"]) == 2  # not a model folder


def test_training_alone_leaves_the_card_and_the_push_to_one_package_stage(
    backbone, synthetic, tmp_path, monkeypatch
):
    """What `st-synth run` does: training saves the weights and the card's facts; the package stage, after
    evaluation, renders the card once (scores in it) and pushes once."""
    from huggingface_hub import HfApi

    from st_synth.cards.package import package_model
    from st_synth.common.names import CARD_DATA_FILE

    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *, repo_id, folder_path, **kw: commits.append(
        (repo_id, (Path(folder_path) / "README.md").read_text())) or f"https://hub.local/commit/{len(commits)}")  # fmt: skip
    args = RecipeTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=2,
                                   use_cpu=True, save_strategy="no", push_to_hub=True, hub_model_id="me/tiny-e5")  # fmt: skip
    model_args = ModelArguments(base_model=backbone, max_seq_length=32, lora_r=4, lora_alpha=8)
    summary = train(model_args, DataArguments(dataset=synthetic), args, OutputArguments(), package=False)
    final, adapter = tmp_path / "run" / "final", tmp_path / "run" / "adapter"
    assert commits == [] and "pushed" not in summary and summary["hub_model_id"] == "me/tiny-e5"
    assert (
        summary["model"] == str(final)
        and (final / CARD_DATA_FILE).is_file()
        and (adapter / CARD_DATA_FILE).is_file()
    )
    assert (
        "LeeDocSTS" not in (final / "README.md").read_text()
    )  # sentence-transformers' own card, not ours yet
    packaged = package_model(
        final, also=[adapter], repo_id=summary["hub_model_id"], evaluation={"LeeDocSTS": 0.5}
    )
    assert packaged == {"card": str(final / "README.md"), "pushed": "https://hub.local/commit/1"}
    assert len(commits) == 1 and commits[0][0] == "me/tiny-e5"
    assert "| LeeDocSTS | 0.5000 |" in commits[0][1]
    adapter_card = (
        adapter / "README.md"
    ).read_text()  # rendered from its facts too (scores only on the model)
    assert 'SentenceTransformer("me/tiny-e5")' in adapter_card and "| LeeDocSTS |" not in adapter_card


@pytest.mark.slow
def test_two_processes_gather_negatives_and_agree_on_weights(backbone, synthetic, tmp_path):
    """A real torchrun run on CPU (gloo): each rank's loss scores its queries against the candidates of
    both ranks, and both ranks end with the same LoRA weights."""
    import os
    import shutil

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    config = tmp_path / "config.yaml"
    settings = small_config(backbone, synthetic, tmp_path / "run", kinds=["retrieval", "sts"], max_steps=4,
                            per_device_train_batch_size=4, ddp_backend="gloo", gradient_checkpointing=False)  # fmt: skip
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "ST_SYNTH_TRACE_DIR": str(tmp_path / "trace"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(ROOT / "recipes" / "train_mistral.py"),
         str(config)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    traces = {
        rank: [
            json.loads(line) for line in (tmp_path / "trace" / f"rank{rank}.jsonl").read_text().splitlines()
        ]
        for rank in (0, 1)
    }
    for entries in traces.values():
        calls = [e for e in entries if "candidates" in e]
        assert calls, entries
        # 4 local queries against (positive + negative) x 4 rows x 2 ranks
        assert all(e["queries"] == 4 and e["candidates"] == 2 * 4 * 2 for e in calls)
    digests = {
        rank: next(e["lora_digest"] for e in entries if "lora_digest" in e)
        for rank, entries in traces.items()
    }
    assert digests[0] == digests[1]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_users_own_labeled_data_mixes_in_with_its_instruction(synthetic, tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"anchor": ["cat dog", "rain snow"], "answer": ["pets", "weather"]}).save_to_disk(
        str(tmp_path / "mine")
    )
    data = DataArguments(
        dataset=synthetic, kinds=["sts"], extra_datasets=[f"mine={tmp_path / 'mine'}|name the topic"]
    )
    sources, report = load_sources(data, "Instruct: {instruction}\nQuery: ")
    assert list(sources) == ["sts", "mine"] and report["generator_model"] == "toy-generator"
    assert sources["mine"].column_names == ["query", "positive"]
    assert sources["mine"][0] == {"query": "Instruct: name the topic\nQuery: cat dog", "positive": "pets"}
    assert sources["sts"][0]["positive"].startswith("Instruct: Retrieve semantically similar text.\nQuery: ")


def test_ablation_switches_drop_instructions_and_hard_negatives(backbone, synthetic):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from st_synth.training.losses import OwnNegativesLoss

    template = "Instruct: {instruction}\nQuery: "
    full, _ = load_sources(DataArguments(dataset=synthetic), template)
    plain, _ = load_sources(DataArguments(dataset=synthetic, use_instructions=False), template)
    assert full["retrieval"][0]["query"].startswith("Instruct: ")
    assert not any(row["query"].startswith("Instruct:") for row in plain["retrieval"])
    assert plain["retrieval"]["query"] == [q.split("\nQuery: ", 1)[1] for q in full["retrieval"]["query"]]
    assert plain["retrieval"]["negative"] == full["retrieval"]["negative"]
    no_negatives = DataArguments(dataset=synthetic, hard_negatives=False)
    sources, _ = load_sources(no_negatives, template)
    assert all("negative" not in ds.column_names for ds in sources.values())
    model = build_model(ModelArguments(base_model=backbone, max_seq_length=32, lora_r=4))
    losses = build_losses(model, sources, LossArguments(), no_negatives.hard_negatives)
    assert type(losses["classification"]) is MultipleNegativesRankingLoss  # no own negatives left to use
    assert type(build_losses(model, full, LossArguments())["classification"]) is OwnNegativesLoss


def test_departure_switches_mix_sources_and_instruct_symmetric_queries_only(backbone, synthetic, tmp_path):
    from st_synth.training.trainer import run_recipe

    template = "Instruct: {instruction}\nQuery: "
    paper, _ = load_sources(DataArguments(dataset=synthetic), template)
    queries_only, _ = load_sources(DataArguments(dataset=synthetic, symmetric_instructions=False), template)
    assert paper["sts"][0]["positive"].startswith("Instruct: ")
    assert not any(text.startswith("Instruct:") for text in queries_only["sts"]["positive"])
    assert all(text.startswith("Instruct: ") for text in queries_only["sts"]["query"])
    mixed, _ = load_sources(DataArguments(dataset=synthetic, mix_sources=True), template)
    assert list(mixed) == ["mixed"] and mixed["mixed"].num_rows == sum(ds.num_rows for ds in paper.values())
    shapes = str(
        write_toy_synthetic(tmp_path / "shapes", rows_per_kind=8, kinds=("retrieval", "short_short"))
    )
    with pytest.raises(
        ValueError, match=r"same columns.*short_short: query, positive.*--hard_negatives false"
    ):
        load_sources(DataArguments(dataset=shapes, mix_sources=True), template)
    # Trained mixed: one source, batches across tasks, and the card says so (no one-source departure left).
    config = tmp_path / "mixed.yaml"
    config.write_text(yaml.safe_dump(small_config(backbone, synthetic, tmp_path / "run", mix_sources=True)))
    summary = run_recipe([str(config), "--max_steps", "2"])
    assert summary["sources"] == {"mixed": 144} and summary["global_steps"] == 2
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "all sources mixed" in card and "`mix_sources: true`" not in card
    assert "`no_in_batch_negatives: []`" not in card  # classification rows are in the mixed source now


def test_training_benchmark_smoke_run_on_cpu(tmp_path):
    """The GPU benchmark's script, tiny preset on CPU: it runs end to end and the recipe's loss equals the
    baseline's on identical batches (no timing is asserted)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--preset", "tiny", "--steps", "3",
         "--batch-size", "4", "--max-len", "128", "--device", "cpu", "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "training-tiny.json").read_text())
    assert [row["inputs"] for row in payload["rows"]] == ["fixed", "mix"]
    for row in payload["rows"]:
        assert row["max_loss_diff_first_steps"] < 1e-5 and row["speedup"] > 0
    mix = payload["padding"]["mix"]  # the saving itself is measured at scale in test_sampling
    assert (
        0 < mix["baseline"] < 1 and 0 < mix["st_synth"] < 1 and payload["padding"]["fixed"]["baseline"] == 0
    )


def test_fused_kernels_fall_back_cleanly_on_cpu_with_the_same_loss(backbone, synthetic):
    from st_synth.training.speed import apply_fused_kernels

    sources, _ = load_sources(
        DataArguments(dataset=synthetic, kinds=["retrieval"]), "Instruct: {instruction}\nQuery: "
    )
    batch = sources["retrieval"].select(range(4))
    losses = {}
    for mode in ("auto", "off"):
        torch.manual_seed(0)
        model = build_model(
            ModelArguments(base_model=backbone, max_seq_length=32, lora_r=4, fused_kernels=mode)
        )
        assert model.fused_kernels == ("off" if mode == "off" else
                                       "not used: the model trains on cpu, Liger's kernels need CUDA")  # fmt: skip
        loss = build_losses(model, sources, LossArguments())["retrieval"]
        features = [model.preprocess(list(batch[column])) for column in ("query", "positive", "negative")]
        losses[mode] = float(loss(features, None))
    assert losses["auto"] == losses["off"]
    with pytest.raises(ValueError, match="fused_kernels=liger cannot be honoured: the model trains on cpu"):
        build_model(ModelArguments(base_model=backbone, max_seq_length=32, lora_r=4, fused_kernels="liger"))
    with pytest.raises(ValueError, match="fused_kernels 'fast' is unknown; choose one of: auto, liger, off"):
        build_model(ModelArguments(base_model=backbone, max_seq_length=32, fused_kernels="fast"))
    with pytest.raises(ValueError, match="choose one of"):
        apply_fused_kernels(None, "fast", "cpu")


def _mixed_triplets(synthetic: str, count: int = 6):
    sources, _ = load_sources(
        DataArguments(dataset=synthetic, kinds=["retrieval"]), "Instruct: {instruction}\nQuery: "
    )
    batch = sources["retrieval"].select(range(count))
    # Lengths that differ a lot, as real queries and documents do.
    cut = [(text.split() * 10)[: 2 + 6 * i] for i, text in enumerate(batch["positive"])]
    return sources, [list(batch["query"]), [" ".join(words) for words in cut], list(batch["negative"])]


def test_packed_sequences_give_the_padded_loss_and_gradients_with_fewer_rows(backbone, synthetic):
    """Packed rows: the backbone sees fewer, fuller rows; pooling and the loss see what padding gives."""
    sources, columns = _mixed_triplets(synthetic)
    torch.manual_seed(0)
    model = build_model(ModelArguments(base_model=backbone, max_seq_length=48, lora_r=4, lora_dropout=0.0))
    assert model.packed_sequences == "packed rows"
    loss_fn = build_losses(model, sources, LossArguments())["retrieval"]
    rows_seen: list[tuple[int, int]] = []
    backbone_forward = model[0].auto_model.forward

    def spy(*args, **kwargs):  # ST calls the backbone's forward directly, so hooks would miss it
        rows_seen.append(tuple(kwargs["input_ids"].shape))
        return backbone_forward(*args, **kwargs)

    model[0].auto_model.forward = spy
    results = {}
    for path in ("packed", "padded"):
        if path == "padded":
            del model[0].forward  # the plain ST module's own forward again
            packed_rows, rows_seen[:] = list(rows_seen), []
        model.zero_grad()
        features = [model.preprocess(column) for column in columns]
        loss = loss_fn(features, None)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[path] = (loss.item(), grads)
    (packed_loss, packed_grads), (padded_loss, padded_grads) = results["packed"], results["padded"]
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5, abs=1e-6)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 0
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-3, atol=1e-6), name
    # The backbone's calls (ST merges the candidate columns into one): same row length, never more rows,
    # fewer where lengths differ.
    padded_rows = rows_seen
    assert len(packed_rows) == len(padded_rows) >= 2
    assert all(p[1] == q[1] and p[0] <= q[0] for p, q in zip(packed_rows, padded_rows, strict=True))
    assert sum(p[0] for p in packed_rows) < sum(q[0] for q in padded_rows), (packed_rows, padded_rows)


def test_packed_sequences_fall_back_where_the_backbone_would_mix_them(backbone, monkeypatch, tmp_path):
    """An install whose transformers does not keep packed sequences apart (simulated: no packed-sequence
    detection) gets the padded forward in auto mode, an error naming the reason in on mode."""
    import transformers.masking_utils as masking

    from st_synth.training.speed import apply_packed_sequences, check_fused_kernels, check_packed_sequences

    # A YAML config's bare `off` arrives as False, or as "False" once it went through the recipe's flags.
    assert check_packed_sequences(False) == check_packed_sequences("False") == "off"
    assert check_packed_sequences(True) == "on" and check_fused_kernels(False) == "off"
    model = build_model(
        ModelArguments(base_model=backbone, max_seq_length=32, lora_r=4, packed_sequences=False)
    )
    assert model.packed_sequences == "off" and "forward" not in vars(model[0])
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    status = apply_packed_sequences(model[0], "auto")
    assert status.startswith("not used: packed sequences leak into each other") and "forward" not in vars(
        model[0]
    )
    with pytest.raises(ValueError, match="packed_sequences=on cannot be honoured: packed sequences leak"):
        build_model(ModelArguments(base_model=backbone, max_seq_length=32, lora_r=4, packed_sequences="on"))
    with pytest.raises(
        ValueError, match="packed_sequences 'always' is unknown; choose one of: auto, on, off"
    ):
        build_model(ModelArguments(base_model=backbone, max_seq_length=32, packed_sequences="always"))
    monkeypatch.undo()
    # Saved with the packed forward on, loaded as a plain SentenceTransformer: the same embeddings.
    assert apply_packed_sequences(model[0], "auto") == "packed rows"
    texts = ["a short one", "a much longer text " * 6, "mid length text here"]
    before = model.encode(texts, convert_to_tensor=True)
    model.save(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"))
    assert "forward" not in vars(loaded[0])
    assert torch.allclose(loaded.encode(texts, convert_to_tensor=True), before, atol=1e-5)


def test_builtin_real_source_is_disjoint_from_the_evaluation_documents():
    from st_synth.data.offline_tasks import gensim_test_data

    data = DataArguments(
        extra_datasets=["lee_background=builtin:lee-background-pairs|Retrieve semantically similar text."]
    )
    sources, _ = load_sources(data, "Instruct: {instruction}\nQuery: ")
    pairs = sources["lee_background"]
    assert pairs.num_rows == 295 and pairs.column_names == ["query", "positive"]
    assert pairs[0]["query"].startswith(
        "Instruct: Retrieve semantically similar text.\nQuery: Hundreds of people"
    )
    evaluation_docs = (gensim_test_data() / "lee.cor").read_text(errors="replace").split("\n")
    assert not any(doc[:80] in text for doc in evaluation_docs if doc for text in pairs["positive"])
    with pytest.raises(
        ValueError,
        match=r"Unknown builtin source of pairs 'lee'\. .*Choose one of: lee-background-pairs, wikipedia-section-pairs",
    ):
        load_sources(DataArguments(extra_datasets=["x=builtin:lee|t"]), "Instruct: {instruction}\nQuery: ")
    # The name these pairs had before the one registry (a corpus of the same name gives documents) still works.
    with pytest.warns(
        FutureWarning, match="'builtin:lee-background' as pairs is now called 'builtin:lee-background-pairs'"
    ):
        old, _ = load_sources(DataArguments(extra_datasets=["lee=builtin:lee-background|Retrieve semantically similar text."]),
                              "Instruct: {instruction}\nQuery: ")  # fmt: skip
    assert old["lee"]["positive"] == pairs["positive"]


def test_wikitext_becomes_plain_prose():
    from st_synth.data.offline_tasks import wikitext_to_plain

    markup = (
        "{{Infobox|name={{nested|x}}|y=1}}<!-- a comment -->'''Albedo''' is the [[diffuse reflection|"
        "measure]] of [[light]].<ref name=a>{{cite|b}}</ref> It is dimensionless.<ref name=c/> "
        "[[File:Albedo.png|thumb|A [[map]] of it]]See [https://example.org the site] and "
        "[https://example.org/x].\n{| class=wikitable\n| cell\n|}\n<small>end</small> ''small''"
    )
    assert wikitext_to_plain(markup) == (
        "Albedo is the measure of light. It is dimensionless. See the site and .\n\nend small"
    )


def test_wikipedia_sections_are_real_clean_and_spread_over_articles():
    data = DataArguments(extra_datasets=["wiki=builtin:wikipedia-section-pairs|Retrieve the section."])
    pairs = load_sources(data, "Instruct: {instruction}\nQuery: ")[0]["wiki"]
    queries = [q.removeprefix("Instruct: Retrieve the section.\nQuery: ") for q in pairs["query"]]
    assert pairs.num_rows > 1000
    titles = [q.split(": ")[0] for q in queries]
    runs = [title for i, title in enumerate(titles) if i == 0 or title != titles[i - 1]]
    assert len(runs) == len(set(runs)) > 90  # article by article: each article's sections are contiguous
    assert queries[0] == "Anarchism" and queries[1].startswith("Anarchism: ")
    assert "Alaska: Etymology" in queries and not any(q.endswith(": References") for q in queries)
    for passage in pairs["positive"]:
        assert len(passage.split()) >= 40
        assert not any(mark in passage for mark in ("[[", "{{", "<ref", "'''", "<!--"))
    assert pairs["positive"][0].startswith("Anarchism is a political philosophy")


@pytest.mark.parametrize("config", ["smollm2-cpu.yaml", "e5-mistral-7b.yaml", "e5-mistral-7b-full.yaml"])
@pytest.mark.parametrize("spelling", ["current", "older"])
def test_checkpointing_settings_take_the_current_names_without_a_deprecation_warning(config, spelling):
    """transformers renamed gradient_checkpointing* to activation_checkpointing*: the shipped configs and
    users' files in either spelling reach the trainer under the installed release's names, silently."""
    import warnings

    from st_synth.training.arguments import make_train_parser

    settings = yaml.safe_load((ROOT / "recipes" / "configs" / config).read_text())
    if spelling == "older":
        settings = {key.replace("activation_", "gradient_"): value for key, value in settings.items()}
    settings.update(use_cpu=True, bf16=False)
    parser = make_train_parser()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flags = [
            *parser.settings_to_args(settings),
            "--gradient_checkpointing_kwargs",
            '{"use_reentrant": true}',
        ]
        *_, args = parser.parse_args_into_dataclasses(args=flags)
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    assert args.gradient_checkpointing is True and args.gradient_checkpointing_kwargs == {
        "use_reentrant": True
    }
    if hasattr(args, "activation_checkpointing"):
        assert args.activation_checkpointing is True


@pytest.mark.parametrize("cached", [False, True])
def test_matryoshka_training_trains_every_cut_and_the_card_says_so(backbone, synthetic, tmp_path, cached):
    from st_synth.training.trainer import run_recipe

    config = tmp_path / "m.yaml"
    settings = small_config(backbone, synthetic, tmp_path / "run", matryoshka_dims=[32, 8], cached_loss=cached,
                            mini_batch_size=4)  # fmt: skip
    config.write_text(yaml.safe_dump(settings))
    summary = run_recipe([str(config), "--max_steps", "2"])
    assert set(summary["loss"].values()) == {"MatryoshkaLoss"} and summary["global_steps"] == 2
    assert all(
        entry["loss"] == entry["loss"] for entry in summary["log_history"] if "loss" in entry
    )  # no NaN
    final = tmp_path / "run" / "final"
    assert "Matryoshka: also trained cut to 32, 8 dimensions" in (final / "README.md").read_text()
    cut = SentenceTransformer(str(final), truncate_dim=8).encode_query(["cat dog"], convert_to_tensor=True)
    assert cut.shape == (1, 8)
    with pytest.raises(ValueError, match=r"matryoshka_dims \[64\] go beyond the model's 32 dimensions"):
        run_recipe([str(config), "--max_steps", "1", "--matryoshka_dims", "64"])


def test_the_loss_options_reach_training_and_the_card(backbone, synthetic, tmp_path):
    """GTE's directions and hardness weighting from the recipe's command line: trained, on the card."""
    from st_synth.training.trainer import run_recipe

    config = tmp_path / "d.yaml"
    config.write_text(yaml.safe_dump(small_config(backbone, synthetic, tmp_path / "run")))
    summary = run_recipe([str(config), "--max_steps", "2", "--directions", "query_to_doc", "query_to_query",
                          "doc_to_query", "doc_to_doc", "--hardness_mode", "in_batch_negatives",
                          "--hardness_strength", "9"])  # fmt: skip
    losses = [entry["loss"] for entry in summary["log_history"] if "loss" in entry]
    assert summary["global_steps"] == 2 and losses and all(loss == loss for loss in losses)  # no NaN
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "directions query_to_doc, query_to_query, doc_to_query, doc_to_doc (joint softmax)" in card
    assert "hardness weighting in_batch_negatives, strength 9.0" in card
    from st_synth.common.arguments import SettingsError
    from st_synth.training.arguments import make_train_parser

    with pytest.raises(
        SettingsError, match=r"partition_mode 'both' is unknown; choose one of: joint, per_direction"
    ):
        make_train_parser().parse_settings({"partition_mode": "both"}, "train")
    with pytest.raises(ValueError, match=r"directions must include query_to_doc"):
        make_train_parser().parse_settings({"directions": ["doc_to_query"]}, "train")


@pytest.mark.parametrize("route", ["extra_datasets", "public_datasets"])
def test_training_on_extra_datasets_alone_writes_a_card_without_a_synthetic_section(
    backbone, tmp_path, route
):
    """No generated dataset, only the user's pairs (an extra dataset, or a public dataset of the paper's mix),
    decontaminated against a task: the card renders (the decontamination and public data reports are no
    generation report) and says what was trained on."""
    from datasets import Dataset, DatasetDict

    from st_synth.training.trainer import run_recipe

    pairs = Dataset.from_dict(
        {
            "query": [f"topic {i} question" for i in range(16)],
            "positive": [f"topic {i} answer" for i in range(16)],
        }
    )
    if route == "extra_datasets":
        pairs.save_to_disk(str(tmp_path / "mine"))
        source = {"extra_datasets": [f"mine={tmp_path / 'mine'}|Find it."]}
    else:
        DatasetDict({"train": pairs}).save_to_disk(str(tmp_path / "mine"))
        entry = {"name": "mine", "path": str(tmp_path / "mine"), "instructions": ["Find it."]}
        source = {"public_datasets": json.dumps([entry]), "public_cache": str(tmp_path / "cache")}
    settings = small_config(backbone, "", tmp_path / "run", decontaminate=["LeeDocSTS"], **source)
    del settings["dataset"]
    config = tmp_path / "extra.yaml"
    config.write_text(yaml.safe_dump(settings))
    summary = run_recipe([str(config), "--max_steps", "1"])
    assert summary["sources"] == {"mine": 16}
    assert (summary["public_data"] is not None) == (route == "public_datasets")
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "## Synthetic data" in card and "| generator |" not in card
    assert "none of them with an st-synth generation report" in card
    assert (
        "Decontamination: no training text equals or shares 13 words with a text of LeeDocSTS: 0 rows" in card
    )


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint_with_the_same_losses(backbone, synthetic, tmp_path):
    """SIGKILL after a checkpoint, the same command again: it resumes (saying from which step), finishes the
    planned steps, and every loss after the resume is the uninterrupted run's."""
    steps = 24

    def command(folder: Path) -> list[str]:
        config = folder / "config.yaml"
        folder.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(small_config(backbone, synthetic, folder / "run", save_strategy="steps",
                                                      save_steps=6, max_steps=steps)))  # fmt: skip
        return [sys.executable, str(ROOT / "recipes" / "train_mistral.py"), "--config", str(config)]

    def losses(folder: Path) -> dict[int, float]:
        summary = json.loads((folder / "run" / "training_summary.json").read_text())
        return {entry["step"]: entry["loss"] for entry in summary["log_history"] if "loss" in entry}

    whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command(killed), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while (
            not (killed / "run" / "checkpoint-12" / "trainer_state.json").is_file() and time.time() < deadline
        ):
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    assert not (killed / "run" / "training_summary.json").exists()
    again = subprocess.run(command(killed), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from" in again.stderr and "checkpoint-" in again.stderr
    resumed, reference = losses(killed), losses(tmp_path / "whole")
    assert sorted(reference) == list(range(1, steps + 1)) and sorted(resumed) == sorted(reference)
    for step in range(13, steps + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), step
    kept = sorted(p.name for p in (killed / "run").iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-18", "checkpoint-24"]  # save_total_limit 2


def test_held_out_rows_are_scored_during_training_logged_to_tensorboard_and_on_the_card(
    backbone, synthetic, tmp_path
):
    """eval_examples: rows held out of each source; at every evaluation step their loss and, for the
    retrieval-like sources (not classification: its positives are shared labels), nDCG@10 of ranking each
    held-out query's positive; the final scores on the card; report_to tensorboard writes the curves."""
    from st_synth.training.trainer import run_recipe

    config = tmp_path / "e.yaml"
    settings = small_config(backbone, synthetic, tmp_path / "run", eval_examples=6, eval_strategy="steps",
                            eval_steps=2, report_to=["tensorboard"])  # fmt: skip
    config.write_text(yaml.safe_dump(settings))
    summary = run_recipe([str(config), "--max_steps", "4"])
    assert summary["sources"] == {"retrieval": 42, "classification": 42, "sts": 42}  # 6 of 48 held out
    assert set(summary["held_out"]) == {"retrieval", "sts"} and all(
        0 <= v <= 1 for v in summary["held_out"].values()
    )
    evaluations = [
        entry for entry in summary["log_history"] if "eval_held-out-retrieval_cosine_ndcg@10" in entry
    ]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    assert any(
        key.startswith("eval_retrieval") and key.endswith("_loss") for key in evaluations[0]
    )  # its loss
    assert list(tmp_path.rglob("events.out.tfevents.*"))  # TensorBoard's curves, under the output folder
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    scores = ", ".join(f"{name} {score:.4f}" for name, score in summary["held_out"].items())
    assert "Held out of training (2 source(s), `eval_examples` rows each)" in card and scores in card
