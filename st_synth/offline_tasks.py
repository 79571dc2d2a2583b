"""mteb tasks built only from files that PyPI packages ship, so evaluation runs with no network.

* ``LeeDocSTS``: the 50 news documents of Lee et al. (2005) with human similarity judgements for every
  pair (1,225 pairs, scores 0-1), from gensim's test data (``pip install gensim --no-deps`` is enough).
* ``ChatterbotQARetrieval``: English questions from chatterbot-corpus, each to be matched with its reply
  among all the replies of the corpus.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

_INSTALL_HINT = "install the eval-data extra: pip install 'st-synth[eval-data]'"


def _package_folder(distribution: str, relative: str, what: str) -> Path:
    """A data folder inside an installed package, or a ValueError that says how to install it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"The offline {what} comes from the {distribution} package; {_INSTALL_HINT}."
        ) from None
    return Path(str(dist.locate_file(relative)))


def gensim_test_data() -> Path:
    return _package_folder("gensim", "gensim/test/test_data", "evaluation data")


def chatterbot_english() -> Path:
    return _package_folder("chatterbot-corpus", "chatterbot_corpus/data/english", "retrieval data")


def _metadata(**fields: Any) -> TaskMetadata:
    common = {
        "dataset": {"path": "st-synth/offline", "revision": "packaged"},
        "category": "t2t", "eval_splits": ["test"], "eval_langs": ["eng-Latn"], "dialect": [],
        "domains": ["News", "Written"], "task_subtypes": [], "license": "not specified",
        "annotations_creators": "human-annotated", "modalities": ["text"], "sample_creation": "found",
    }  # fmt: skip
    return TaskMetadata(**{**common, **fields})


class LeeDocSTS(AbsTaskSTS):
    metadata = _metadata(
        name="LeeDocSTS",
        type="STS",
        description="Lee et al. (2005): 50 news documents, human similarity for every pair, from gensim's test data.",
        reference="https://radimrehurek.com/gensim/",
        main_score="cosine_spearman",
        date=("2005-01-01", "2005-12-31"),
        bibtex_citation="@inproceedings{lee2005empirical, title={An empirical evaluation of models of text "
        "document similarity}, author={Lee, Michael D and Pincombe, Brandon and Welsh, Matthew}, "
        "booktitle={Proceedings of the Annual Meeting of the Cognitive Science Society}, year={2005}}",
    )
    min_score = 0
    max_score = 1

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        from datasets import Dataset, DatasetDict

        folder = gensim_test_data()
        documents = (folder / "lee.cor").read_text(encoding="utf-8", errors="replace").strip().split("\n")
        rows = [line.split() for line in (folder / "similarities0-1.txt").read_text().strip().split("\n")]
        if len(documents) != 50 or len(rows) != 50:
            raise ValueError(
                f"Unexpected Lee data in {folder}: {len(documents)} documents, {len(rows)} rows."
            )
        pairs = [(i, j) for i in range(50) for j in range(i + 1, 50)]
        self.dataset = DatasetDict({"test": Dataset.from_dict({
            "sentence1": [documents[i] for i, _ in pairs],
            "sentence2": [documents[j] for _, j in pairs],
            "score": [float(rows[i][j]) for i, j in pairs],
        })})  # fmt: skip
        self.data_loaded = True


class ChatterbotQARetrieval(AbsTaskRetrieval):
    metadata = _metadata(
        name="ChatterbotQARetrieval",
        type="Retrieval",
        description="English questions of chatterbot-corpus, each matched with its reply among all replies.",
        reference="https://github.com/gunthercox/chatterbot-corpus",
        main_score="ndcg_at_10",
        date=("2017-01-01", "2021-12-31"),
        bibtex_citation="",
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        import yaml
        from datasets import Dataset

        answers: dict[str, str] = {}  # reply text -> doc id (replies repeat across questions)
        queries: dict[str, str] = {}  # question text -> query id
        relevant: dict[str, dict[str, int]] = {}
        for path in sorted(chatterbot_english().glob("*.yml")):
            conversations = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(
                "conversations"
            ) or []
            for turns in conversations:
                if not isinstance(turns, list) or len(turns) < 2:
                    continue
                question, reply = (str(turn).strip() for turn in turns[:2])
                if not question or not reply or question in queries:
                    continue
                doc_id = answers.setdefault(reply, f"d{len(answers)}")
                queries[question] = f"q{len(queries)}"
                relevant[queries[question]] = {doc_id: 1}
        split = {
            "queries": Dataset.from_dict({"id": list(queries.values()), "text": list(queries)}),
            "corpus": Dataset.from_dict({"id": list(answers.values()), "text": list(answers),
                                         "title": [""] * len(answers)}),
            "relevant_docs": relevant,
            "top_ranked": None,
        }  # fmt: skip
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


OFFLINE_TASKS: dict[str, type] = {"LeeDocSTS": LeeDocSTS, "ChatterbotQARetrieval": ChatterbotQARetrieval}
