"""Corpora as passages, hard negatives mined over them, and decontamination against evaluation texts."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict, load_from_disk

from st_synth.data.corpus import Corpus, CorpusArguments, _tokenizer, load_documents, split_passages
from st_synth.data.mining import MiningArguments, mine_negatives
from st_synth.evaluation.decontamination import Decontaminator, evaluation_texts

DOCS = [
    "The river flooded the town after three days of rain. Residents moved to higher ground.",
    "A new library opened downtown with ten thousand books. Children can borrow five at a time.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer("all-MiniLM-L6-v2")


def test_every_corpus_format_loads_the_same_documents(tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(DOCS[0])
    (folder / "sub" / "b.md").write_text(DOCS[1])
    (folder / "ignored.json").write_text("{}")
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS))
    )
    (tmp_path / "c.csv").write_text("id,body\n" + "".join(f'{i},"{d}"\n' for i, d in enumerate(DOCS)))
    Dataset.from_dict({"body": DOCS}).to_parquet(str(tmp_path / "c.parquet"))
    DatasetDict({"train": Dataset.from_dict({"body": DOCS})}).save_to_disk(str(tmp_path / "saved"))
    assert load_documents(str(folder)) == DOCS
    for source in ("c.jsonl", "c.csv", "c.parquet", "saved"):
        assert load_documents(str(tmp_path / source), text_column="body") == DOCS, source
    news = load_documents("builtin:lee-background")
    assert len(news) == 300 and all(news)


def test_bad_corpora_fail_before_any_request_naming_what_they_hold(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(ValueError, match="has no text column 'text'; it has: body, id"):
        load_documents(str(tmp_path / "c.jsonl"))
    (tmp_path / "empty.csv").write_text("text\n\n")
    with pytest.raises(ValueError, match="is empty"):
        load_documents(str(tmp_path / "empty.csv"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"holds no \.txt or \.md files"):
        load_documents(str(tmp_path / "nothing"))
    with pytest.raises(
        ValueError,
        match=r"Unknown builtin source of documents 'lee'.*Choose one of: lee-background, wikipedia",
    ):
        load_documents("builtin:lee")
    with pytest.raises(
        ValueError, match=r"builtin source of documents 'wikipedia-section-pairs'.*Choose one of"
    ):
        load_documents("builtin:wikipedia-section-pairs")  # pairs are no corpus
    (tmp_path / "c.xml").write_text("<x/>")
    with pytest.raises(ValueError, match="unknown format"):
        load_documents(str(tmp_path / "c.xml"))


def test_passages_respect_the_token_limit_and_are_kept_once(tokenizer):
    long = " ".join(f"Sentence number {i} talks about rivers and towns." for i in range(40))
    passages = split_passages([long, long.upper(), DOCS[0]], tokenizer, passage_tokens=32, min_tokens=4)
    sizes = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in passages]
    assert max(sizes) <= 32 and len(passages) > 5
    assert len({p.lower() for p in passages}) == len(passages)  # the upper-cased copy is a duplicate
    assert passages[-1] == DOCS[0]  # two short sentences fit in one passage
    unbroken = "word " * 100  # one sentence longer than the limit is cut at it
    pieces = split_passages([unbroken], tokenizer, passage_tokens=16)
    assert len(pieces) == 1 or all(
        len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= 16 for p in pieces
    )


def test_passage_draws_are_a_function_of_seed_and_index():
    corpus = Corpus.load(CorpusArguments(corpus="builtin:lee-background", passage_tokens=128))
    assert corpus.documents == {"builtin:lee-background": 300} and len(corpus.passages) > 300
    assert set(corpus.passage_sources) == {"builtin:lee-background"}
    draws = [corpus.draw(7, i) for i in range(50)]
    assert draws == [corpus.draw(7, i) for i in range(50)] and draws != [corpus.draw(8, i) for i in range(50)]
    with pytest.raises(ValueError, match="passage_tokens must be at least 8"):
        CorpusArguments(corpus="x", passage_tokens=4)


def test_mined_negatives_are_corpus_passages_never_the_positive():
    corpus = Corpus.load(CorpusArguments(corpus="builtin:lee-background", passage_tokens=96)).passages[:300]
    pairs = Dataset.from_dict({"query": [p.split(".")[0] for p in corpus[:40]], "positive": corpus[:40]})
    pairs = pairs.add_column("language", ["English"] * 40)  # other columns ride along
    triplets, report = mine_negatives(pairs, corpus, MiningArguments(candidates=3))
    assert report["rows"] == 40 and report["kept"] == triplets.num_rows > 30
    assert triplets.column_names == ["query", "positive", "negative", "language"]
    for row in triplets:
        assert row["negative"] in corpus and row["negative"] != row["positive"]
    # The near-copy ceiling is honoured: at 0.01 every candidate counts as a copy of the positive.
    none, report = mine_negatives(pairs, corpus, MiningArguments(candidates=2, max_positive_similarity=0.01))
    assert none.num_rows == 0 and report["near_copy_only"] + report["no_candidate"] == 40
    # A near-duplicate of a positive in the corpus is never its negative.
    copy = corpus[0].replace(".", " .")
    triplets, _ = mine_negatives(pairs.select([0]), [copy, *corpus], MiningArguments(relative_margin=None))
    assert triplets["negative"] != [copy]
    with pytest.raises(ValueError, match="range_min < range_max"):
        MiningArguments(range_min=5, range_max=5)


def test_decontamination_removes_planted_evaluation_texts():
    texts = evaluation_texts(["LeeDocSTS", "ChatterbotQARetrieval"])
    lee = texts[0]
    assert len(lee.split()) > 40
    question = next(t for t in texts if t.endswith("?"))
    words = lee.split()
    sources = DatasetDict({
        "clean": Dataset.from_dict({"query": ["how do rivers flood", "a new library"], "positive": DOCS}),
        "planted": Dataset.from_dict({
            "query": [f"  {lee.upper()} ", "unrelated query", question, "fine"],
            "positive": ["x", "Someone wrote: " + " ".join(words[5:20]) + " and more.", "y", "z"],
        }),
    })  # fmt: skip
    clean, report = Decontaminator(texts).apply(sources)
    assert clean["clean"].num_rows == 2 and clean["planted"]["query"] == ["fine"]
    assert report["sources"]["planted"] == {"rows": 4, "dropped": 3, "exact": 2, "ngram": 1}
    assert report["dropped"] == 3 and "13 words" in report["rule"]
    # A lone word that an evaluation set also holds is vocabulary, not a leak.
    word = Decontaminator(["Asia", "what is the capital of France"])
    assert word.why("asia") is None and word.why("What is the capital of France?") == "exact"


def test_training_sources_are_decontaminated_when_asked(tmp_path):
    from st_synth.training.arguments import DataArguments
    from st_synth.training.sources import load_sources

    lee = evaluation_texts(["LeeDocSTS"])[0]
    rows = {"instruction": ["Retrieve semantically similar text."] * 3, "query": [lee, "a cat sat", "rain fell"],
            "positive": ["x", "a cat was sitting", "it rained"], "negative": ["y", "a dog ran", "sun shone"],
            "language": ["English"] * 3}  # fmt: skip
    DatasetDict({"sts": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "synthetic"))
    Dataset.from_dict({"a": ["one", "two"], "b": [" ".join(lee.split()[:20]), "fine"]}).save_to_disk(
        str(tmp_path / "mine")
    )
    template = "Instruct: {instruction}\nQuery: "
    data = {"dataset": str(tmp_path / "synthetic"), "extra_datasets": [f"mine={tmp_path / 'mine'}|Find it."]}
    kept, _ = load_sources(DataArguments(**data), template)
    assert kept["sts"].num_rows == 3 and kept["mine"].num_rows == 2
    clean, report = load_sources(DataArguments(**data, decontaminate=["LeeDocSTS"]), template)
    assert clean["sts"]["positive"] == [
        "Instruct: Retrieve semantically similar text.\nQuery: a cat was sitting",
        "Instruct: Retrieve semantically similar text.\nQuery: it rained",
    ]
    assert clean["mine"]["query"] == ["Instruct: Find it.\nQuery: two"]
    counts = report["decontamination"]["sources"]
    assert counts["sts"] == {"rows": 3, "dropped": 1, "exact": 1, "ngram": 0}
    assert counts["mine"] == {"rows": 2, "dropped": 1, "exact": 0, "ngram": 1}


def test_st_synth_mine_gives_your_own_pairs_negatives(tmp_path, capsys):
    from st_synth.cli import main

    topics = ["river floods", "library books", "school buses", "city budget", "bakery bread", "harbour ships"]
    pairs = Dataset.from_dict({
        "query": [f"what happened with the {t}" for t in topics],
        "positive": [f"The {t} of the town changed a lot this year, officials said on Monday." for t in topics],
    })  # fmt: skip
    pairs.save_to_disk(str(tmp_path / "pairs"))
    assert main(["mine", "--input", str(tmp_path / "pairs"), "--output", str(tmp_path / "out"),
                 "--relative_margin", "0.5", "--range_max", "4", "--candidates", "2"]) == 0  # fmt: skip
    assert "negatives from the data's own positives (6 passages)" in capsys.readouterr().out
    mined = load_from_disk(str(tmp_path / "out"))["train"]
    assert mined.column_names == ["query", "positive", "negative"] and mined.num_rows > 0
    for row in mined:
        assert row["negative"] in pairs["positive"] and row["negative"] != row["positive"]
    report = json.loads((tmp_path / "out" / "mining_report.json").read_text())
    assert report["splits"]["train"]["rows"] == 6
    # From a corpus folder instead; a dataset without the columns is refused naming what it has.
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(
        " ".join(f"The {t} report was published today." for t in topics)
    )
    assert main(["mine", "--input", str(tmp_path / "pairs"), "--output", str(tmp_path / "out2"), "--corpus",
                 str(tmp_path / "corpus"), "--passage_tokens", "8", "--min_tokens", "4"]) == 0  # fmt: skip
    assert f"negatives from {tmp_path / 'corpus'} (6 passages): train 6/6" in capsys.readouterr().out
    assert (
        main(
            ["mine", "--input", str(tmp_path / "pairs"), "--output", str(tmp_path / "o"), "--range_max", "3"]
        )
        == 2
    )
    assert "candidates must be in 1..range_max - range_min (3), got 5" in capsys.readouterr().err
    Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "bad"))
    assert main(["mine", "--input", str(tmp_path / "bad"), "--output", str(tmp_path / "out3")]) == 2
    assert "no split with query and positive columns; it has: train: text" in capsys.readouterr().err


def test_filter_and_mining_share_one_encoding_of_the_corpus(tmp_path):

    from st_synth.data.guide import corpus_embeddings, load_guide

    model = load_guide("all-MiniLM-L6-v2")
    passages = [
        f"The {t} of the town changed a lot this year." for t in ("river", "library", "bakery", "harbour")
    ]
    encoded: list[int] = []
    encode_document = model.encode_document

    def counting(texts, **kwargs):
        encoded.append(len(texts))
        return encode_document(texts, **kwargs)

    model.encode_document = counting
    first = corpus_embeddings(model, passages, cache_folder=tmp_path)
    again = corpus_embeddings(model, passages, cache_folder=tmp_path)
    assert encoded == [4] and (first == again).all()
    pairs = Dataset.from_dict({"query": ["news about the river"], "positive": [passages[0]]})
    mined, _ = mine_negatives(pairs, passages, MiningArguments(range_max=3, candidates=2, relative_margin=None),
                              model=model, cache_folder=tmp_path)  # fmt: skip
    assert encoded == [4] and mined["negative"][0] in passages[1:]  # the corpus came from the shared file


def test_a_mined_negative_never_comes_from_the_positives_own_document(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(
        "The river flooded the town after three days of rain. The river flooded the town again in spring after rain."
    )
    (tmp_path / "docs" / "b.txt").write_text(
        "A new library opened downtown with ten thousand books for children."
    )
    corpus = Corpus.load(CorpusArguments(corpus=str(tmp_path / "docs"), passage_tokens=14, min_tokens=4))
    assert len(corpus.passages) == 3 and corpus.passage_documents == [0, 0, 1]
    pairs = Dataset.from_dict({"query": ["river flood in town"], "positive": [corpus.passages[0]]})
    settings = MiningArguments(range_max=2, candidates=2, relative_margin=None)
    anywhere, _ = mine_negatives(pairs, corpus.passages, settings)
    assert anywhere["negative"] == [corpus.passages[1]]  # the closest: the same document's other passage
    mined, report = mine_negatives(pairs, corpus.passages, settings, document_of=corpus.document_of())
    assert mined["negative"] == [corpus.passages[2]] and report["same_document_skipped"] == 1


def test_the_data_stage_takes_the_evaluation_texts_it_keeps_out(tmp_path):
    """``prepare_sources`` (st_synth.data) is given the texts to keep out; naming tasks without them is refused
    before anything is read, and given texts drop the same rows as ``load_sources``."""
    from st_synth.data.sources import DataArguments, prepare_sources

    rows = {"instruction": ["Find it."] * 2, "query": ["the evaluated sentence here", "a cat sat"],
            "positive": ["x y", "a cat was sitting"], "language": ["English"] * 2}  # fmt: skip
    DatasetDict({"sts": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "synthetic"))
    data = DataArguments(dataset=str(tmp_path / "synthetic"), decontaminate=["LeeDocSTS"])
    with pytest.raises(ValueError, match="no evaluation texts were given"):
        prepare_sources(data, "Instruct: {instruction}\nQuery: ")
    clean, report = prepare_sources(
        data, "Instruct: {instruction}\nQuery: ", ["The evaluated  sentence here."]
    )
    assert clean["sts"]["query"] == ["Instruct: Find it.\nQuery: a cat sat"]
    assert report["decontamination"]["sources"]["sts"]["dropped"] == 1


def test_mining_scores_queries_in_blocks_that_fit_the_budget(monkeypatch):
    """mine_hard_negatives holds (queries per block) x (corpus) scores at once: st-synth sizes the block so that
    a corpus of 1M passages stays at 256 MB (its default block would hold 64 GB), and the mined negatives do
    not depend on the block."""
    import st_synth.data.mining as mining

    assert mining.query_block(300) == 16384 and mining.query_block(1_000_000) == 67
    assert mining.query_block(1_000_000) * 1_000_000 * 4 <= 256 * 2**20 and mining.query_block(10**9) == 1
    corpus = Corpus.load(CorpusArguments(corpus="builtin:lee-background", passage_tokens=96)).passages[:200]
    pairs = Dataset.from_dict({"query": [p.split(".")[0] for p in corpus[:30]], "positive": corpus[:30]})
    whole, _ = mine_negatives(pairs, corpus, MiningArguments(candidates=2))
    monkeypatch.setattr(mining, "query_block", lambda passages: 4)
    blocks, _ = mine_negatives(pairs, corpus, MiningArguments(candidates=2))
    assert blocks.to_dict() == whole.to_dict() and whole.num_rows > 20


def test_corpus_embeddings_in_chunks_equal_one_call(monkeypatch, tmp_path):
    """A large corpus is encoded a chunk at a time into one array (no stacked copy beside the batches): the same
    embeddings as one encode call, and the same from the cache."""
    import numpy as np

    import st_synth.data.guide as guide

    model = guide.load_guide("all-MiniLM-L6-v2")
    passages = Corpus.load(CorpusArguments(corpus="builtin:lee-background", passage_tokens=64)).passages[:23]
    whole = model.encode_document(passages, normalize_embeddings=True, convert_to_numpy=True)
    monkeypatch.setattr(guide, "CORPUS_CHUNK", 5)
    chunked = guide.corpus_embeddings(model, passages, batch_size=4, cache_folder=tmp_path)
    assert chunked.shape == whole.shape and chunked.dtype == whole.dtype
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    np.testing.assert_array_equal(guide.corpus_embeddings(model, passages, cache_folder=tmp_path), chunked)
