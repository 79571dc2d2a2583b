"""mteb tasks built only from files that PyPI packages ship, so evaluation runs with no network.

* ``LeeDocSTS``: the 50 news documents of Lee et al. (2005) with human similarity judgements for every
  pair (1,225 pairs, scores 0-1), from gensim's test data (``pip install gensim --no-deps`` is enough).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

_INSTALL_HINT = "install the eval-data extra: pip install 'st-synth[eval-data]'"


def gensim_test_data() -> Path:
    try:
        dist = importlib.metadata.distribution("gensim")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"The offline evaluation data comes from gensim's test files; {_INSTALL_HINT}."
        ) from None
    return Path(str(dist.locate_file("gensim/test/test_data")))


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


OFFLINE_TASKS: dict[str, type] = {"LeeDocSTS": LeeDocSTS}
