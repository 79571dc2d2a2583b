"""Generation through batch files (`--batch_export` / `--batch_import`): rounds of OpenAI Batch API lines
answered by an engine stand-in (the fake server's answers, no HTTP), against an online run of the same plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk

from st_synth import GenerationConfig, SyntheticDatasetBuilder
from st_synth.cache import AnswerCache
from st_synth.cli import main
from st_synth.testing import FakeOpenAIServer
from st_synth.testing.openai_server import answer_batch

SETTINGS = {
    "num_examples": 24,
    "seed": 5,
    "kinds": "retrieval,sts,classification",
    "languages": "English,German",
}
REMOTE = "https://api.example.invalid/v1"  # never reached: the file route makes no request


def generate(tmp_path: Path, *extra: str, endpoint: list[str] | None = None) -> int:
    flags = [f"--{name}={value}" for name, value in SETTINGS.items()]
    return main(["generate", "--output", str(tmp_path / "out"), "--model", "fake-llm",
                 *(["--base_url", REMOTE] if endpoint is None else endpoint),
                 "--cache", str(tmp_path / "cache.sqlite"), "--no_show_progress", *flags, *extra])  # fmt: skip


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rows(dataset) -> dict[str, list[dict]]:
    return {split: list(data) for split, data in dataset.items()}


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def online_rows(fake_server, tmp_path: Path) -> dict[str, list[dict]]:
    server = fake_server()
    config = GenerationConfig(model=server.model, base_url=server.base_url, cache=str(tmp_path / "online.sqlite"),
                              concurrency=4, show_progress=False, **SETTINGS)  # fmt: skip
    return rows(SyntheticDatasetBuilder(config).build())


def test_rounds_of_batch_files_give_the_online_dataset(fake_server, tmp_path, no_key, capsys):
    engine = FakeOpenAIServer()  # answers lines in-process: a pure function of each request
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    assert generate(tmp_path, "--batch_export", str(requests)) == 4
    out = capsys.readouterr().out
    first = lines(requests)
    assert "round 1:" in out and f"{len(first)} requests" in out and not (tmp_path / "out").exists()
    # Round 1 is the brainstorms (classification has none: its examples go at once); Batch API format.
    line = first[0]
    assert set(line) == {"custom_id", "method", "url", "body"} and line["url"] == "/v1/chat/completions"
    assert (
        line["method"] == "POST" and line["body"]["model"] == "fake-llm" and "response_format" in line["body"]
    )

    rounds = 1
    while True:
        answer_batch(engine, requests, results)
        code = generate(tmp_path, "--batch_import", str(results), "--batch_export", str(requests))
        if code != 4:
            break
        rounds += 1
        assert rounds < 10
    assert code == 0, capsys.readouterr().err
    assert rounds >= 2 and "saved to" in capsys.readouterr().out
    assert rows(load_from_disk(str(tmp_path / "out"))) == online_rows(fake_server, tmp_path)
    report = json.loads((tmp_path / "out" / "generation_report.json").read_text())
    assert report["complete"] and report["requests_sent"] == 0 and report["batch"]["pending_requests"] == 0


def test_failed_lines_are_retried_refused_ones_dropped_and_foreign_results_refused(tmp_path, no_key, capsys):
    engine = FakeOpenAIServer()
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    assert generate(tmp_path, "--batch_export", str(requests)) == 4
    ids = [line["custom_id"] for line in lines(requests)]
    transient, expired, refused = ids[0], ids[1], ids[2]
    answer_batch(engine, requests, results, fail={transient: 500, expired: 0, refused: 400})
    cache = tmp_path / "cache.sqlite"
    assert generate(tmp_path, "--batch_import", str(results), "--batch_export", str(requests)) == 4
    out = capsys.readouterr().out
    assert f"{len(ids) - 3} answers, 1 refused (dropped), 2 failed transiently" in out
    again = {line["custom_id"] for line in lines(requests)}
    assert {transient, expired} <= again and refused not in again
    answered = AnswerCache.count(cache)

    # Importing the same file again stores nothing twice; a file of lines this cache never exported is refused
    # whole, before anything is stored.
    assert generate(tmp_path, "--batch_import", str(results), "--batch_export", str(requests)) == 4
    assert f"{len(ids) - 3} already in the cache" in capsys.readouterr().out
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(results.read_text() + json.dumps({"custom_id": "0" * 64, "response": None}) + "\n")
    assert generate(tmp_path, "--batch_import", str(foreign)) == 1
    assert "is not a request this cache exported" in capsys.readouterr().err
    assert AnswerCache.count(cache) == answered

    while (code := generate(tmp_path, "--batch_import", str(results), "--batch_export", str(requests))) == 4:
        answer_batch(engine, requests, results)
    assert code == 0
    report = json.loads((tmp_path / "out" / "generation_report.json").read_text())
    assert (
        report["complete"]
        and report["drops"].get("brainstorm:http_400", 0) + report["drops"].get("http_400", 0) == 1
    )


def test_batch_route_refuses_local_and_needs_no_key(tmp_path, no_key, capsys):
    assert generate(tmp_path, "--batch_export", str(tmp_path / "r.jsonl"), endpoint=["--local"]) == 2
    assert "drop --local" in capsys.readouterr().err
    # Online, the same remote endpoint without a key is refused before anything is sent.
    assert generate(tmp_path) == 2
    assert "No API key" in capsys.readouterr().err
    # Replaying without --batch_export says what is missing instead of writing nothing silently.
    assert generate(tmp_path, "--batch_import", str(tmp_path / "none.jsonl")) == 1
    assert "No results file" in capsys.readouterr().err
