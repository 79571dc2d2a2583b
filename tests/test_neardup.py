"""Near-duplicate removal: the MinHash rule, its LSH index against brute force, the builder's walk (lower
index wins, counted per kind, the same for any concurrency) and `st-synth dedup` over the union of shards."""

from __future__ import annotations

import json
import random

import pytest
from datasets import load_from_disk

from st_synth import GenerationConfig, SyntheticDatasetBuilder
from st_synth.cli import main
from st_synth.data.examples import load_examples
from st_synth.data.neardup import ExactKeys, NearDuplicateIndex, signature, similarity
from st_synth.testing.openai_server import REPEATED_TEXT

DOC = (
    "The Treaty of Westphalia, signed in 1648, ended the Thirty Years' War and established the principle of "
    "state sovereignty that shaped modern European diplomacy. Historians argue about how new it really was."
)
WORDS = (
    "river stone market winter garden signal letter engine harbor pencil orbit meadow valve quartz".split()
)


def test_the_rule_catches_small_edits_and_leaves_shared_frames_apart():
    query = "what ended the thirty years war"
    edited = DOC.replace("Historians argue", "Scholars debate")
    assert similarity(signature((query, DOC)), signature((query, edited))) >= 0.8
    assert similarity(signature((query, DOC)), signature((query.upper(), "  " + DOC))) == 1.0  # normalised
    unrelated = ("how do volcanoes form", "Magma rises through the crust when pressure builds up below.")
    assert similarity(signature((query, DOC)), signature(unrelated)) < 0.2
    # The fake server's answers share a frame ("user_query 0: ...") and nothing else: far below the threshold.
    framed = [signature((f"user_query 0: {a}", f"positive_document 1: {b}")) for a, b in
              [("onnima ltf eno rnhsmt", "eur fcrcsur otncds"), ("tacdew uio smre lcn", "hfoa nemu rcsdt")]]  # fmt: skip
    assert similarity(*framed) < 0.5


@pytest.mark.parametrize("buffer", [1024, 7])
def test_the_index_finds_what_brute_force_finds(buffer, monkeypatch, tmp_path):
    """Whether a candidate comes from the in-memory buffer or from the sorted array and the file on disk
    (a buffer of 7 merges every 7 entries), the answer is brute force's: the lowest-index signature at or
    above the threshold."""
    monkeypatch.setattr(NearDuplicateIndex, "BUFFER", buffer)
    rng = random.Random(0)
    texts = []
    for n in range(300):
        if n % 3 == 0 and texts:  # a repeat of an earlier text with one or two words changed
            words = rng.choice(texts).split()
            for _ in range(rng.randint(1, 2)):
                words[rng.randrange(len(words))] = rng.choice(WORDS)
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(40)))
    signatures = [signature((t,)) for t in texts]
    index = NearDuplicateIndex(0.8, tmp_path)
    found, expected = [], []
    for n, sig in enumerate(signatures):
        found.append(index.find(sig))
        index.add(sig, n)
        expected.append(next((m for m in range(n) if similarity(signatures[m], sig) >= 0.8), None))
    assert found == expected
    assert sum(f is not None for f in found) >= 50  # the repeats were found, not a lucky empty match
    assert len(index) == 300
    index.close()
    assert not list(tmp_path.iterdir())  # the signatures' file has no name: nothing is left behind


def test_exact_keys_are_a_set_of_digests():
    monkey = ExactKeys()
    monkey.MERGE = 5  # merged into the sorted array every 5 keys
    rng = random.Random(2)
    keys = [rng.randbytes(16) for _ in range(200)]
    reference: set[bytes] = set()
    for key in keys + keys[:50]:  # every key added once more
        assert (key in monkey) == (key in reference)
        monkey.add(key)
        reference.add(key)
        assert key in monkey and len(monkey) == len(reference)
    assert all(key in monkey for key in keys) and not any(rng.randbytes(16) in monkey for _ in range(200))


def test_bad_thresholds_are_named():
    with pytest.raises(
        ValueError, match=r"near_duplicate_threshold must be a Jaccard similarity from 0.8 to 1.0"
    ):
        GenerationConfig(model="m", base_url="http://127.0.0.1:1/v1", near_duplicate_threshold=0.5)
    GenerationConfig(
        model="m", base_url="http://127.0.0.1:1/v1", near_duplicate_threshold=0.5, near_duplicates=False
    )


def build(server, tmp_path, name: str, **settings):
    config = GenerationConfig(model=server.model, base_url=server.base_url, cache=str(tmp_path / f"{name}.sqlite"),
                              num_examples=80, seed=3, kinds="retrieval,sts", languages="English,German",
                              show_progress=False, **settings)  # fmt: skip
    builder = SyntheticDatasetBuilder(config)
    builder.build()
    return builder.examples, builder.report


def repeated_rows(dataset) -> dict[str, list[int]]:
    return {
        kind: [n for n, row in enumerate(data) if REPEATED_TEXT in row["query"]]
        for kind, data in dataset.items()
    }


def test_near_duplicates_are_asked_again_lower_index_wins_and_counted(fake_server, tmp_path):
    server = fake_server(bad_answer_rate=0.15, bad_answers=("near_duplicate",))
    dataset, report = build(server, tmp_path, "on", concurrency=16)
    assert report["complete"] and report["near_duplicate_threshold"] == 0.8
    near = report["near_duplicates_by_kind"]
    assert (
        near["retrieval"] >= 1
        and near["sts"] >= 1
        and report["drops"]["near_duplicate"] == sum(near.values())
    )
    # One example of each kind keeps the repeated text: no two rows of a kind are near-duplicates.
    assert {kind: len(rows) for kind, rows in repeated_rows(dataset).items()} == {"retrieval": 1, "sts": 1}
    for data in dataset.values():
        signatures = [signature((row["query"], row["positive"], row.get("negative") or "")) for row in data]
        assert all(similarity(a, b) < 0.8 for i, a in enumerate(signatures) for b in signatures[:i])
    # The example that keeps it is the lowest-index one that wrote it: the first such row of the run that
    # keeps near-duplicates.
    kept_all, report_off = build(server, tmp_path, "off", concurrency=16, near_duplicates=False)
    assert "near_duplicate" not in report_off["drops"] and report_off["near_duplicate_threshold"] is None
    for kind, rows in repeated_rows(kept_all).items():
        assert len(rows) > 1
        assert kept_all[kind][rows[0]] == dataset[kind][repeated_rows(dataset)[kind][0]]
    # Index order, not timing, decides: one request at a time gives the same dataset.
    serial, _ = build(server, tmp_path, "serial", concurrency=1)
    assert {k: list(v) for k, v in serial.items()} == {k: list(v) for k, v in dataset.items()}


def test_dedup_joins_shards_and_removes_repeats_across_them(fake_server, tmp_path, capsys):
    server = fake_server(bad_answer_rate=0.15, bad_answers=("near_duplicate",))
    folders = []
    for shard in (0, 1):
        folder = tmp_path / f"shard{shard}"
        code = main(["generate", "--model", server.model, "--base_url", server.base_url, "--output", str(folder),
                     "--cache", str(tmp_path / "cache.sqlite"), "--num_examples=200", "--kinds=retrieval,sts",
                     "--languages=English,German", "--num_shards=2", f"--shard_index={shard}",
                     "--no_show_progress"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        folders.append(str(folder))
    shards = [load_examples(f) for f in folders]
    # Each shard kept one row with the repeated text per kind; the union has two, and dedup keeps shard 0's.
    assert all(len(rows) == 1 for s in shards for rows in repeated_rows(s).values())
    capsys.readouterr()
    assert main(["dedup", *reversed(folders), "--output", str(tmp_path / "union")]) == 0
    out = capsys.readouterr().out
    union = load_examples(tmp_path / "union")
    report = json.loads((tmp_path / "union" / "dedup_report.json").read_text())
    assert [i["shard_index"] for i in report["inputs"]] == [0, 1]
    assert report["removed_by_kind"] == {"retrieval": {"duplicate": 0, "near_duplicate": 1},
                                         "sts": {"duplicate": 0, "near_duplicate": 1}}  # fmt: skip
    assert report["num_examples_kept"] == report["num_examples_in"] - 2 == sum(len(d) for d in union.values())
    assert "kept 198/200 examples of 2 shards" in out
    for kind in ("retrieval", "sts"):
        assert (
            union[kind][repeated_rows(union)[kind][0]] == shards[0][kind][repeated_rows(shards[0])[kind][0]]
        )
    # Exact repeats only: the near-duplicates stay.
    assert main(["dedup", *folders, "--output", str(tmp_path / "exact"), "--no_near_duplicates"]) == 0
    assert sum(len(d) for d in load_from_disk(str(tmp_path / "exact")).values()) == 200
    # Errors are named before anything is written.
    assert main(["dedup", folders[0], folders[0], "--output", str(tmp_path / "twice")]) == 2
    assert "Two folders are the same shard" in capsys.readouterr().err
    assert main(["dedup", str(tmp_path), "--output", str(tmp_path / "none")]) == 2
    assert "is not a saved DatasetDict" in capsys.readouterr().err
    assert main(["dedup", *folders, "--output", str(tmp_path / "bad"), "--near_duplicate_threshold=0.3"]) == 2
    assert "from 0.8 to 1.0" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_the_index_grows_past_its_first_allocation():
    rng = random.Random(1)
    index = NearDuplicateIndex(0.9)
    texts = [" ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(12)) for _ in range(2100)]
    for n, text in enumerate(texts):
        index.add(signature((text,)), n)
    assert len(index) == 2100
    assert [index.find(signature((texts[n],))) for n in (0, 1023, 1024, 2099)] == [0, 1023, 1024, 2099]


def test_dedup_judges_exact_repeats_as_the_generator_does(tmp_path):
    """`st-synth dedup` keys rows like the builder (kind + the validator's NFKC/casefold normalisation): a
    row that differs from an earlier one only in case folding or compatibility forms is a repeat."""
    from datasets import Dataset, DatasetDict

    from st_synth.common.names import REPORT_FILE
    from st_synth.common.text import normalize
    from st_synth.data.dedup import dedup_shards
    from st_synth.data.neardup import exact_key

    rows = [
        [("Wo liegt die Straße?", "Die Straße liegt im Norden der Stadt.")],
        [("WO LIEGT DIE STRASSE?", "Die Strasse liegt im Norden der Stadt."), ("ﬁnd it", "the ﬁle")],
    ]
    folders = []
    for shard, pairs in enumerate(rows):
        folder = tmp_path / f"shard{shard}"
        columns = {"instruction": ["i"] * len(pairs), "query": [q for q, _ in pairs],
                   "positive": [d for _, d in pairs], "language": ["German"] * len(pairs),
                   "template": ["t"] * len(pairs)}  # fmt: skip
        DatasetDict({"retrieval": Dataset.from_dict(columns)}).save_to_disk(str(folder))
        (folder / REPORT_FILE).write_text(json.dumps({"shard_index": shard}))
        folders.append(folder)
    assert exact_key("retrieval", [normalize(t) for t in rows[0][0]]) == exact_key(
        "retrieval", [normalize(t) for t in rows[1][0]]
    )
    data, report = dedup_shards(folders, near_duplicates=False)
    assert data["retrieval"]["query"] == ["Wo liegt die Straße?", "ﬁnd it"]
    assert report["removed_by_kind"]["retrieval"] == {"duplicate": 1, "near_duplicate": 0}
