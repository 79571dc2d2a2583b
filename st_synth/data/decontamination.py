"""Decontamination: no training text may come from an evaluation set.

The rule (stated in docs/training.md): a training text is contaminated when, after :func:`st_synth.common.text.normalize`
(NFKC, case-folded, whitespace collapsed), it equals an evaluation text (texts of two words or more: a lone
word such as a heading "Asia" is vocabulary, not benchmark text), or when it shares a run of
``ngram`` consecutive words (13 by default, the span GPT-3's and Llama's contamination reports use) with any
evaluation text. Texts shorter than ``ngram`` words are matched exactly only. The evaluation texts come from
:func:`st_synth.evaluation.decontamination.evaluation_texts` (every string of the tasks to be run)::

    clean, report = Decontaminator(texts).apply(sources)   # DatasetDict -> DatasetDict, dropped per source
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from datasets import Dataset, DatasetDict

from st_synth.common.text import normalize
from st_synth.data.examples import TEXT_COLUMNS

logger = logging.getLogger(__name__)

DEFAULT_NGRAM = 13
# A lone word ("Alabama", "Asia": a Wikipedia heading and a newsgroup or chatterbot text) is vocabulary, not
# benchmark text: exact matches count from two words up.
MIN_EXACT_WORDS = 2


def _digest(words: list[str]) -> bytes:
    return hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest()


class Decontaminator:
    """Exact (normalised) and ``ngram``-word overlap checks against a set of evaluation texts."""

    def __init__(self, texts: Iterable[str], ngram: int = DEFAULT_NGRAM) -> None:
        if ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {ngram}")
        self.ngram = ngram
        self.exact: set[str] = set()
        self.grams: set[bytes] = set()  # fixed-size hashes: the index stays small for large benchmarks
        for text in texts:
            normal = normalize(text)
            self.exact.add(normal)
            self.grams.update(self._grams(normal.split()))

    def _grams(self, words: list[str]) -> Iterator[bytes]:
        for start in range(len(words) - self.ngram + 1):
            yield _digest(words[start : start + self.ngram])

    def why(self, text: str) -> str | None:
        """``"exact"`` or ``"ngram"`` when ``text`` overlaps the evaluation texts, else None."""
        normal = normalize(text)
        if normal in self.exact and len(normal.split()) >= MIN_EXACT_WORDS:
            return "exact"
        if any(gram in self.grams for gram in self._grams(normal.split())):
            return "ngram"
        return None

    def apply(self, sources: DatasetDict) -> tuple[DatasetDict, dict[str, Any]]:
        """``sources`` without the rows any of whose texts overlaps; the report counts them per source."""
        kept: dict[str, Dataset] = {}
        report: dict[str, Any] = {"rule": f"exact after normalisation (texts of {MIN_EXACT_WORDS}+ words), or a "
                                          f"shared run of {self.ngram} words",
                                  "sources": {}}  # fmt: skip
        for name, dataset in sources.items():
            columns = [column for column in TEXT_COLUMNS if column in dataset.column_names]
            reasons = {"exact": 0, "ngram": 0}
            keep = []
            for index, row in enumerate(dataset.select_columns(columns)):
                why = next((w for w in (self.why(row[c]) for c in columns if row[c]) if w), None)
                if why:
                    reasons[why] += 1
                else:
                    keep.append(index)
            kept[name] = dataset if len(keep) == dataset.num_rows else dataset.select(keep)
            dropped = dataset.num_rows - len(keep)
            report["sources"][name] = {"rows": dataset.num_rows, "dropped": dropped, **reasons}
            if dropped:
                logger.warning("Decontamination: dropped %d of %d rows of %r that overlap evaluation texts.",
                               dropped, dataset.num_rows, name)  # fmt: skip
        report["dropped"] = sum(entry["dropped"] for entry in report["sources"].values())
        return DatasetDict(kept), report
