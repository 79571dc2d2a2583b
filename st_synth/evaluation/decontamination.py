"""The evaluation side of decontamination: the texts of the tasks to be run, which no training row may contain.

Evaluation texts are every string of every split of every task (queries, corpus documents, sentences, and a
classification task's training half, which fits the classifier and is evaluation data too). The check itself
(exact after normalisation, or a shared 13-word run) is :class:`st_synth.data.decontamination.Decontaminator`,
a data stage that training's data preparation runs::

    texts = evaluation_texts(["LeeDocSTS", "ChatterbotQARetrieval"])
    clean, report = Decontaminator(texts).apply(sources)   # DatasetDict -> DatasetDict, dropped per source
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from datasets import Dataset, DatasetDict

from st_synth.data.decontamination import DEFAULT_NGRAM, MIN_EXACT_WORDS, Decontaminator
from st_synth.evaluation.evaluate import load_task_data, resolve_tasks

__all__ = ["DEFAULT_NGRAM", "MIN_EXACT_WORDS", "Decontaminator", "evaluation_texts"]


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a task's data: nested dicts and lists, and the string columns of datasets."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Dataset):
        for name, feature in value.features.items():
            if getattr(feature, "dtype", None) in ("string", "large_string"):
                yield from (text for text in value[name] if isinstance(text, str))
    elif isinstance(value, dict | DatasetDict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def evaluation_texts(task_names: Iterable[str]) -> list[str]:
    """The texts of the evaluation tasks ``task_names`` (mteb names; the shipped offline tasks need no
    network), loaded as the evaluation will load them."""
    tasks = resolve_tasks(list(task_names))
    load_task_data(tasks)
    texts: list[str] = []
    for task in tasks:
        texts += [text for text in _strings(getattr(task, "dataset", None)) if text.strip()]
    return texts
