"""Generation through batch files (`--batch_export` / `--batch_import`): rounds of OpenAI Batch API lines
answered by an engine stand-in (the fake server's answers, no HTTP), against an online run of the same plan."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import load_from_disk

from st_synth import GenerationConfig, SyntheticDatasetBuilder
from st_synth.cli import main
from st_synth.generation.cache import AnswerCache
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


# -- the OpenAI Batch API (--batch) against the fake server's /v1/files and /v1/batches ----------------------
PRICES = ["--price_prompt_per_million=2", "--price_completion_per_million=8",
          "--batch_price_prompt_per_million=1", "--batch_price_completion_per_million=4"]  # fmt: skip


def batch_flags(server, *extra: str) -> list[str]:
    return ["--batch", "--batch_poll_interval=0.01", *extra]


def input_lines(server) -> list[list[str]]:
    """The custom_ids each batch the server received was asked to run, in creation order."""
    return [[line["custom_id"] for line in batch["lines"]] for batch in server.batch_api.batches.values()]


def test_batch_api_rounds_give_the_online_dataset_at_the_batch_price(fake_server, tmp_path, capsys):
    server = fake_server()
    code = generate(tmp_path, *batch_flags(server), *PRICES, endpoint=["--base_url", server.base_url])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert rows(load_from_disk(str(tmp_path / "out"))) == online_rows(fake_server, tmp_path)
    api = server.batch_api
    # Every answer came through a batch (no online request), each request ran once, in one batch only, and
    # later rounds (examples after their brainstorms) went as further batches.
    batches = input_lines(server)
    assert len(batches) >= 2 and "round 2: batch" in out
    assert sum(api.lines_run.values()) == server.chat_requests
    assert max(api.lines_run.values()) == 1 and sum(map(len, batches)) == len({k for b in batches for k in b})
    # The batches were polled through their states, and each file was uploaded for the batch purpose.
    assert api.retrievals >= 4 * len(batches)
    assert all(f["purpose"] in ("batch", "batch_output") for f in api.files.values())
    report = json.loads((tmp_path / "out" / "generation_report.json").read_text())
    batch = report["batch"]
    assert report["complete"] and report["requests_sent"] == 0 and batch["route"] == "openai_batch_api"
    assert {r["status"] for r in batch["batches"].values()} == {"completed"} and len(batch["batches"]) == len(
        batches
    )
    assert batch["imported_this_run"]["answered"] == sum(api.lines_run.values())
    # Priced at the batch rate: every token is a batch token, and the cost is half the online price here.
    tokens_in, tokens_out = report["total_prompt_tokens"], report["total_completion_tokens"]
    assert (report["batch_prompt_tokens"], report["batch_completion_tokens"]) == (tokens_in, tokens_out)
    assert report["total_cost_usd"] == pytest.approx((tokens_in * 1 + tokens_out * 4) / 1e6)
    assert report["cost_usd"] == batch["imported_cost_usd"] == report["total_cost_usd"]


def test_batch_api_partial_failures_expired_and_cancelled_batches(fake_server, tmp_path, capsys):
    server = fake_server()
    api = server.batch_api
    api.outcomes.extend(["expired", "cancelled"])  # the first two batches end with half their lines run
    api.line_faults.extend([400, 500, None, 429])  # in the first batch: one refused, two failed transiently
    code = generate(tmp_path, *batch_flags(server), endpoint=["--base_url", server.base_url])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "expired: " in out and "cancelled: " in out and "1 refused (dropped)" in out
    # Lines never run (expired / cancelled) and transient failures went again; nothing that was answered did.
    first = input_lines(server)[0]
    run_twice = {key for key, times in api.lines_run.items() if times > 1}
    assert run_twice == {first[1], first[3]}
    error_files = [f for f in api.files.values() if f["filename"].endswith("_error.jsonl")]
    codes = [json.loads(line)["error"] for f in error_files for line in f["content"].decode().splitlines()]
    assert {c["code"] for c in codes if c} == {"batch_expired", "batch_cancelled"}
    report = json.loads((tmp_path / "out" / "generation_report.json").read_text())
    statuses = [r["status"] for r in report["batch"]["batches"].values()]
    assert (
        report["complete"] and statuses[:2] == ["expired", "cancelled"] and set(statuses[2:]) == {"completed"}
    )
    assert sum(n for reason, n in report["drops"].items() if reason.endswith("http_400")) == 1
    assert rows(load_from_disk(str(tmp_path / "out"))).keys() == online_rows(fake_server, tmp_path).keys()


def test_batch_api_failed_validation_and_a_batch_without_answers_stop_and_resume(
    fake_server, tmp_path, capsys
):
    server = fake_server()
    api = server.batch_api
    flags = batch_flags(server)
    api.outcomes.append("failed")
    assert generate(tmp_path, *flags, endpoint=["--base_url", server.base_url]) == 1
    err = capsys.readouterr().err
    assert "failed validation" in err and "Injected validation failure. (line 1)" in err
    assert sum(api.lines_run.values()) == 0
    # Every line of the next batch fails transiently: the run stops rather than resubmitting forever.
    api.line_faults.extend([503] * 1000)
    assert generate(tmp_path, *flags, endpoint=["--base_url", server.base_url]) == 1
    assert "without a single answer" in capsys.readouterr().err
    api.line_faults.clear()
    assert generate(tmp_path, *flags, endpoint=["--base_url", server.base_url]) == 0
    assert len(input_lines(server)) >= 4 and rows(load_from_disk(str(tmp_path / "out")))


@pytest.mark.parametrize(
    ("kill_at", "max_requests"),
    [(1, None), (2, None), (2, 3)],  # (2, 3): killed amid the parts of one round, each at most 3 requests
)
def test_killed_batch_api_run_resumes_without_submitting_or_paying_twice(fake_server, tmp_path, kill_at,
                                                                         max_requests):  # fmt: skip
    server = fake_server()
    api = server.batch_api
    flags = [f"--{name}={value}" for name, value in SETTINGS.items()]
    if max_requests is not None:
        flags.append(f"--batch_max_requests={max_requests}")
    command = [sys.executable, "-c", "import sys; from st_synth.cli import main; sys.exit(main())", "generate",
               "--output", str(tmp_path / "out"), "--model", "fake-llm", "--base_url", server.base_url,
               "--cache", str(tmp_path / "cache.sqlite"), "--no_show_progress", "--batch",
               "--batch_poll_interval=0.2", *flags]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    # With parts, killed as soon as the second exists: before the round's other parts are created.
    polled = 0 if max_requests else 2 * kill_at
    while (len(api.batches) < kill_at or api.retrievals < polled) and time.time() < deadline:
        time.sleep(0.002)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL and not (tmp_path / "out").exists()
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    batches = input_lines(server)
    assert max(api.lines_run.values()) == 1 and sum(map(len, batches)) == len({k for b in batches for k in b})
    assert max_requests is None or max(map(len, batches)) <= max_requests
    assert rows(load_from_disk(str(tmp_path / "out"))) == online_rows(fake_server, tmp_path)


def test_requests_are_cut_into_batches_within_the_providers_limits():
    from st_synth.generation.batch import BatchAPIError, split_requests

    lines = {f"k{i:02d}": {"custom_id": f"k{i:02d}", "body": {"text": "x" * (10 * i)}} for i in range(10)}
    by_count = split_requests(lines, max_requests=3, max_bytes=10**6)
    assert [len(part) for part in by_count] == [3, 3, 3, 1]
    assert [key for part in by_count for key in part] == sorted(lines)  # each line once, in key order
    sizes = {key: len(json.dumps(line)) + 1 for key, line in lines.items()}
    limit = max(sizes.values()) + 40
    by_bytes = split_requests(lines, max_requests=100, max_bytes=limit)
    assert len(by_bytes) > 1 and all(sum(sizes[k] for k in part) <= limit for part in by_bytes)
    assert split_requests(lines, 3, 10**6) == by_count  # the same lines give the same parts
    with pytest.raises(BatchAPIError, match="more than the 50 bytes"):
        split_requests(lines, 100, 50)


def test_a_round_over_the_limits_goes_as_several_batches(fake_server, tmp_path, capsys):
    server = fake_server()
    code = generate(
        tmp_path, *batch_flags(server, "--batch_max_requests=4"), endpoint=["--base_url", server.base_url]
    )
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert rows(load_from_disk(str(tmp_path / "out"))) == online_rows(fake_server, tmp_path)
    batches = input_lines(server)
    assert max(map(len, batches)) <= 4 and "round 1 (part 2 of" in out
    assert max(server.batch_api.lines_run.values()) == 1
    report = json.loads((tmp_path / "out" / "generation_report.json").read_text())["batch"]
    assert len(report["batches"]) == len(batches) and {r["status"] for r in report["batches"].values()} == {
        "completed"
    }
    assert main(["generate", "--output", str(tmp_path / "x"), "--batch", "--batch_max_requests=0"]) == 2


def test_a_batch_created_but_not_recorded_is_found_and_adopted(fake_server, tmp_path, monkeypatch, capsys):
    """A kill between the API creating a batch and the cache recording it: the restart finds the batch by the
    digest in its metadata and polls it instead of creating another."""
    from st_synth.generation.batch import BatchAPIRun

    server = fake_server()
    record = BatchAPIRun._record

    def killed(self, batch_id, value):
        raise KeyboardInterrupt

    monkeypatch.setattr(BatchAPIRun, "_record", killed)
    assert generate(tmp_path, *batch_flags(server), endpoint=["--base_url", server.base_url]) == 130
    assert (
        "nothing is submitted or paid twice" in capsys.readouterr().err and len(server.batch_api.batches) == 1
    )
    monkeypatch.setattr(BatchAPIRun, "_record", record)
    assert generate(tmp_path, *batch_flags(server), endpoint=["--base_url", server.base_url]) == 0
    assert "found batch batch_" in capsys.readouterr().out
    batches = input_lines(server)
    assert sum(map(len, batches)) == len({k for b in batches for k in b})
    assert max(server.batch_api.lines_run.values()) == 1


def test_batch_api_refuses_bad_combinations_before_anything_is_sent(fake_server, tmp_path, no_key, capsys):
    server = fake_server()
    bad = [
        (["--batch", "--batch_export", "r.jsonl"], "Choose one batch route"),
        (["--batch", "--batch_poll_interval=0"], "batch_poll_interval must be positive"),
        (
            ["--batch", "--batch_price_prompt_per_million=-1"],
            "batch_price_prompt_per_million must not be negative",
        ),
    ]
    for extra, message in bad:
        assert generate(tmp_path, *extra, endpoint=["--base_url", server.base_url]) == 2
        assert message in capsys.readouterr().err
    assert generate(tmp_path, "--batch", endpoint=["--local"]) == 2
    assert "drop --local" in capsys.readouterr().err
    assert generate(tmp_path, "--batch") == 2  # a remote endpoint without a key
    assert "No API key" in capsys.readouterr().err
    assert server.chat_requests == 0 and not server.batch_api.files
