"""The parts of benchmark scripts that compute what their tables report (the rest of a benchmark is its run)."""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from st_synth.model.embedder import build_embedder
from st_synth.testing.tiny import build_tiny_mistral

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    if str(BENCHMARKS) not in sys.path:  # the scripts import their shared helper (_results) as run from there
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_soup_is_the_mean_of_its_models_and_loads_as_a_plain_sentence_transformer(tmp_path):
    bench = load_benchmark("bench_soup")
    folders = []
    for seed in (0, 1, 2):
        folder = tmp_path / f"model-{seed}"
        build_embedder(
            str(build_tiny_mistral(tmp_path / f"tiny-{seed}", "none", seed=seed)), max_seq_length=32
        ).save(str(folder))
        folders.append(folder)
    states = [SentenceTransformer(str(folder), device="cpu").state_dict() for folder in folders]
    assert not torch.equal(states[0]["0.model.embed_tokens.weight"], states[1]["0.model.embed_tokens.weight"])

    soup = bench.average_models(folders, tmp_path / "soup")
    for name, value in soup.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, sum(state[name] for state in states) / 3, rtol=0, atol=1e-6)
    texts = ["a soup of three seeds", "one model at the cost of one"]
    saved = SentenceTransformer(str(tmp_path / "soup"), device="cpu")
    np.testing.assert_allclose(saved.encode(texts), soup.encode(texts), atol=1e-6)

    other = tmp_path / "wider"
    build_embedder(
        str(build_tiny_mistral(tmp_path / "tiny-wide", "none", hidden_size=48)), max_seq_length=32
    ).save(str(other))
    with pytest.raises((SystemExit, RuntimeError)):
        bench.average_models([folders[0], other], tmp_path / "refused")


@pytest.mark.slow
def test_the_generation_time_benchmark_reads_the_real_servers_timings(tmp_path):
    """bench_generation_time.py labels llama-cpp-python's own per-request log lines: the tokens it kept from the
    previous prompt and the ones it read add up to the prompt, and a second prompt with the same beginning
    keeps that beginning (a change of llama-cpp-python's log format breaks this test, not the table)."""
    pytest.importorskip("llama_cpp")
    bench = load_benchmark("bench_generation_time")
    rule = "You write short, plain answers about the weather in one sentence. " * 4
    usages = []
    with bench.verbose_server(tmp_path, 1) as (server, log, _):
        for question in ("Is it raining?", "Is it windy?"):
            body = {"model": server.alias, "messages": [{"role": "user", "content": rule + question}],
                    "max_tokens": 8, "temperature": 0.0}  # fmt: skip
            request = urllib.request.Request(f"{server.base_url}/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=120) as response:
                usages.append(json.loads(response.read())["usage"])
    timings = bench.server_timings(log)
    assert len(timings) == 2
    for timing, usage in zip(timings, usages, strict=True):
        assert timing["kept"] + timing["read"] == usage["prompt_tokens"]
        assert timing["written"] in (usage["completion_tokens"] - 1, usage["completion_tokens"])
        assert timing["read_ms"] > 0 and timing["write_ms"] > 0
        assert timing["total_ms"] >= timing["read_ms"] + timing["write_ms"]
    assert timings[0]["kept"] == 0 and timings[1]["kept"] > 40  # the rule, four times over
    summary = bench.totals(timings)
    assert summary["requests"] == 2 and summary["prompt_tokens_read"] == sum(t["read"] for t in timings)


def test_the_generation_time_benchmark_labels_answers_by_their_format(tmp_path):
    from st_synth.generation.cache import AnswerCache

    bench = load_benchmark("bench_generation_time")
    cache = AnswerCache(tmp_path / "answers.sqlite")
    for key, content in [("b", '{"S1": "x"}'), ("a", "A retelling in prose."), ("c", ' ["task one"]')]:
        cache.put(
            key, {"content": content, "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}
        )
    cache.close()
    assert bench.answer_formats(tmp_path / "answers.sqlite") == [
        "json",
        "prose",
        "json",
    ]  # in the order stored


def test_the_batched_decode_benchmark_decodes_several_sequences_of_the_packaged_model(tmp_path, monkeypatch):
    """bench_batched_decode.py on the real packaged SmolLM2 (a few tokens): every B decodes, the table has one row
    per B with its ratio to one sequence at a time, and bad --batches are refused."""
    pytest.importorskip("llama_cpp")
    bench = load_benchmark("bench_batched_decode")
    results = tmp_path / "batched"
    argv = ["bench", "--batches", "1,3", "--prompt", "8", "--steps", "4", "--rounds", "1", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--results", str(results)])
    bench.main()
    payload = json.loads(results.with_suffix(".json").read_text())
    assert set(payload["best"]) == {"1", "3"}
    assert all(entry["read_tok_s"] > 0 and entry["write_tok_s"] > 0 for entry in payload["best"].values())
    rows = [line for line in results.with_suffix(".md").read_text().splitlines() if line.startswith("| 1 |")]
    assert rows and rows[0].endswith("| 1.00x |")
    for bad in ("0,2", "1,x"):
        monkeypatch.setattr(sys, "argv", ["bench", "--batches", bad])
        with pytest.raises(SystemExit, match="positive integers"):
            bench.main()
