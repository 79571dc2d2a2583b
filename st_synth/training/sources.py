"""Training's data, prepared: the data stage :func:`st_synth.data.sources.prepare_sources` given the texts of
the evaluation tasks it must keep out (``decontaminate``). What ``st-synth train``, the recipe and the run's
train stage call before training; :func:`st_synth.training.trainer.train` consumes the result."""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from st_synth.data.sources import MIXED_SOURCE, SOURCE_REPORTS, DataArguments, prepare_sources
from st_synth.evaluation.decontamination import evaluation_texts

__all__ = ["MIXED_SOURCE", "SOURCE_REPORTS", "load_sources"]


def load_sources(data: DataArguments, instruction_template: str) -> tuple[DatasetDict, dict[str, Any]]:
    """The training sources (one split each), instructions applied, with the generation report and the
    public data's and decontamination's reports under :data:`~st_synth.data.sources.SOURCE_REPORTS`.

    Refuses, before any model is loaded: a missing dataset, unknown kinds, missing columns, empty splits.
    """
    texts = evaluation_texts(data.decontaminate) if data.decontaminate else None
    return prepare_sources(data, instruction_template, texts)
