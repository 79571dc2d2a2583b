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

import logging
from typing import Any

from datasets import Dataset, DatasetDict

from st_synth.common.text import DEFAULT_NGRAM, MIN_EXACT_WORDS, TextOverlap
from st_synth.data.examples import TEXT_COLUMNS

logger = logging.getLogger(__name__)
__all__ = ["DEFAULT_NGRAM", "MIN_EXACT_WORDS", "Decontaminator"]


class Decontaminator(TextOverlap):
    """Exact (normalised) and ``ngram``-word overlap checks against a set of evaluation texts (the rule:
    :class:`~st_synth.common.text.TextOverlap`), applied to training data."""

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
