"""The synthetic-data engine against a real HTTP server on 127.0.0.1 speaking the OpenAI API."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from datasets import load_from_disk

from st_synth import GenerationConfig, SyntheticDatasetBuilder
from st_synth.common.languages import XLMR_LANGUAGES, paper_language_weights, resolve_language_weights
from st_synth.common.names import REPORT_FILE
from st_synth.common.taxonomy import TASK_KINDS
from st_synth.data.examples import load_examples
from st_synth.generation.client import EndpointError
from st_synth.generation.prompting import example_request, plan_examples
from st_synth.generation.validation import Rejected, parse_example, parse_tasks
from st_synth.testing.openai_server import get_json, heavy_tailed_latency
from tests.helpers import assert_images_linked, free_port, kill_and_resume


def make_config(server, tmp_path: Path, **overrides) -> GenerationConfig:
    settings = dict(
        model=server.model,
        base_url=server.base_url,
        num_examples=24,
        cache=str(tmp_path / "cache.sqlite"),
        concurrency=4,
        request_timeout=0.5,
        retry_base_delay=0.01,
        show_progress=False,
    )
    settings.update(overrides)
    return GenerationConfig(**settings)


def rows(dataset) -> dict[str, list[dict]]:
    return {split: list(data) for split, data in dataset.items()}


# -- planning and prompts ----------------------------------------------------------------------------------
def test_prompts_are_a_function_of_the_seed():
    kinds = {name: 1.0 for name in TASK_KINDS}
    langs = paper_language_weights()

    def prompts(seed):
        plans = plan_examples(seed, 60, kinds, langs)
        return [
            example_request(seed, plan, 0, ["Task A about cats", "Task B about dogs"]).prompt
            for plan in plans
        ]

    assert prompts(7) == prompts(7)
    assert prompts(7) != prompts(8)
    assert {p.kind for p in plan_examples(7, 60, kinds, langs)} == set(TASK_KINDS)


@pytest.mark.parametrize("kind", list(TASK_KINDS))
def test_example_prompts_ask_for_the_papers_keys(kind):
    plan = next(
        p
        for p in plan_examples(3, 200, {k: 1.0 for k in TASK_KINDS}, paper_language_weights())
        if p.kind == kind
    )
    request = example_request(3, plan, 0, ["Find recipes that use a given ingredient"])
    for key in TASK_KINDS[kind].keys:
        assert f'"{key}"' in request.prompt
    assert "{" not in request.prompt and "JSON only" in request.prompt
    assert request.schema["required"] == list(TASK_KINDS[kind].keys)
    if kind == "bitext":
        assert plan.language != plan.target_language and plan.target_language in request.prompt
    else:
        assert plan.language in request.prompt


def test_paper_language_mix():
    weights = paper_language_weights()
    assert len(weights) == len(XLMR_LANGUAGES) == 93
    assert weights["English"] == pytest.approx(0.431) and weights["Polish"] == pytest.approx(0.029)
    assert sum(weights.values()) == pytest.approx(1.0)
    plans = plan_examples(0, 4000, {"retrieval": 1.0}, weights)
    share = Counter(p.language for p in plans)["English"] / len(plans)
    assert 0.40 < share < 0.46
    assert resolve_language_weights("english, German") == {"English": 0.5, "German": 0.5}


# -- validation --------------------------------------------------------------------------------------------
def test_validation_rejects_bad_answers_with_reasons():
    kind = TASK_KINDS["retrieval"]
    good = {"user_query": "q", "positive_document": "p", "hard_negative_document": "n"}
    assert parse_example(json.dumps(good), kind) == ("q", "p", "n")
    assert parse_example("Sure!\n```json\n" + json.dumps(good) + "\n```", kind) == ("q", "p", "n")
    cases = {
        "invalid_json": '{"user_query": "q", ',
        "missing_keys": json.dumps({"user_query": "q"}),
        "wrong_type": json.dumps({**good, "positive_document": {"nested": "p"}}),
        "empty_field": json.dumps({**good, "user_query": "  "}),
        "query_equals_positive": json.dumps({**good, "positive_document": " Q. "}),
        "negative_equals_positive": json.dumps({**good, "hard_negative_document": "P"}),
        "field_too_long": json.dumps({**good, "positive_document": "x" * 20_000}),
        "not_an_object": json.dumps(["q", "p", "n"]),
        "empty_answer": "",
        "unfilled_placeholder": json.dumps(
            {**good, "positive_document": "This is what I found: [the-important-content]"}
        ),
    }
    for reason, content in cases.items():
        with pytest.raises(Rejected) as caught:
            parse_example(content, kind)
        assert caught.value.reason == reason
    assert parse_tasks(
        '["Find a recipe for dinner", "find a recipe for dinner.", 3, "Classify tweets by mood"]'
    ) == [
        "Find a recipe for dinner",
        "Classify tweets by mood",
    ]
    assert parse_tasks('{"tasks": ["Match questions to FAQ answers"]}') == ["Match questions to FAQ answers"]
    assert parse_tasks('["write_list", "Summarise [topic] articles", "Rank reviews by helpfulness"]') == [
        "Rank reviews by helpfulness"
    ]
    # Real citations and numbers in brackets are text, not placeholders.
    cited = {**good, "positive_document": "Insulin lowers glucose [1] within 30 minutes [2, 3]."}
    assert parse_example(json.dumps(cited), kind)[1] == cited["positive_document"]


# -- bad input fails before any request --------------------------------------------------------------------
def test_bad_input_is_refused_before_any_request(fake_server, tmp_path, monkeypatch):
    server = fake_server()
    for overrides, message in [
        ({"kinds": "retreival"}, "Did you mean 'retrieval'"),
        ({"languages": "Klingon"}, "Choose from the 93 XLM-R languages"),
        ({"num_examples": 0}, "positive integer"),
        ({"kinds": "bitext", "languages": "English"}, "at least two languages"),
        ({"response_format": "yaml"}, "choose auto"),
        ({"max_tokens": 0}, "max_tokens must be an integer of at least 16"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_config(server, tmp_path, **overrides)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="set the environment variable OPENAI_API_KEY"):
        SyntheticDatasetBuilder(make_config(server, tmp_path, base_url="https://llm.example.com/v1"))
    with pytest.raises(EndpointError, match="Cannot reach"):
        SyntheticDatasetBuilder(make_config(server, tmp_path, base_url="http://127.0.0.1:9/v1")).build()
    with pytest.raises(EndpointError, match="it serves: fake-llm"):
        SyntheticDatasetBuilder(make_config(server, tmp_path, model="gpt-9")).build()
    assert server.chat_requests == 0


# -- faults, accounting, cache -----------------------------------------------------------------------------
def test_faults_lose_nothing_and_accounting_is_exact(fake_server, tmp_path):
    server = fake_server(latency=0.005)
    server.faults.extend(["429", "500", "503", "slow", "drop", "malformed", "truncated"])
    builder = SyntheticDatasetBuilder(
        make_config(server, tmp_path, num_examples=30, price_prompt_per_million=2.0)
    )
    dataset = builder.build()
    report = builder.report
    assert report["complete"] and sum(split.num_rows for split in dataset.values()) == 30
    assert report["requests_sent"] == server.chat_requests
    assert report["retries"] == 5
    errors = dict(report["transient_errors"])
    # "slow" is a timeout; a dropped connection reads as dropped by the server or, on aiohttp, a timeout.
    lost = errors.pop("timeout", 0) + errors.pop("connection dropped by the server", 0)
    assert lost == 2 and errors == {"http_429": 1, "http_500": 1, "http_503": 1}
    assert report["drops"].get("invalid_json", 0) + report["drops"].get("brainstorm:invalid_json", 0) == 1
    assert report["drops"].get("truncated", 0) + report["drops"].get("brainstorm:truncated", 0) == 1
    assert report["prompt_tokens"] == server.usage["prompt_tokens"]
    assert report["completion_tokens"] == server.usage["completion_tokens"]
    assert sum(t["prompt_tokens"] for t in report["tokens_by_kind"].values()) == report["prompt_tokens"]
    assert report["cost_usd"] == pytest.approx(report["prompt_tokens"] * 2.0 / 1e6)
    assert sum(report["kept_by_kind"].values()) == sum(report["kept_by_language"].values()) == 30


def test_max_tokens_caps_every_request_and_keys_the_cache(fake_server, tmp_path):
    server = fake_server()
    capped = SyntheticDatasetBuilder(make_config(server, tmp_path, kinds="retrieval,sts", max_tokens=200))
    capped.build()
    assert server.chat_requests > 0 and {body["max_tokens"] for body in server.received} == {200}
    assert capped.report["max_tokens"] == 200
    sent = server.chat_requests
    # Each kind's own budget (all above 200) is a different request: the capped answers are not reused.
    SyntheticDatasetBuilder(make_config(server, tmp_path, kinds="retrieval,sts")).build()
    uncapped = {body["max_tokens"] for body in server.received[sent:]}
    assert uncapped == {1024, TASK_KINDS["retrieval"].max_tokens, TASK_KINDS["sts"].max_tokens}


def test_fake_server_reports_where_time_went(fake_server, tmp_path):
    """The benchmark's instrument: requests in flight integrated over time equals the time requests spent
    in the server (Little's law), which is at least the latency drawn for them; the last request's arrival
    falls inside the run, on the clock the benchmark reads (the drain is measured from it)."""
    server = fake_server(latency=0.01)
    started = time.monotonic()
    SyntheticDatasetBuilder(make_config(server, tmp_path, num_examples=12, concurrency=3)).build()
    ended = time.monotonic()
    timing = get_json(server.base_url, "timing")
    assert timing["handled"] == server.chat_requests > 0
    assert timing["drawn_seconds"] == pytest.approx(0.01 * timing["handled"])
    assert timing["handler_seconds"] >= timing["drawn_seconds"]
    assert timing["inflight_seconds"] == pytest.approx(timing["handler_seconds"], rel=0.01)
    assert started < timing["last_arrival"] < ended - 0.01  # the last answer took its 10 ms after it


def test_fake_server_reseeds_its_latency_draws(fake_server, tmp_path):
    """The benchmark compares clients one after the other: after ``/reseed/N`` each meets the same
    heavy-tailed latencies in the order its requests arrive, so no client is measured on luckier draws."""
    server = fake_server(latency=heavy_tailed_latency(0.002))

    def drawn_by_a_run(seed: int, cache: str) -> float:
        assert get_json(server.base_url, f"reseed/{seed}") == {"seed": seed}
        before = get_json(server.base_url, "timing")["drawn_seconds"]
        config = make_config(server, tmp_path, num_examples=10, concurrency=1, cache=str(tmp_path / cache))
        SyntheticDatasetBuilder(config).build()
        return get_json(server.base_url, "timing")["drawn_seconds"] - before

    first, again, other = (
        drawn_by_a_run(7, "a.sqlite"),
        drawn_by_a_run(7, "b.sqlite"),
        drawn_by_a_run(8, "c.sqlite"),
    )
    assert first == pytest.approx(again, rel=1e-9) and first != pytest.approx(other, rel=1e-3)


def test_requests_go_as_declared_json(fake_server, tmp_path):
    """The client sends ready JSON bytes; servers built on FastAPI (vLLM) read a body only when it is
    declared as JSON, and so does the fake server: every test that generates anything relies on it."""
    server = fake_server()
    body = {"model": server.model, "messages": [{"role": "user", "content": "Straße, 東京"}]}
    data = json.dumps(body, ensure_ascii=False).encode()
    for content_type, status in (("text/plain", 415), ("application/json; charset=utf-8", 200)):
        post = urllib.request.Request(
            f"{server.base_url}/chat/completions", data, {"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(post) as response:
                assert response.status == status
        except urllib.error.HTTPError as error:
            assert error.code == status
    assert server.received == [body]
    SyntheticDatasetBuilder(
        make_config(server, tmp_path, kinds="bitext", languages="German,Japanese")
    ).build()
    assert server.chat_requests == 1 + 24


def test_asyncio_server_answers_like_the_threaded_one(fake_server, tmp_path):
    """``python -m st_synth.testing --asyncio`` (the benchmark's server) gives the same dataset."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "st_synth.testing", "--asyncio", "--port", str(port)])
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{base_url}/models", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        server = fake_server()
        threaded = SyntheticDatasetBuilder(make_config(server, tmp_path, cache=str(tmp_path / "a.sqlite")))
        config = make_config(server, tmp_path, base_url=base_url, cache=str(tmp_path / "b.sqlite"))
        asynchronous = SyntheticDatasetBuilder(config)
        assert rows(asynchronous.build()) == rows(threaded.build())
        assert get_json(base_url, "timing")["handled"] == asynchronous.report["requests_sent"] > 0
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_cached_rerun_sends_zero_requests_and_gives_the_same_data(fake_server, tmp_path):
    server = fake_server(bad_answer_rate=0.2)
    first = SyntheticDatasetBuilder(make_config(server, tmp_path))
    data_first = first.build()
    sent, listings = server.chat_requests, server.model_listings
    second = SyntheticDatasetBuilder(make_config(server, tmp_path))
    data_second = second.build()
    assert server.chat_requests == sent and server.model_listings == listings
    assert second.report["requests_sent"] == 0 and second.report["cache_hits"] == sent
    assert rows(data_first) == rows(data_second)
    assert second.report["total_prompt_tokens"] == first.report["prompt_tokens"]


def test_result_does_not_depend_on_concurrency_or_faults(fake_server, tmp_path):
    server = fake_server(bad_answer_rate=0.3, latency=lambda rng: rng.expovariate(1 / 0.01))
    serial = SyntheticDatasetBuilder(
        make_config(server, tmp_path, concurrency=1, cache=str(tmp_path / "a.sqlite"))
    )
    data_serial = serial.build()
    server.faults.extend(["429", "drop", "500"] * 2)
    parallel = SyntheticDatasetBuilder(
        make_config(server, tmp_path, concurrency=12, cache=str(tmp_path / "b.sqlite"))
    )
    assert rows(parallel.build()) == rows(data_serial)
    drops = serial.report["drops"]
    assert drops.get("duplicate", 0) > 0 and drops.get("invalid_json", 0) > 0, drops


@pytest.mark.parametrize("faults", [("duplicate",), ("duplicate", "near_duplicate")])
def test_duplicates_are_replaced_during_the_run_as_the_final_walk_would(
    faults, fake_server, tmp_path, monkeypatch
):
    """A first answer repeating a lower index's first answer is a certain duplicate: it moves on to its
    next attempt at once, concurrently, instead of one request at a time when the in-order walk reaches it.
    Same requests, same drops, same dataset as leaving everything to the walk."""
    import sys

    from st_synth.generation.builder import _Run

    server = fake_server(bad_answer_rate=0.3, bad_answers=faults)
    walk_requests: list[int] = []
    replace = _Run._replace

    async def counted_replace(self, index, reason="duplicate"):
        if sys._getframe(1).f_code.co_name == "_settle_final":  # asked again by the walk
            walk_requests[-1] += 1
        return await replace(self, index, reason)

    monkeypatch.setattr(_Run, "_replace", counted_replace)
    results = {}
    for eager in (False, True):
        walk_requests.append(0)
        monkeypatch.setattr(_Run, "eager_duplicates", eager)
        # No timeouts: a request the machine stalls past make_config's 0.5 s would be sent again and counted
        # (the full suite once saw 80 requests against 79, same dataset and drops), which is not what is tested.
        config = make_config(server, tmp_path, num_examples=60, concurrency=8, kinds="sts,retrieval",
                             cache=str(tmp_path / f"{eager}.sqlite"), request_timeout=60)  # fmt: skip
        builder = SyntheticDatasetBuilder(config)
        results[eager] = (rows(builder.build()), builder.report)
    (walked, walk_report), (eager_rows, eager_report) = results[False], results[True]
    assert eager_rows == walked and sum(map(len, walked.values())) == 60
    assert eager_report["retries"] == walk_report["retries"] == 0
    for key in ("requests_sent", "drops", "kept_by_kind"):
        assert eager_report[key] == walk_report[key], key
    near = walk_report["drops"].get("near_duplicate", 0)  # judged by the walk alone, in both runs
    assert (
        walk_requests[0] == walk_report["drops"]["duplicate"] + near and walk_report["drops"]["duplicate"] > 5
    )
    assert walk_requests[1] - near < (walk_requests[0] - near) / 2, walk_requests


def test_shard_indices_are_computed_not_held():
    from st_synth.generation.spool import ShardIndices

    for num_examples, block_size, shards in [
        (0, 8, 1),
        (1, 8, 2),
        (40, 8, 3),
        (41, 8, 3),
        (1000, 64, 4),
        (65, 64, 2),
    ]:
        for shard in range(shards):
            expected = [i for i in range(num_examples) if (i // block_size) % shards == shard]
            indices = ShardIndices(num_examples, block_size, shards, shard)
            assert list(indices) == expected and len(indices) == len(expected)
            assert [indices[p] for p in range(len(indices))] == expected and indices[-1:] == expected[-1:]
    with pytest.raises(IndexError):
        ShardIndices(10, 4)[10]


def test_a_run_holds_only_the_examples_in_flight(fake_server, tmp_path, monkeypatch):
    """What a run holds per example (plans, first-answer owners, task pools) is forgotten once the walk has
    settled it: during the run these hold the examples in flight (a worker's, or finished and waiting for a
    slower one below them), not the run; after it, nothing."""
    from st_synth.generation.builder import _Run

    server = fake_server(bad_answer_rate=0.2, bad_answers=("duplicate", "near_duplicate", "malformed"))
    names = ("live", "first_owner", "first_keys", "kept", "done", "pools", "block_kinds")
    sizes: Counter = Counter()
    last: dict[str, int] = {}
    walk = _Run._walk

    async def measured_walk(self, final):
        await walk(self, final)
        for name in names:
            sizes[name] = max(sizes[name], len(getattr(self, name)))
            last[name] = len(getattr(self, name))

    monkeypatch.setattr(_Run, "_walk", measured_walk)
    config = make_config(server, tmp_path, num_examples=1200, concurrency=4, block_size=8,
                         kinds="retrieval,sts,classification")  # fmt: skip
    builder = SyntheticDatasetBuilder(config)
    builder.build()
    assert builder.report["num_examples_kept"] >= 1190 and builder.report["drops"]["duplicate"] > 10
    assert 0 < sizes["live"] < 600 and sizes["first_owner"] < 600 and sizes["block_kinds"] < 75, sizes
    # After the last walk: only the pools of the last block (one per kind that brainstorms) and the kinds of
    # the blocks the brainstorms looked ahead to (past the end: none).
    assert {name: n for name, n in last.items() if name not in ("pools", "block_kinds")} == dict.fromkeys(
        ("live", "first_owner", "first_keys", "kept", "done"), 0
    )
    assert last["pools"] <= 2 and last["block_kinds"] <= 8, last


def test_shards_are_disjoint_and_their_union_is_the_single_run(fake_server, tmp_path):
    server = fake_server(bad_answer_rate=0.2)
    single = SyntheticDatasetBuilder(make_config(server, tmp_path, num_examples=40, block_size=8)).build()
    union: dict[str, list] = {}
    for index in range(3):
        config = make_config(
            server, tmp_path, num_examples=40, block_size=8, num_shards=3, shard_index=index,
            cache=str(tmp_path / f"shard{index}.sqlite"),
        )  # fmt: skip
        for split, data in SyntheticDatasetBuilder(config).build().items():
            union.setdefault(split, []).extend(data)
    for split, data in single.items():
        assert sorted(union[split], key=json.dumps) == sorted(data, key=json.dumps)
        assert len(union[split]) == data.num_rows  # disjoint: no row twice


def test_response_format_negotiation_is_remembered(fake_server, tmp_path):
    server = fake_server(reject_json_schema=True)
    builder = SyntheticDatasetBuilder(make_config(server, tmp_path, num_examples=12, concurrency=8))
    builder.build()
    assert builder.report["format_downgrades"] == 1
    assert set(builder.report["response_formats"]) == {"json_object_schema"}
    rejected = sum(
        1 for body in server.received if body.get("response_format", {}).get("type") == "json_schema"
    )
    assert rejected == 1
    more = SyntheticDatasetBuilder(make_config(server, tmp_path, num_examples=12, concurrency=1))
    more.build()
    assert more.report["format_downgrades"] == 0 and more.report["cache_hits"] > 0


def test_plain_text_mode_extracts_fenced_json(fake_server, tmp_path):
    server = fake_server()
    builder = SyntheticDatasetBuilder(make_config(server, tmp_path, response_format="text", num_examples=8))
    assert sum(d.num_rows for d in builder.build().values()) == 8
    assert all("response_format" not in body for body in server.received)
    assert builder.report["response_formats"] == {"text": server.chat_requests}


def test_failure_budget_stops_and_keeps_what_it_has(fake_server, tmp_path):
    server = fake_server(bad_answer_rate=1.0, bad_answers=("malformed", "truncated"))
    builder = SyntheticDatasetBuilder(make_config(server, tmp_path, kinds="sts", failure_budget=10))
    dataset = builder.build()
    assert not builder.report["complete"]
    assert "failure budget of 10" in builder.report["stop_reason"]
    assert "sts" not in dataset and sum(builder.report["drops"].values()) >= 11
    assert builder.report["kept_by_kind"] == {"sts": 0}


def test_output_folder_is_ready_for_sentence_transformers(fake_server, tmp_path):
    server = fake_server()
    builder = SyntheticDatasetBuilder(
        make_config(server, tmp_path, num_examples=60, languages="English,French")
    )
    builder.build()
    out = builder.save(tmp_path / "out")
    saved = load_from_disk(str(out))
    assert list(saved) == list(TASK_KINDS)
    loaded = load_examples(out)  # the working form: texts without instructions, metadata joined back
    for kind, split in loaded.items():
        assert saved[kind].column_names == [
            "anchor",
            "positive",
            *(["negative"] if TASK_KINDS[kind].has_negative else []),
        ]
        assert split.column_names == list(TASK_KINDS[kind].columns)
        assert ("negative" in split.column_names) == TASK_KINDS[kind].has_negative
        assert split.num_rows > 0 and all(row["instruction"] for row in split)
    assert set(loaded["sts"]["instruction"]) == {"Retrieve semantically similar text."}
    assert set(loaded["bitext"]["language"]) <= {"English-French", "French-English"}
    report = json.loads((out / REPORT_FILE).read_text())
    for field in ("requests_sent", "cache_hits", "retries", "prompt_tokens", "completion_tokens", "tokens_by_kind",
                  "drops", "kept_by_kind", "kept_by_language", "wall_time_s", "generator_model"):  # fmt: skip
        assert field in report


def test_api_key_never_reaches_disk_or_logs(fake_server, tmp_path, monkeypatch, caplog):
    secret = "sk-test-SECRET-4242"
    server = fake_server(api_key=secret)
    monkeypatch.setenv("MY_KEY", secret)
    caplog.set_level(logging.DEBUG)
    builder = SyntheticDatasetBuilder(make_config(server, tmp_path, api_key_env="MY_KEY", num_examples=10))
    builder.build()
    out = builder.save(tmp_path / "out")
    for path in [*out.rglob("*"), *tmp_path.glob("cache.sqlite*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in caplog.text and secret not in json.dumps(builder.report)
    monkeypatch.setenv("MY_KEY", "sk-wrong")
    with pytest.raises(EndpointError, match="refused the API key"):
        SyntheticDatasetBuilder(
            make_config(server, tmp_path, api_key_env="MY_KEY", cache=str(tmp_path / "x.sqlite"))
        ).build()


def test_push_to_hub_uploads_data_and_card(fake_server, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from st_synth.cards.hub import push_dataset

    server = fake_server(bad_answer_rate=0.3, bad_answers=("near_duplicate",))
    builder = SyntheticDatasetBuilder(make_config(server, tmp_path, num_examples=12, kinds="retrieval,sts"))
    dataset = builder.build()
    near = builder.report["near_duplicates_by_kind"]
    assert sum(near.values()) > 0
    uploaded: dict[str, bytes] = {}
    calls = []
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
    )

    def upload_folder(self, *, repo_id, folder_path, repo_type, **kw):
        calls.append(("upload", repo_id, repo_type))
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                uploaded[str(path.relative_to(folder_path))] = path.read_bytes()
        return "https://hub.local/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    push_dataset(dataset, builder.report, "me/synthetic", metadata=builder.metadata, token="hf_SECRET_TOKEN")
    assert calls[0][:2] == ("create", "me/synthetic") and calls[1] == ("upload", "me/synthetic", "dataset")
    images = ["kinds", "languages", "lengths"] + (["drops"] if builder.report["drops"] else [])
    assert set(uploaded) == {
        "README.md", "generation_report.json",
        "retrieval/train-00000-of-00001.parquet", "sts/train-00000-of-00001.parquet",
        "metadata/retrieval-00000-of-00001.parquet", "metadata/sts-00000-of-00001.parquet",
        *(f"images/{name}.png" for name in images),
    }  # fmt: skip
    card = uploaded["README.md"].decode()
    assert_images_linked(card, uploaded, images)
    assert "`fake-llm`" in card and "| `retrieval` |" in card and "path: sts/train-*" in card
    assert f"near-duplicate\n(retrieval {near['retrieval']}, sts {near['sts']})" in card
    assert all(b"hf_SECRET_TOKEN" not in blob for blob in uploaded.values())


# -- the command line, killed and resumed ------------------------------------------------------------------
def cli(server, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "st_synth.cli", "generate", "--output", str(out), "--model", server.model,
        "--base-url", server.base_url, "--cache", str(cache), "--num-examples", "40", "--seed", "5",
        "--no-progress", *extra,
    ]  # fmt: skip


def test_sigkill_and_resume_gives_the_uninterrupted_dataset(fake_server, tmp_path):
    server = fake_server(latency=0.03, bad_answer_rate=0.15)
    env = {**os.environ, "OPENAI_API_KEY": ""}
    reference = subprocess.run(
        cli(server, tmp_path / "ref", tmp_path / "ref.sqlite"), env=env, capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr
    paid_reference = server.chat_requests

    cache = tmp_path / "killed.sqlite"
    resumed = kill_and_resume(
        cli(server, tmp_path / "out", cache, "--concurrency", "4"), cache, env, tmp_path / "out"
    )
    assert resumed.returncode == 0, resumed.stderr
    paid_resumed = server.chat_requests - paid_reference
    assert paid_resumed <= paid_reference + 4  # at most the requests that were in flight, paid twice
    assert rows(load_from_disk(str(tmp_path / "out"))) == rows(load_from_disk(str(tmp_path / "ref")))


def test_cli_exit_codes(fake_server, tmp_path):
    server = fake_server(bad_answer_rate=1.0)
    env = {**os.environ, "OPENAI_API_KEY": ""}

    def run(*extra: str) -> subprocess.CompletedProcess:
        command = cli(server, tmp_path / "o", tmp_path / "c.sqlite", *extra)
        return subprocess.run(command, env=env, capture_output=True, text=True)

    bad = run("--kinds", "nope")
    assert bad.returncode == 2 and "Choose one of: retrieval" in bad.stderr
    failing = run("--failure-budget", "5")
    assert failing.returncode == 3 and "INCOMPLETE" in failing.stdout


def test_kept_examples_are_spooled_to_arrow_files_and_orphaned_spools_removed(
    fake_server, tmp_path, monkeypatch
):
    """Settled examples leave memory for Arrow files beside the cache (flushed every FLUSH rows); the dataset
    is read back from them; a spool left by a killed process is removed, the live process's kept."""
    from st_synth.generation import spool as spool_module

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    orphan = tmp_path / f"{spool_module.SPOOL_PREFIX}{gone.stdout.strip()}-x"
    alive = tmp_path / f"{spool_module.SPOOL_PREFIX}{os.getppid()}-y"
    orphan.mkdir()
    alive.mkdir()
    monkeypatch.setattr(spool_module.Spool, "FLUSH", 5)
    server = fake_server()
    builder = SyntheticDatasetBuilder(make_config(server, tmp_path, num_examples=40, kinds="retrieval,sts"))
    builder.build()
    dataset = builder.examples
    assert not orphan.exists() and alive.exists()
    spools = [p for p in tmp_path.glob(f"{spool_module.SPOOL_PREFIX}{os.getpid()}-*")]
    # The kinds' files, and the formatted texts (datasets' cache files) beside them.
    assert len(spools) == 1 and {p.name for p in spools[0].iterdir() if not p.name.startswith("cache-")} == {
        "retrieval.arrow", "sts.arrow"}  # fmt: skip
    assert {kind: Path(data.cache_files[0]["filename"]).parent for kind, data in dataset.items()} == {
        "retrieval": spools[0], "sts": spools[0]}  # fmt: skip
    assert all(Path(data.cache_files[0]["filename"]).parent == spools[0] for data in builder.dataset.values())
    assert sum(len(d) for d in dataset.values()) == 40 == builder.report["num_examples_kept"]
