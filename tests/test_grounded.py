"""Generation grounded in a corpus, against a real HTTP server on 127.0.0.1 speaking the OpenAI API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, load_from_disk

from st_synth import GenerationConfig, SyntheticDatasetBuilder
from st_synth.common.taxonomy import TASK_KINDS
from st_synth.data.corpus import Corpus
from st_synth.data.filtering import ConsistencyFilter, filter_folder
from st_synth.generation.grounding import (
    copied_share,
    label_set,
    load_spec,
    parse_answer,
    prompt_variants,
    whole_sentences,
)
from st_synth.generation.validation import Rejected
from tests.helpers import kill_and_resume

TOPICS = ["river floods", "library books", "school buses", "city budget", "bakery bread", "harbour ships",
          "mountain trails", "solar panels", "football cup", "museum paintings", "train delays", "hospital beds"]  # fmt: skip
GROUNDED = "retrieval=2,sts=1,short_short=1,long_long=1,classification=1"


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, topic in enumerate(TOPICS):
        text = (f"Report {i} covers {topic} in the town of Place{i}. Officials said the {topic} changed a lot this "
                f"year, with {i + 3} new plans announced. Residents of Place{i} welcomed the news about {topic} "
                "and asked for more meetings.")  # fmt: skip
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder


def grounded_config(server, tmp_path: Path, **overrides) -> GenerationConfig:
    settings = dict(
        model=server.model, base_url=server.base_url, num_examples=30, cache=str(tmp_path / "cache.sqlite"),
        concurrency=4, request_timeout=0.5, retry_base_delay=0.01, show_progress=False, languages="English",
        kinds=GROUNDED, corpus=str(write_corpus(tmp_path / "corpus")), passage_tokens=24, min_tokens=8,
        block_size=8,
    )  # fmt: skip
    settings.update(overrides)
    return GenerationConfig(**settings)


def rows(dataset) -> dict[str, list[dict]]:
    return {split: list(data) for split, data in dataset.items()}


def example_prompts(server) -> list[str]:
    """The last user message of every example request the server received (brainstorms left out)."""
    return [
        body["messages"][-1]["content"]
        for body in server.received
        if "Passage: " in body["messages"][-1]["content"]
    ]


def test_each_prompt_carries_its_passage_and_the_passage_is_its_side(fake_server, tmp_path):
    server = fake_server(bad_answer_rate=0.2)
    builder = SyntheticDatasetBuilder(grounded_config(server, tmp_path))
    builder.build()
    data = builder.examples
    passages = builder.corpus.passages
    prompts = example_prompts(server)
    assert prompts and all(any(prompt.endswith(f"Passage: {p}") for p in passages) for prompt in prompts)
    # The demonstrations travel as earlier turns, the system rule first.
    body = next(b for b in server.received if "Passage: " in b["messages"][-1]["content"])
    assert [m["role"] for m in body["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    plans = {plan.index: plan for plan in builder.shard_plans()}
    assert set(data) == {"retrieval", "sts", "short_short", "long_long", "classification"}
    for kind, split in data.items():
        side = "query" if TASK_KINDS[kind].passage_first else "positive"
        assert set(split[side]) <= set(passages), kind
    # Retrieval's kept positive is exactly the passage drawn for its example.
    retrieval = sorted(i for i, p in plans.items() if p.kind == "retrieval")
    assert data["retrieval"]["positive"] == [passages[plans[i].passage] for i in retrieval]
    assert data["retrieval"].column_names == ["instruction", "query", "positive", "language", "template"]
    assert data["sts"].column_names == [
        "instruction",
        "query",
        "positive",
        "negative",
        "language",
        "template",
    ]
    # Provenance: the grounded prompt each row came from (v2 keeps v1's grounded prompts).
    assert set(data["sts"]["template"]) == {"v1/grounded_sts"}
    for row in data["classification"]:  # labels come from the brainstormed label set of the task
        assert {row["positive"], row["negative"]} <= set(label_set(row["instruction"]))
    report = builder.report
    assert report["complete"] and report["num_examples_kept"] == 30
    assert report["corpus"]["sources"] == [str(tmp_path / "corpus")]
    assert report["corpus"]["documents"] == {str(tmp_path / "corpus"): len(TOPICS)}
    used = {plans[i].passage for i in plans}
    assert report["corpus"]["passages_used"] == len(used)
    assert sum(report["corpus"]["passages_used_by_source"].values()) == len(used)


def test_same_seed_same_passages_and_prompts_other_seed_others(fake_server, tmp_path):
    server = fake_server()
    first = SyntheticDatasetBuilder(grounded_config(server, tmp_path, cache=str(tmp_path / "a.sqlite")))
    data = first.build()
    prompts = sorted(example_prompts(server))
    server.received.clear()
    second = SyntheticDatasetBuilder(grounded_config(server, tmp_path, cache=str(tmp_path / "b.sqlite")))
    assert rows(second.build()) == rows(data)
    assert sorted(example_prompts(server)) == prompts
    other = SyntheticDatasetBuilder(
        grounded_config(server, tmp_path, seed=7, cache=str(tmp_path / "c.sqlite"))
    )
    assert [p.passage for p in other.shard_plans()] != [p.passage for p in first.shard_plans()]


def test_union_of_shards_is_the_single_run(fake_server, tmp_path):
    server = fake_server(bad_answer_rate=0.2)
    single = SyntheticDatasetBuilder(grounded_config(server, tmp_path)).build()
    union: dict[str, list] = {}
    for index in range(3):
        config = grounded_config(server, tmp_path, num_shards=3, shard_index=index,
                                 cache=str(tmp_path / f"shard{index}.sqlite"))  # fmt: skip
        for split, data in SyntheticDatasetBuilder(config).build().items():
            union.setdefault(split, []).extend(data)
    for split, data in single.items():
        assert sorted(union[split], key=json.dumps) == sorted(data, key=json.dumps)
        assert len(union[split]) == data.num_rows


def test_cached_rerun_sends_zero_requests(fake_server, tmp_path):
    server = fake_server(bad_answer_rate=0.2)
    data = SyntheticDatasetBuilder(grounded_config(server, tmp_path)).build()
    sent = server.chat_requests
    again = SyntheticDatasetBuilder(grounded_config(server, tmp_path))
    assert rows(again.build()) == rows(data)
    assert server.chat_requests == sent and again.report["requests_sent"] == 0


def cli(server, out: Path, cache: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "st_synth.cli", "generate", "--output", str(out), "--model", server.model,
        "--base-url", server.base_url, "--cache", str(cache), "--num-examples", "40", "--seed", "5",
        "--no-progress", "--corpus", str(corpus), "--passage-tokens", "24", "--min_tokens", "8",
        "--languages", "English", "--kinds", GROUNDED, *extra,
    ]  # fmt: skip


def test_sigkill_and_resume_gives_the_uninterrupted_dataset(fake_server, tmp_path):
    server = fake_server(latency=0.03, bad_answer_rate=0.15)
    corpus = write_corpus(tmp_path / "corpus")
    env = {**os.environ, "OPENAI_API_KEY": ""}
    reference = subprocess.run(cli(server, tmp_path / "ref", tmp_path / "ref.sqlite", corpus), env=env,
                               capture_output=True, text=True)  # fmt: skip
    assert reference.returncode == 0, reference.stderr
    cache = tmp_path / "killed.sqlite"
    resumed = kill_and_resume(
        cli(server, tmp_path / "out", cache, corpus, "--concurrency", "4"), cache, env, tmp_path / "out"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert rows(load_from_disk(str(tmp_path / "out"))) == rows(load_from_disk(str(tmp_path / "ref")))
    report = json.loads((tmp_path / "out" / "generation_report.json").read_text())
    assert report["corpus"]["passage_tokens"] == 24 and report["num_examples_kept"] == 40


def test_bad_grounded_settings_fail_before_any_request(fake_server, tmp_path):
    server = fake_server()
    with pytest.raises(ValueError, match=r"Kinds bitext cannot be grounded.*choose among: retrieval, "
                       r"classification, short_short, long_long, sts"):  # fmt: skip
        grounded_config(server, tmp_path, kinds="retrieval,bitext", languages="English,German")
    with pytest.raises(ValueError, match="name that one language"):
        grounded_config(server, tmp_path, languages="English,German")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "some text here", "id": 1}) + "\n")
    with pytest.raises(ValueError, match="has no text column 'text'; it has: body, id"):
        SyntheticDatasetBuilder(grounded_config(server, tmp_path, corpus=str(tmp_path / "c.jsonl")))
    (tmp_path / "empty.csv").write_text("text\n\n")
    with pytest.raises(ValueError, match="is empty"):
        SyntheticDatasetBuilder(grounded_config(server, tmp_path, corpus=str(tmp_path / "empty.csv")))
    assert server.chat_requests == 0 and server.model_listings == 0


def test_answers_copied_from_the_passage_or_a_demonstration_are_dropped():
    passage = ("The council approved a plan to turn the old depot on Harbour Street into flats, with work "
               "starting in March and tenants moving in next year.")  # fmt: skip
    retrieval = TASK_KINDS["retrieval"]
    texts, _ = parse_answer(
        '{"user_query": "when do tenants move into the Harbour Street flats"}', retrieval, passage
    )
    assert texts == ("when do tenants move into the Harbour Street flats", passage)
    copied = json.dumps({"user_query": "turn the old depot on Harbour Street into flats, with work starting"})
    assert copied_share(json.loads(copied)["user_query"], passage) >= 0.5
    with pytest.raises(Rejected, match="copied_from_passage"):
        parse_answer(copied, retrieval, passage)
    demo = load_spec("retrieval")["demonstrations"][0]["answer"]["user_query"]
    with pytest.raises(Rejected, match="copied_demonstration"):
        parse_answer(json.dumps({"user_query": demo.upper()}), retrieval, passage)
    task = "Classify a news story by its topic: politics, business, sport"
    classification = TASK_KINDS["classification"]
    texts, _ = parse_answer(
        '{"label": "Politics", "misleading_label": "business"}', classification, passage, task
    )
    assert texts == (passage, "Politics", "business")
    with pytest.raises(Rejected, match="label_not_in_task"):
        parse_answer('{"label": "housing", "misleading_label": "business"}', classification, passage, task)
    sts = TASK_KINDS["sts"]
    with pytest.raises(Rejected, match="texts_not_distinct"):
        parse_answer(
            '{"paraphrase": "A plan was approved.", "near_miss": "a plan was approved"}', sts, passage
        )


def test_round_trip_filter_keeps_queries_that_find_their_own_passage(tmp_path):
    passages = [
        f"Report about {topic}: the {topic} of the town changed this year, officials said."
        for topic in TOPICS
    ]
    # The third query was written about another passage (bakery bread), not its own (school buses).
    queries = ["what changed with the river floods", "news about library books", "fresh bakery bread in town"]
    data = DatasetDict({"retrieval": Dataset.from_dict({
        "instruction": ["Find reports."] * 3, "query": queries,
        "positive": [passages[0], passages[1], passages[2]], "language": ["English"] * 3})})  # fmt: skip
    kept, report = ConsistencyFilter(round_trip_top_k=2).apply(data, passages=passages)
    assert kept["retrieval"]["query"] == queries[:2]
    assert report["kinds"]["retrieval"]["round_trip"] is True
    assert report["kinds"]["retrieval"]["drops"]["passage_not_found"] == 1
    # A folder written by a grounded run is filtered against its own corpus, reloaded from its report.
    (tmp_path / "corpus").mkdir()
    for i, passage in enumerate(passages):
        (tmp_path / "corpus" / f"{i}.txt").write_text(passage)
    data.save_to_disk(str(tmp_path / "generated"))
    settings = {"sources": [str(tmp_path / "corpus")], "text_column": "text", "passage_tokens": 64,
                "min_tokens": 4, "passage_tokenizer": "all-MiniLM-L6-v2"}  # fmt: skip
    (tmp_path / "generated" / "generation_report.json").write_text(json.dumps({"corpus": settings}))
    report = filter_folder(
        tmp_path / "generated", tmp_path / "filtered", ConsistencyFilter(round_trip_top_k=2)
    )
    assert report["kinds"]["retrieval"]["kept"] == 2 and report["kinds"]["retrieval"]["round_trip"]
    assert isinstance(Corpus, type)


RETELL = "retrieval=1,short_short=1,long_long=2"


def test_retellings_in_prose_beside_free_kinds_in_one_run(fake_server, tmp_path):
    """grounded_kinds: only long_long reads a passage, in its prose prompt (grounded_prompts); the other kinds
    are the free generation of a run without a corpus, in the same dataset."""
    server = fake_server(bad_answer_rate=0.2)
    config = grounded_config(server, tmp_path, kinds=RETELL, grounded_kinds="long_long",
                             grounded_prompts="long_long=retelling")  # fmt: skip
    builder = SyntheticDatasetBuilder(config)
    builder.build()
    data = builder.examples
    passages = builder.corpus.passages
    plans = {plan.index: plan for plan in builder.shard_plans()}
    assert {p.kind for p in plans.values() if p.passage is not None} == {"long_long"}
    assert all(p.passage is None for p in plans.values() if p.kind != "long_long")
    prose = [b for b in server.received if "Retell this text" in b["messages"][-1]["content"]]
    assert prose and all("response_format" not in b for b in prose)  # prose: no response format asked
    assert all(b["temperature"] == 0.7 and b["max_tokens"] == 80 for b in prose)  # the prompt's own
    assert all([m["role"] for m in b["messages"]] == ["user"] for b in prose)
    assert all(any(f"\n\n{p}\n\n" in b["messages"][-1]["content"] for p in passages) for b in prose)
    free = [b for b in server.received if "Retell this text" not in b["messages"][-1]["content"]]
    assert free and all(b["response_format"]["type"] == "json_schema" for b in free)
    assert not any(p in b["messages"][-1]["content"] for b in free for p in passages)
    # The retelling is the query, its passage the positive; a retelling cut by the token cap keeps its
    # complete sentences.
    long_long = data["long_long"]
    assert long_long.column_names == ["instruction", "query", "positive", "language", "template"]
    indices = sorted(i for i, p in plans.items() if p.kind == "long_long")
    assert long_long["positive"] == [passages[plans[i].passage] for i in indices]
    assert all(q.startswith("In short, ") and q.endswith(".") and "tow" not in q for q in long_long["query"])
    assert set(long_long["template"]) == {"v1/grounded_long_long-retelling"}
    assert set(long_long["instruction"]) == {"Retrieve semantically similar text."}
    assert data["retrieval"].column_names[:4] == ["instruction", "query", "positive", "negative"]
    assert not set(data["retrieval"]["positive"]) & set(passages)
    report = builder.report
    assert report["complete"] and report["num_examples_kept"] == 30
    assert report["corpus"]["grounded_kinds"] == ["long_long"]
    assert report["corpus"]["grounded_prompts"] == {"long_long": "retelling"}
    assert report["corpus"]["passages_used_by_kind"] == {
        "long_long": len({plans[i].passage for i in indices})
    }
    # Same seed, same run: a cached re-run sends nothing.
    sent = server.chat_requests
    again = SyntheticDatasetBuilder(grounded_config(server, tmp_path, kinds=RETELL, grounded_kinds="long_long",
                                                    grounded_prompts="long_long=retelling"))  # fmt: skip
    again.build()
    assert rows(again.examples) == rows(data)
    assert server.chat_requests == sent and again.report["requests_sent"] == 0


def test_a_truncated_retelling_keeps_its_sentences_and_a_short_one_is_dropped(fake_server, tmp_path):
    server = fake_server()
    server.faults.extend(["truncated", "malformed"])  # the first two answers: cut, then a one-word reply
    config = grounded_config(server, tmp_path, kinds="long_long", grounded_prompts="long_long=retelling",
                             num_examples=2, concurrency=1)  # fmt: skip
    builder = SyntheticDatasetBuilder(config)
    builder.build()
    data = builder.examples
    assert server.fault_log[:2] == ["truncated", "malformed"]
    first = data["long_long"]["query"][0]
    assert first.startswith("In short, ") and first.endswith(".") and "Then the tow" not in first
    assert builder.report["drops"] == {"too_short": 1} and data["long_long"].num_rows == 2
    assert whole_sentences("One. Two words! And a cut sen") == "One. Two words!"
    assert whole_sentences("no sentence end here") == ""
    with pytest.raises(Rejected, match="too_short"):
        parse_answer("Sure.", TASK_KINDS["long_long"], "A passage of text.", variant="retelling")
    texts, _ = parse_answer('"The passage, retold in fifteen words or more so that it is long enough to be kept here."',
                            TASK_KINDS["long_long"], "A passage of text.", variant="retelling")  # fmt: skip
    assert texts[0].startswith("The passage, retold") and texts[1] == "A passage of text."


def test_one_sentence_summaries_as_queries_beside_retellings(fake_server, tmp_path):
    """Two grounded targets in one run, each its own split (one task per batch): retellings (long_long) and
    one-sentence summaries of the passage as short queries (short_short's ``summary`` prompt, in prose)."""
    server = fake_server()
    config = grounded_config(server, tmp_path, kinds="short_short=1,long_long=1",
                             grounded_kinds="long_long,short_short",
                             grounded_prompts={"long_long": "retelling", "short_short": "summary"})  # fmt: skip
    builder = SyntheticDatasetBuilder(config)
    builder.build()
    data, passages = builder.examples, builder.corpus.passages
    assert prompt_variants("short_short") == ["summary"]
    asked = [b for b in server.received if "In one short sentence" in b["messages"][-1]["content"]]
    assert asked and all("response_format" not in b for b in asked)
    assert all(b["temperature"] == 0.7 and b["max_tokens"] == 40 for b in asked)
    summaries = data["short_short"]
    assert set(summaries["template"]) == {"v1/grounded_short_short-summary"}
    assert set(summaries["instruction"]) == {"Given a one-sentence summary, retrieve the passage it sums up."}
    assert set(summaries["positive"]) <= set(passages) and not set(summaries["query"]) & set(passages)
    assert set(data["long_long"]["template"]) == {"v1/grounded_long_long-retelling"}
    assert builder.report["corpus"]["grounded_prompts"] == {
        "long_long": "retelling",
        "short_short": "summary",
    }


def test_bad_grounded_kinds_and_prompts_name_the_choices(fake_server, tmp_path):
    server = fake_server()
    with pytest.raises(
        ValueError, match=r"no grounded prompt 'recap' for long_long; choose among: retelling"
    ):
        grounded_config(server, tmp_path, grounded_prompts="long_long=recap")
    with pytest.raises(ValueError, match=r"grounded_prompts names 'long_long', which is not a grounded kind"):
        grounded_config(
            server, tmp_path, grounded_kinds="retrieval", grounded_prompts={"long_long": "retelling"}
        )
    with pytest.raises(
        ValueError, match=r"grounded_kinds names sts, not among the run's kinds \(retrieval\)"
    ):
        grounded_config(server, tmp_path, kinds="retrieval", grounded_kinds="sts")
    with pytest.raises(ValueError, match="must be kind=prompt pairs"):
        grounded_config(server, tmp_path, grounded_prompts="long_long")
    with pytest.raises(ValueError, match="give --corpus too"):
        grounded_config(server, tmp_path, corpus=None, grounded_kinds="retrieval")
    with pytest.raises(ValueError, match=r"Kinds bitext cannot be grounded"):
        grounded_config(
            server, tmp_path, kinds="retrieval,bitext", languages="English", grounded_kinds="bitext"
        )
    assert server.chat_requests == 0


def test_only_grounded_kinds_get_the_round_trip_and_the_corpus_negatives(tmp_path):
    """A dataset with long_long grounded and short_short free: the filter's round trip and the corpus's
    negatives are for long_long; short_short gets the ordinary check and negatives from its own positives."""
    from st_synth.data.mining import MiningArguments, mine_folder

    passages = [
        f"Report about {topic}: the {topic} of the town changed this year, officials said."
        for topic in TOPICS
    ]
    (tmp_path / "corpus").mkdir()
    for i, passage in enumerate(passages):
        (tmp_path / "corpus" / f"{i}.txt").write_text(passage)
    n = 6
    provenance = {"instruction": ["Find it."] * n, "language": ["English"] * n, "template": ["t"] * n}
    data = DatasetDict({
        "long_long": Dataset.from_dict({"query": [f"In the town, officials say the {t} changed this year." for t in TOPICS[:n]],
                                        "positive": passages[:n], **provenance}),
        "short_short": Dataset.from_dict({"query": [f"{t} news" for t in TOPICS[:n]],
                                          "positive": [f"A headline on {t} today" for t in TOPICS[:n]], **provenance}),
    })  # fmt: skip
    data.save_to_disk(str(tmp_path / "generated"))
    settings = {"sources": [str(tmp_path / "corpus")], "text_column": "text", "passage_tokens": 64,
                "min_tokens": 4, "passage_tokenizer": "all-MiniLM-L6-v2", "grounded_kinds": ["long_long"]}  # fmt: skip
    (tmp_path / "generated" / "generation_report.json").write_text(json.dumps({"corpus": settings}))
    report = filter_folder(
        tmp_path / "generated", tmp_path / "filtered", ConsistencyFilter(round_trip_top_k=3)
    )
    assert report["kinds"]["long_long"]["round_trip"] is True
    assert report["kinds"]["short_short"]["round_trip"] is False and report["kinds"]["short_short"]["checked"]
    mined = mine_folder(tmp_path / "filtered", tmp_path / "mined",
                        MiningArguments(range_max=6, relative_margin=None, candidates=3))  # fmt: skip
    assert mined["free_kinds_from_own_positives"] == ["short_short"]
    out = load_from_disk(str(tmp_path / "mined"))
    assert out["long_long"].num_rows and out["short_short"].num_rows
    for row in out["long_long"]:
        assert row["negative"] in passages and row["negative"] != row["positive"]
    own = set(data["short_short"]["positive"])
    for row in out["short_short"]:
        assert row["negative"] in own and row["negative"] != row["positive"]
    # splits: only the retellings get a negative; the titles stay pairs.
    only = mine_folder(tmp_path / "filtered", tmp_path / "only", MiningArguments(range_max=6, relative_margin=None,
                       candidates=3, splits="long_long"))  # fmt: skip
    assert set(only["splits"]) == {"long_long"} and "free_kinds_from_own_positives" not in only
    out = load_from_disk(str(tmp_path / "only"))
    assert "negative" in out["long_long"].column_names and "negative" not in out["short_short"].column_names


@pytest.mark.parametrize("limit", [1, 3, 12, 40])
def test_ranking_in_blocks_decides_as_the_whole_score_matrix(limit):
    """rank_of_own, block by block, against the rule it replaces (every score at once): the same own scores
    and the same count of candidates that beat each row's own, up to the limit, with ties (duplicated
    candidates, a row whose own candidate is duplicated) and blocks that split rows and candidates unevenly."""
    import numpy as np

    from st_synth.data.guide import rank_of_own

    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(30, 8)).astype(np.float32)
    candidates[7] = candidates[3]  # an exact tie with another candidate
    queries = (candidates[rng.integers(0, 30, 25)] + rng.normal(scale=0.8, size=(25, 8))).astype(np.float32)
    own = rng.integers(0, 30, 25)
    own[0] = 3  # its duplicate, 7, ties with it: a tie does not beat the own candidate
    scores = queries @ candidates.T
    expected_own = scores[np.arange(25), own]
    expected = np.minimum((scores > expected_own[:, None]).sum(axis=1), limit)
    for rows, block in [(1024, 8192), (7, 5), (1, 1), (25, 30)]:
        got_own, beaten = rank_of_own(queries, candidates, own, limit, rows=rows, block=block)
        np.testing.assert_allclose(got_own, expected_own, rtol=1e-6)
        assert beaten.tolist() == expected.tolist()
    assert 0 < (expected < limit).sum() < 25 or limit >= 30  # the case decides some rows each way


def test_the_filter_decides_the_same_in_small_blocks(monkeypatch):
    """The consistency filter's kept rows and drop reasons do not depend on the block sizes of its ranking."""
    import st_synth.data.filtering as filtering
    from st_synth.data.guide import rank_of_own

    passages = [f"Report about {t}: the {t} of the town changed this year, officials said." for t in TOPICS]
    queries = [f"what happened to the {t}" for t in TOPICS] + ["fresh bakery bread", "ships in the harbour"]
    positives = [*passages, passages[0], passages[1]]
    data = DatasetDict({"retrieval": Dataset.from_dict({
        "instruction": ["Find reports."] * 14, "query": queries, "positive": positives,
        "language": ["English"] * 14})})  # fmt: skip
    whole = ConsistencyFilter(round_trip_top_k=2, top_k=2)
    kept, report = whole.apply(data, passages=passages)
    free_kept, free_report = whole.apply(data)
    monkeypatch.setattr(filtering, "rank_of_own", lambda *a, **kw: rank_of_own(*a, **kw, rows=3, block=2))
    again, again_report = whole.apply(data, passages=passages)
    free_again, free_again_report = whole.apply(data)
    assert again["retrieval"]["query"] == kept["retrieval"]["query"] and again_report == report
    assert (
        free_again["retrieval"]["query"] == free_kept["retrieval"]["query"]
        and free_again_report == free_report
    )
    assert report["kinds"]["retrieval"]["drops"]["passage_not_found"] >= 2  # the two mismatched queries


def test_easy_and_hard_fractions_drop_the_pairs_the_guide_finds_most_and_least_alike():
    """easy_fraction (NeMo Curator's EasinessFilter): of the rows the filter keeps, the given share with the
    highest guide similarity of query and positive is dropped as too_easy; hard_fraction the share with the
    lowest, as least_alike."""
    import numpy as np

    passages = [f"Report about {t}: the {t} of the town changed this year, officials said." for t in TOPICS]
    # Half the queries repeat their passage's words (easy), half only hint at it (harder).
    queries = [f"report about {t}, the {t} of the town changed" if i % 2 else f"what is new with the {t}"
               for i, t in enumerate(TOPICS)]  # fmt: skip
    data = DatasetDict({"retrieval": Dataset.from_dict({
        "instruction": ["Find reports."] * len(TOPICS), "query": queries, "positive": passages,
        "language": ["English"] * len(TOPICS)})})  # fmt: skip
    plain = ConsistencyFilter(top_k=len(TOPICS))
    kept, report = plain.apply(data)
    assert (
        kept["retrieval"].num_rows == len(TOPICS) and "too_easy" not in report["kinds"]["retrieval"]["drops"]
    )
    guide = plain.load_guide()
    similarity = (guide.encode(queries, normalize_embeddings=True)
                  * guide.encode(passages, normalize_embeddings=True)).sum(axis=1)  # fmt: skip
    harder, report = ConsistencyFilter(top_k=len(TOPICS), easy_fraction=0.5).apply(data, guide=guide)
    expected = sorted(np.argsort(-similarity, kind="stable")[len(TOPICS) // 2 :].tolist())
    assert harder["retrieval"]["query"] == [queries[i] for i in expected]
    assert report["kinds"]["retrieval"]["drops"]["too_easy"] == len(TOPICS) // 2
    assert sum(i % 2 for i in expected) <= 1  # the copied-words queries are the ones that went
    # hard_fraction: the least alike go instead (and both at once, each a share of the kept rows).
    closer, report = ConsistencyFilter(top_k=len(TOPICS), hard_fraction=0.25).apply(data, guide=guide)
    expected = sorted(np.argsort(-similarity, kind="stable")[: len(TOPICS) - 3].tolist())
    assert closer["retrieval"]["query"] == [queries[i] for i in expected]
    assert report["kinds"]["retrieval"]["drops"]["least_alike"] == 3
    middle, report = ConsistencyFilter(top_k=len(TOPICS), easy_fraction=0.25, hard_fraction=0.25).apply(
        data, guide=guide
    )
    expected = sorted(np.argsort(-similarity, kind="stable")[3 : len(TOPICS) - 3].tolist())
    assert middle["retrieval"]["query"] == [queries[i] for i in expected]
    assert (
        report["kinds"]["retrieval"]["drops"]["too_easy"],
        report["kinds"]["retrieval"]["drops"]["least_alike"],
    ) == (3, 3)
    for name in ("easy_fraction", "hard_fraction"):
        for wrong in (1.0, -0.1):
            with pytest.raises(ValueError, match=f"{name} must be from 0 up to 1"):
                ConsistencyFilter(**{name: wrong})
    with pytest.raises(ValueError, match="easy_fraction \\+ hard_fraction must be below 1"):
        ConsistencyFilter(easy_fraction=0.5, hard_fraction=0.5)


def test_beyond_the_candidate_pool_rows_are_ranked_within_seeded_groups():
    """candidate_pool: with more distinct positives than the pool, each row is ranked among the positives of its
    own seeded group of rows (the filter as strict, its time linear, at any size); at or under the pool, the
    rule is unchanged."""
    import numpy as np

    from st_synth.data.guide import rank_of_own

    rng = np.random.default_rng(1)
    candidates = rng.normal(size=(40, 8)).astype(np.float32)
    q = (candidates + rng.normal(scale=1.5, size=(40, 8))).astype(np.float32)
    own_index = np.arange(40)
    grouped = ConsistencyFilter(top_k=2, candidate_pool=8)
    own, rank = grouped._rank_in_groups(q, candidates, own_index, 2)
    order = np.random.default_rng(0).permutation(40)
    for start in range(0, 40, 8):
        group = order[start : start + 8]
        scores = q[group] @ candidates[group].T
        mine = scores[np.arange(8), np.arange(8)]
        assert rank[group].tolist() == np.minimum((scores > mine[:, None]).sum(axis=1), 2).tolist()
    whole_own, whole_rank = rank_of_own(q, candidates, own_index, 2)
    assert (rank <= whole_rank).all() and (rank < whole_rank).any()  # fewer rivals in a group of 8
    np.testing.assert_allclose(own, whole_own, rtol=1e-6)
    with pytest.raises(ValueError, match="candidate_pool must be larger than top_k"):
        ConsistencyFilter(top_k=3, candidate_pool=3)
