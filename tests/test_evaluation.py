"""Evaluation through mteb's in-memory mock tasks on a tiny in-place model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mteb.mocks import mock_tasks

from st_synth import build_embedder
from st_synth.evaluation.evaluate import InstructedEncoder, evaluate, resolve_tasks
from st_synth.evaluation.instructions import STS_INSTRUCTION, get_instruction
from st_synth.testing.tiny import build_tiny_mistral


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_embedder(
        str(build_tiny_mistral(tmp_path_factory.mktemp("m") / "tiny", "none")), max_seq_length=64
    )


def test_instructions_reach_queries_not_documents_and_scores_are_stable(model, tmp_path):
    tasks = [mock_tasks.MockRetrievalTask(), mock_tasks.MockSTSTask()]
    overrides = {"MockRetrievalTask": "find the passage"}
    first = evaluate(model, tasks, overrides=overrides, output=tmp_path / "results.json")
    again = evaluate(model, [mock_tasks.MockRetrievalTask(), mock_tasks.MockSTSTask()], overrides=overrides)
    assert first["summary"]["main_score"] == again["summary"]["main_score"]
    scores = first["summary"]["main_score"]
    assert set(scores) == {"MockRetrievalTask", "MockSTSTask"}
    assert 0 <= scores["MockRetrievalTask"] <= 1 and -1 <= scores["MockSTSTask"] <= 1
    assert first["instructions"] == {"MockRetrievalTask": "find the passage", "MockSTSTask": STS_INSTRUCTION}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["main_score"] == scores and saved["mteb"][0]["task_name"] == "MockRetrievalTask"


def test_encoder_sides_and_cache(model):
    encoder = InstructedEncoder(model, {"MockRetrievalTask": "find the passage"})
    evaluate_calls = []
    import mteb

    mteb.evaluate(encoder, [mock_tasks.MockRetrievalTask(), mock_tasks.MockSTSTask()], cache=None,
                  show_progress_bar=False)  # fmt: skip
    evaluate_calls = encoder.calls
    sides = {(c["task"], c["side"]): c["instruction"] for c in evaluate_calls}
    assert sides[("MockRetrievalTask", "query")] == "find the passage"
    assert sides[("MockRetrievalTask", "document")] is None
    assert sides[("MockSTSTask", "query")] == STS_INSTRUCTION  # symmetric: every text is a query
    repeated = [c for c in evaluate_calls if c["task"] == "MockRetrievalTask" and c["side"] == "query"]
    assert len(repeated) >= 2 and repeated[-1]["encoded"] == 0  # the second pass came from the cache
    plain = InstructedEncoder(model, use_instructions=False)
    assert plain.instruction_for("MockSTSTask", "STS") is None


def test_the_model_sees_each_instruction_in_its_template(model):
    from types import SimpleNamespace

    seen: list[list[int]] = []
    handle = model[0].register_forward_pre_hook(lambda _m, args: seen.extend(args[0]["input_ids"].tolist()))
    try:
        encoder = InstructedEncoder(model, {"MockRetrievalTask": "find the passage"})
        task = SimpleNamespace(name="MockRetrievalTask", type="Retrieval")
        for side in ("query", "document"):
            encoder.encode([{"text": ["the cat"]}], task_metadata=task, hf_split="test", hf_subset="default",
                           prompt_type=side)  # fmt: skip
    finally:
        handle.remove()
    decoded = [model[0].tokenizer.decode(ids) for ids in seen]
    assert decoded == ["Instruct : find the passage \n Query : the cat </s>", "the cat </s>"]


def test_unknown_task_names_fail_with_close_matches():
    with pytest.raises(ValueError, match=r"'STSBenchmrk'\. Did you mean 'STSBenchmark"):
        resolve_tasks(["STSBenchmrk"])


def test_cli_evaluates_and_updates_the_card(tmp_path, monkeypatch, capsys):
    from st_synth.cli import main
    from st_synth.data.toy import write_toy_synthetic
    from st_synth.evaluation import evaluate as evaluation
    from st_synth.training.arguments import DataArguments, ModelArguments, RecipeTrainingArguments
    from st_synth.training.trainer import train

    backbone = str(build_tiny_mistral(tmp_path / "tiny", "none"))
    data = str(write_toy_synthetic(tmp_path / "data", rows_per_kind=16))
    args = RecipeTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=1,
                                      use_cpu=True, save_strategy="no")  # fmt: skip
    train(ModelArguments(base_model=backbone, max_seq_length=32, lora_r=4), DataArguments(dataset=data), args)
    monkeypatch.setattr(evaluation, "resolve_tasks", lambda names: [mock_tasks.MockSTSTask()])
    final = tmp_path / "run" / "final"
    assert "not evaluated yet" in (final / "README.md").read_text()
    code = main(["evaluate", "--model", str(final), "--tasks", "MockSTSTask",
                 "--output", str(tmp_path / "r.json"), "--update-card"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "MockSTSTask:" in out and "mean:" in out
    card = (final / "README.md").read_text()
    assert "| MockSTSTask |" in card and "not evaluated yet" not in card
    assert main(["evaluate", "--model", str(tmp_path / "nothing"), "--tasks", "MockSTSTask"]) == 2
    capsys.readouterr()

    # Before/after: the backbone the card names (untrained) and a reference encoder, in one table and card.
    code = main(["evaluate", "--model", str(final), "--tasks", "MockSTSTask", "--baseline",
                 "--reference", backbone, "--max_seq_length", "16", "--output", str(tmp_path / "r2.json"),
                 "--update_card"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert f"| task | trained | untrained | {backbone} | trained - untrained |" in out
    row = next(line for line in out.splitlines() if line.startswith("| MockSTSTask |"))
    trained, untrained, _reference, delta = (float(cell) for cell in row.strip("| ").split(" | ")[1:])
    assert abs(trained - untrained - delta) < 1e-3
    card = (final / "README.md").read_text()
    assert "| task | this model | untrained |" in card
    # Without card facts there is no backbone to compare with: refused before any encoding.
    assert main(["evaluate", "--model", backbone, "--tasks", "MockSTSTask", "--baseline"]) == 2
    assert "baseline needs the backbone" in capsys.readouterr().err


def test_lee_document_sts_loads_offline_and_scores(model):
    tasks = resolve_tasks(["LeeDocSTS"])
    tasks[0].load_data()
    test = tasks[0].dataset["test"]
    assert test.num_rows == 50 * 49 // 2 and min(test["score"]) >= 0 and max(test["score"]) <= 1
    first = evaluate(model, tasks)
    score = first["summary"]["main_score"]["LeeDocSTS"]
    assert -1 <= score <= 1 and first["instructions"] == {"LeeDocSTS": STS_INSTRUCTION}


def test_chatterbot_retrieval_loads_offline_and_instructs_queries_only(model):
    tasks = resolve_tasks(["ChatterbotQARetrieval"])
    tasks[0].load_data()
    split = tasks[0].dataset["default"]["test"]
    assert split["queries"].num_rows > 200 and split["corpus"].num_rows > 200
    assert all(len(docs) == 1 for docs in split["relevant_docs"].values())
    encoder = InstructedEncoder(model)
    import mteb

    result = mteb.evaluate(encoder, tasks, cache=None, show_progress_bar=False)
    assert 0 <= result.task_results[0].get_score() <= 1
    sides = {c["side"]: c["instruction"] for c in encoder.calls}
    assert sides == {"query": get_instruction("ChatterbotQARetrieval"), "document": None}


def test_the_torch_docs_domain_task_is_natural_queries_for_their_own_documents(model):
    """TorchDocsRetrieval: summaries of the pinned torch's API, each relevant to the rest of its own docstring
    (never the same text, never a signature), resolvable by name and outside the offline benchmark."""
    from st_synth.data.decontamination import Decontaminator
    from st_synth.data.offline_tasks import torch_doc_pairs, torch_doc_queries
    from st_synth.evaluation.evaluate import resolve_benchmark

    pairs = torch_doc_pairs()
    assert len(pairs) > 500 and pairs == torch_doc_pairs()  # the same task every time
    assert len({q for q, _ in pairs}) == len({d for _, d in pairs}) == len(pairs)
    assert all(q not in d and len(d.split()) >= 30 and "->" not in q.split("(")[0] for q, d in pairs)
    lgamma = "Computes the natural logarithm of the absolute value of the gamma function on input."
    assert lgamma in dict(pairs)  # torch.lgamma: its signature line dropped, :attr:`input` unwrapped
    tasks = resolve_tasks(["TorchDocsRetrieval"])
    tasks[0].load_data()
    split = tasks[0].dataset["default"]["test"]
    kept = torch_doc_queries(pairs)
    assert 0.9 * len(pairs) < len(kept) < len(pairs)  # torch's docstrings do repeat each other
    assert split["queries"]["text"] == [pairs[i][0] for i in kept]
    assert split["corpus"].num_rows == len(pairs)  # every document, the repeated ones too
    overlap = Decontaminator([d for _, d in pairs])
    assert not any(overlap.why(text) for text in split["queries"]["text"])
    assert "TorchDocsRetrieval" not in [t.metadata.name for t in resolve_benchmark("st-synth-offline")]
    assert get_instruction("TorchDocsRetrieval").startswith("Given a one-sentence summary of a PyTorch")


def test_a_summary_that_a_document_repeats_is_no_query():
    """Training on the documents would train on it: word for word inside another document (case and spacing
    aside), or sharing 13 words with one, it is left out; the rest stay."""
    from st_synth.data.offline_tasks import torch_doc_queries

    filler = "the rest of this docstring says more about shapes and types than anyone will read"
    long = "Applies a linear transformation to the incoming data using the weight matrix and the bias vector given"
    pairs = [
        ("Returns the sine of input.", f"{filler}, for the sine."),
        (
            "Computes the cosine of each element.",
            f"{filler}. It  COMPUTES the cosine of each element, like cos.",
        ),
        (long + ".", f"{filler} once more."),
        ("Another summary nobody repeats.", f"See also: {long.lower()} and a bit more of {filler}."),
    ]
    assert torch_doc_queries(pairs) == [0, 3]


def test_mini_newsgroups_loads_safely_without_label_leaks(model):
    import pickle

    from st_synth.data.offline_tasks import _NewsgroupUnpickler, read_mini_newsgroups

    posts, labels, names = read_mini_newsgroups()
    assert names == ["alt.atheism", "sci.space"] and len(posts) == 200 and sorted(set(labels)) == [0, 1]
    tasks = resolve_tasks(["MiniNewsgroupsClassification"])
    tasks[0].load_data()
    train, test = tasks[0].dataset["train"], tasks[0].dataset["test"]
    assert train.num_rows == test.num_rows == 100 and sum(test["label"]) == 50
    assert not any("Newsgroups:" in text or "alt.atheism" in text.split("\n")[0] for text in train["text"])
    assert all(text.startswith("Subject:") for text in test["text"])
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."  # a pickle that would run a shell command
    import io

    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        _NewsgroupUnpickler(io.BytesIO(evil)).load()
    first = evaluate(model, tasks)
    again = evaluate(model, resolve_tasks(["MiniNewsgroupsClassification"]))
    score = first["summary"]["main_score"]["MiniNewsgroupsClassification"]
    assert 0 <= score <= 1 and score == again["summary"]["main_score"]["MiniNewsgroupsClassification"]
    assert first["instructions"] == {
        "MiniNewsgroupsClassification": get_instruction("MiniNewsgroupsClassification")
    }


def test_benchmarks_resolve_and_unknown_ones_get_close_matches():
    from st_synth.evaluation.evaluate import resolve_benchmark

    names = [task.metadata.name for task in resolve_benchmark("st-synth-offline")]
    assert names == ["LeeDocSTS", "MiniNewsgroupsClassification", "ChatterbotQARetrieval"]
    assert "SciFact" in [task.metadata.name for task in resolve_benchmark("BEIR")]
    with pytest.raises(ValueError, match=r"Unknown benchmark 'BIER'\. Did you mean .*BEIR"):
        resolve_benchmark("BIER")


def test_unreachable_task_data_is_a_clear_error_before_the_model_loads(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "st_synth.cli", "evaluate", "--model", str(tmp_path / "no-model"),
         "--tasks", "SciFact", "--output", str(tmp_path / "r.json")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "The data of task 'SciFact' cannot be reached" in done.stderr
    assert "--benchmark st-synth-offline" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_cli_needs_tasks_or_a_benchmark_and_names_unknown_benchmarks(tmp_path, capsys):
    from st_synth.cli import main

    assert main(["evaluate", "--model", str(tmp_path), "--output", str(tmp_path / "r.json")]) == 2
    assert "give --tasks NAME[,NAME...] or --benchmark NAME" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path), "--benchmark", "st-synth-ofline"]) == 2
    assert "Unknown benchmark 'st-synth-ofline'. Did you mean 'st-synth-offline'" in capsys.readouterr().err


def _seen_texts(model, encoder, task_name: str, task_type: str, side: str, text: str) -> tuple[str, float]:
    """What the backbone receives for one text, and the norm of the embedding the encoder returns."""
    from types import SimpleNamespace

    seen: list[list[int]] = []
    handle = model[0].register_forward_pre_hook(lambda _m, args: seen.extend(args[0]["input_ids"].tolist()))
    try:
        vector = encoder.encode([{"text": [text]}], task_metadata=SimpleNamespace(name=task_name, type=task_type),
                                hf_split="test", hf_subset="default", prompt_type=side)[0]  # fmt: skip
    finally:
        handle.remove()
    return model[0].tokenizer.decode(seen[-1]), float((vector**2).sum() ** 0.5)


def test_the_authors_protocol_and_st_synths_differ_where_their_scripts_do(model):
    e5 = InstructedEncoder(model, {"R": "cook it", "C": "eat it", "T": "find it"})
    assert e5.protocol == "e5"  # auto: an st-synth embedder is e5-style
    ours = InstructedEncoder(model, {"R": "cook it", "C": "eat it", "T": "find it"}, protocol="st-synth")
    # Reranking: the authors instruct the candidates too; st-synth reads them as documents.
    assert (
        _seen_texts(model, e5, "R", "Reranking", "document", "the cat")[0]
        == "Instruct : cook it \n Query : the cat </s>"
    )
    assert _seen_texts(model, ours, "R", "Reranking", "document", "the cat")[0] == "the cat </s>"
    # Retrieval: documents plain under both.
    for encoder in (e5, ours):
        assert _seen_texts(model, encoder, "T", "Retrieval", "document", "the dog")[0] == "the dog </s>"
        assert _seen_texts(model, encoder, "T", "Retrieval", "query", "the dog")[0].startswith(
            "Instruct : find it"
        )
    # Classification: the authors do not normalise; the same text, same instruction, other vector length.
    e5_text, e5_norm = _seen_texts(model, e5, "C", "Classification", "query", "a bird")
    our_text, our_norm = _seen_texts(model, ours, "C", "Classification", "query", "a bird")
    assert e5_text == our_text == "Instruct : eat it \n Query : a bird </s>"
    assert our_norm == pytest.approx(1.0, abs=1e-4) and abs(e5_norm - 1.0) > 1e-2
    assert type(model[-1]).__name__ == "Normalize"  # the module is back after the unnormalised encode
    assert _seen_texts(model, e5, "S", "STS", "query", "a fish")[1] == pytest.approx(1.0, abs=1e-4)
    # A plain encoder (no instruction template, no "Instruct:" prompts) gets st-synth's protocol under auto.
    from sentence_transformers import SentenceTransformer

    bare = SentenceTransformer(modules=list(model), prompts={})
    bare[0].tokenizer.chat_template = None
    assert InstructedEncoder(bare).protocol == "st-synth"
    bare.prompts = {"query": "Instruct: Given a web search query, retrieve passages\nQuery: "}
    assert InstructedEncoder(bare).protocol == "e5"
    with pytest.raises(ValueError, match=r"evaluation protocol 'e6'.*e5"):
        InstructedEncoder(model, protocol="e6")


def test_results_name_the_protocol_and_where_each_instruction_came_from(model):
    tasks = [mock_tasks.MockClassificationTask(), mock_tasks.MockRerankingTask(), mock_tasks.MockSTSTask()]
    payload = evaluate(model, tasks, overrides={"MockSTSTask": "similar please"})
    assert payload["protocol"] == "e5"
    assert payload["instruction_sources"] == {
        "MockClassificationTask": "Classification default", "MockRerankingTask": "Reranking default",
        "MockSTSTask": "override",
    }  # fmt: skip
    again = evaluate(model, [mock_tasks.MockClassificationTask()], protocol="st-synth")
    assert again["protocol"] == "st-synth"
    assert payload["unnormalized_tasks"] == ["MockClassificationTask"] and again["unnormalized_tasks"] == []


def test_truncated_dimensions_are_scored_as_columns(tmp_path, capsys):
    from st_synth.cli import main

    folder = tmp_path / "model"
    build_embedder(str(build_tiny_mistral(tmp_path / "tiny", "none")), max_seq_length=64).save(str(folder))
    full = evaluate(str(folder), [mock_tasks.MockSTSTask()])
    cut = evaluate(str(folder), [mock_tasks.MockSTSTask()], truncate_dim=16)
    assert full["summary"]["dimension"] == 32 and cut["summary"]["dimension"] == 16
    with pytest.raises(ValueError, match=r"truncate_dim must be in 1\.\.32"):
        evaluate(str(folder), [mock_tasks.MockSTSTask()], truncate_dim=33)
    out = tmp_path / "results.json"
    assert main(["evaluate", "--model", str(folder), "--tasks", "LeeDocSTS", "--output", str(out),
                 "--truncate_dim", "16", "8"]) == 0, capsys.readouterr().err  # fmt: skip
    printed = capsys.readouterr().out
    assert "| task | trained | 16 dims | 8 dims |" in printed
    saved = json.loads(out.read_text())
    assert set(saved["by_dimension"]) == {"16", "8"}
    lee = evaluate(str(folder), resolve_tasks(["LeeDocSTS"]), truncate_dim=16)["summary"]["main_score"]
    assert saved["by_dimension"]["16"]["LeeDocSTS"] == pytest.approx(lee["LeeDocSTS"])
    assert saved["by_dimension"]["16"] != saved["by_dimension"]["8"] != saved["summary"]["main_score"]


def test_quantized_precisions_are_calibrated_per_task_and_scored_as_columns(model, tmp_path, capsys):
    from types import SimpleNamespace

    from st_synth.cli import main

    task = SimpleNamespace(name="T", type="Retrieval")

    def encode(encoder, texts, side="document"):
        return encoder.encode([{"text": texts}], task_metadata=task, hf_split="test", hf_subset="default",
                              prompt_type=side)  # fmt: skip

    int8 = InstructedEncoder(model, precision="int8")
    corpus = encode(int8, ["the cat", "a dog", "stock market price", "bread in the oven"])
    assert corpus.dtype == np.float32 and np.array_equal(corpus, np.round(corpus))
    assert corpus.min() >= -128 and corpus.max() <= 127
    # Calibrated once per task, on its first texts (a retrieval corpus): a later call uses the same ranges.
    assert np.array_equal(encode(int8, ["a dog"]), corpus[1:2])
    binary = encode(InstructedEncoder(model, precision="binary"), ["the cat", "a dog"])
    assert set(np.unique(binary)) <= {-1.0, 1.0}
    plain = encode(InstructedEncoder(model), ["the cat", "a dog"])
    assert np.array_equal(binary, np.where(plain > 0, 1.0, -1.0))
    with pytest.raises(ValueError, match=r"embedding precision 'int4'.*int8"):
        InstructedEncoder(model, precision="int4")
    summary = evaluate(model, [mock_tasks.MockSTSTask()], precision="binary")["summary"]
    assert summary["precision"] == "binary" and summary["bytes_per_vector"] == 32 * 0.125
    folder = tmp_path / "m"
    model.save(str(folder))
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(folder), "--tasks", "LeeDocSTS", "--output", str(out),
                 "--precision", "int8", "ubinary"]) == 0, capsys.readouterr().err  # fmt: skip
    assert "| task | trained | int8 | ubinary |" in capsys.readouterr().out
    saved = json.loads(out.read_text())["by_precision"]
    assert saved["int8"]["bytes_per_vector"] == 32 and saved["ubinary"]["bytes_per_vector"] == 4
