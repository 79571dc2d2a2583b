"""Evaluation during training on rows held out of the training data (``eval_examples``): for every source whose
rows are retrieval-like (each query has its own positive; not classification, whose positives are labels
shared across rows), sentence-transformers' ``InformationRetrievalEvaluator`` ranks the held-out positives
and negatives for each held-out query. The texts are used as trained (instructions already in them), so the
model's own prompts are switched off for them.

Example::

    evaluator = held_out_evaluator(eval_sources)   # None when no source qualifies
    trainer = SentenceTransformerTrainer(..., eval_dataset=eval_sources, evaluator=evaluator)
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from st_synth.common.taxonomy import TASK_KINDS

PREFIX = "held-out"
MIN_ROWS = 2  # a ranking needs at least two candidates


def held_out_evaluator(sources: DatasetDict) -> Any:
    """A ``SequentialEvaluator`` with one ``InformationRetrievalEvaluator`` per retrieval-like source of
    ``sources`` (query, positive[, negative] columns, as trained), named ``held-out-<source>``; None when none
    has :data:`MIN_ROWS` rows."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
        SequentialEvaluator,
    )

    evaluators = []
    for name, split in sources.items():
        if name in TASK_KINDS and not TASK_KINDS[name].in_batch_negatives:
            continue  # positives are shared labels: no ranking of one right document
        if split.num_rows < MIN_ROWS or not {"query", "positive"} <= set(split.column_names):
            continue
        ids: dict[str, str] = {}  # text -> corpus id (a text shared by rows is one document)
        queries, relevant = {}, {}
        for number, row in enumerate(split):
            texts = [row["positive"], *([row["negative"]] if row.get("negative") else [])]
            for text in texts:
                ids.setdefault(text, f"d{len(ids)}")
            queries[f"q{number}"] = row["query"]
            relevant[f"q{number}"] = {ids[row["positive"]]}
        corpus = {doc_id: text for text, doc_id in ids.items()}
        evaluator = InformationRetrievalEvaluator(
            queries, corpus, relevant, name=f"{PREFIX}-{name}", query_prompt="", corpus_prompt="", write_csv=False,
            mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[10], map_at_k=[10],
        )  # fmt: skip
        evaluators.append(evaluator)
    if not evaluators:
        return None
    return SequentialEvaluator(evaluators, main_score_function=lambda scores: sum(scores) / len(scores))


def held_out_scores(metrics: dict[str, float]) -> dict[str, float]:
    """nDCG@10 per held-out source from an evaluator's (or the trainer's ``eval_``-prefixed) metrics."""
    scores = {}
    for key, value in metrics.items():
        key = key.removeprefix("eval_")
        if key.startswith(f"{PREFIX}-") and key.endswith("_ndcg@10"):
            source = key[len(PREFIX) + 1 :].split("_", 1)[0]
            scores[source] = float(value)
    return dict(sorted(scores.items()))
