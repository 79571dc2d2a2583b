"""Hard negatives mined over a corpus with sentence-transformers' own ``util.mine_hard_negatives``.

For (query, positive) pairs, each query's nearest corpus passages (by the mining model) that are neither its
positive nor a near-copy of it become its negative. A near-copy is a candidate whose similarity to the
positive is at least ``max_positive_similarity`` (one text quoted in another, the same passage with other
whitespace): such a "negative" would teach the model to push a positive away. Candidates are mined with
sentence-transformers' range and margin settings; st-synth then takes, per row, the first candidate that is
not the positive (after normalisation) and below that ceiling, and drops (and counts) rows without one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, Features

from st_synth.common.arguments import decode_json
from st_synth.common.names import FILTER_REPORT_FILE, MINING_REPORT_FILE, REPORT_FILE
from st_synth.common.taxonomy import TASK_KINDS
from st_synth.common.text import name_list, normalize
from st_synth.data.corpus import Corpus, CorpusArguments
from st_synth.data.examples import read_examples, save_like
from st_synth.data.filtering import grounded_kinds_of, grounding_passages
from st_synth.data.guide import load_guide

logger = logging.getLogger(__name__)


@dataclass
class MiningArguments:
    """Hard-negative mining (``util.mine_hard_negatives``) and the near-copy ceiling st-synth adds."""

    mining_model: str = field(default="all-MiniLM-L6-v2", metadata={
        "help": "The encoder that ranks candidates: a SentenceTransformer folder or Hub id, or all-MiniLM-L6-v2 "
        "(packaged)."})  # fmt: skip
    query_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Prefix of the queries for the mining model (e.g. an instruction, for an instruction model)."
        },
    )
    corpus_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Prefix of the corpus texts for the mining model (e.g. 'passage: ' for the e5 models)."
        },
    )
    range_min: int = field(default=0, metadata={"help": "Skip the range_min closest candidates."})
    range_max: int = field(default=30, metadata={"help": "Consider the range_max closest candidates."})
    relative_margin: float | None = field(
        default=0.05,
        metadata={
            "help": "Keep a candidate only when its score is this fraction below the positive's (NV-Retriever's 95 percent)."
        },
    )
    absolute_margin: float | None = field(
        default=None,
        metadata={"help": "Keep a candidate only when its score is this much below the positive's."},
    )
    max_positive_similarity: float = field(
        default=0.95,
        metadata={
            "help": "A candidate this similar to the positive (cosine, mining model) is a near-copy, never a negative."
        },
    )
    candidates: int = field(default=5, metadata={"help": "Candidates mined per query, tried in order."})
    replace_negatives: bool = field(default=False, metadata={
        "help": "Also mine for data that has negatives (LLM-written ones), replacing them; off: only pairs get one."})  # fmt: skip
    batch_size: int = field(default=32, metadata={"help": "Texts encoded at once."})
    splits: str | list[str] | None = field(default=None, metadata={
        "help": "Mine only these splits (kinds), comma-separated (a list in YAML); default: every split that can "
        "get a negative.", "flag_type": str | None, "metavar": "SPLITS"})  # fmt: skip

    def __post_init__(self) -> None:
        value = decode_json(self.splits, "splits")
        self.splits = name_list(value) if isinstance(value, str) else value
        if not 0 <= self.range_min < self.range_max:
            raise ValueError(f"need 0 <= range_min < range_max, got {self.range_min} and {self.range_max}")
        if not 0 < self.max_positive_similarity <= 1:
            raise ValueError(f"max_positive_similarity must be in (0, 1], got {self.max_positive_similarity}")
        if not 1 <= self.candidates <= self.range_max - self.range_min:
            raise ValueError(f"candidates must be in 1..range_max - range_min ({self.range_max - self.range_min}), "
                             f"got {self.candidates}")  # fmt: skip


# Scores held at once while mining: queries per block x corpus passages (64M float32 scores: 256 MB).
SCORE_BUDGET = 2**26


def query_block(passages: int) -> int:
    """How many queries ``mine_hard_negatives`` scores at once against ``passages`` passages, within
    :data:`SCORE_BUDGET` (its own default, 16,384 queries, would hold 64 GB of scores for a corpus of 1M)."""
    return max(1, min(16384, SCORE_BUDGET // max(1, passages)))


def mine_negatives(pairs: Dataset, corpus: list[str], settings: MiningArguments, model: Any = None,
                   cache_folder: str | Path | None = None,
                   document_of: dict[str, int] | None = None) -> tuple[Dataset, dict[str, Any]]:  # fmt: skip
    """``pairs`` (columns ``query``, ``positive``, any others kept as they are) with a mined ``negative`` from
    ``corpus`` after ``positive``; rows without a valid negative are dropped. Returns the triplets and a
    report (rows in, kept, dropped per reason)."""
    from sentence_transformers.util import mine_hard_negatives

    missing = [column for column in ("query", "positive") if column not in pairs.column_names]
    if missing:
        raise ValueError(
            f"Mining needs columns query and positive; missing {missing} in {pairs.column_names}."
        )
    if not corpus:
        raise ValueError("Mining needs a corpus of at least one passage.")
    model = model or load_guide(settings.mining_model)
    # "triplet" keeps every candidate found, in rank order, also for a query with fewer than `candidates`
    # of them ("n-tuple" would drop that query altogether).
    mined = mine_hard_negatives(
        pairs.select_columns(["query", "positive"]), model, anchor_column_name="query",
        positive_column_name="positive", corpus=list(corpus), range_min=settings.range_min,
        range_max=settings.range_max, relative_margin=settings.relative_margin,
        absolute_margin=settings.absolute_margin, num_negatives=settings.candidates, sampling_strategy="top",
        query_prompt=settings.query_prompt, corpus_prompt=settings.corpus_prompt, output_format="triplet",
        batch_size=settings.batch_size, faiss_batch_size=query_block(len(corpus)),
        verbose=False, cache_folder=str(cache_folder) if cache_folder else None,
    )  # fmt: skip
    found: dict[tuple[str, str], list[str]] = {}
    for row in mined.to_list():
        found.setdefault((row["query"], row["positive"]), []).append(row["negative"])
    pair_keys = list(zip(pairs["query"], pairs["positive"], strict=True))
    candidates = sorted({text for texts in found.values() for text in texts})
    positives = sorted({positive for _, positive in found})
    if candidates:
        texts = positives + [text for text in candidates if text not in set(positives)]
        embeddings = model.encode(texts, prompt=settings.corpus_prompt, batch_size=settings.batch_size,
                                  normalize_embeddings=True, convert_to_tensor=True)  # fmt: skip
        position = {text: i for i, text in enumerate(texts)}
    report = {"rows": pairs.num_rows, "no_candidate": 0, "near_copy_only": 0, "same_document_skipped": 0}
    negatives: list[str | None] = []
    for query, positive in pair_keys:
        chosen = None
        options = found.get((query, positive), [])
        for candidate in options:
            if normalize(candidate) == normalize(positive):
                continue
            if (
                document_of
                and candidate in document_of
                and document_of.get(positive) == document_of[candidate]
            ):
                report["same_document_skipped"] += 1  # another passage of the positive's own document
                continue
            if (
                float(embeddings[position[positive]] @ embeddings[position[candidate]])
                < settings.max_positive_similarity
            ):
                chosen = candidate
                break
        if chosen is None:
            report["no_candidate" if not options else "near_copy_only"] += 1
        negatives.append(chosen)
    keep = [i for i, negative in enumerate(negatives) if negative is not None]
    report["kept"] = len(keep)
    columns = pairs.column_names
    order = [c for c in columns if c != "negative"]
    order.insert(order.index("positive") + 1, "negative")
    if not keep:  # (datasets cannot add a column to an empty selection)
        features = Features({c: pairs.features["positive" if c == "negative" else c] for c in order})
        return Dataset.from_dict({c: [] for c in order}, features=features), report
    out = pairs.select(keep)
    if "negative" in columns:
        out = out.remove_columns("negative")
    out = out.add_column("negative", [negatives[i] for i in keep], feature=pairs.features["positive"])
    return out.select_columns(order), report


def mine_splits(splits: dict[str, Dataset], corpus: list[str], settings: MiningArguments, model: Any = None,
                cache_folder: str | Path | None = None,
                document_of: dict[str, int] | None = None) -> tuple[dict[str, Dataset], dict[str, Any]]:  # fmt: skip
    """:func:`mine_negatives` for several splits with one encoding of the corpus: splits with the same
    columns are mined together. Returns the mined splits (an emptied split left out) and, per split, rows
    in and kept."""
    from datasets import concatenate_datasets

    groups: dict[tuple[str, ...], list[str]] = {}
    for name, split in splits.items():
        groups.setdefault(tuple(split.column_names), []).append(name)
    mined_splits: dict[str, Dataset] = {}
    report: dict[str, Any] = {}
    for names in groups.values():
        combined = concatenate_datasets(
            [splits[n].add_column("_split", [n] * splits[n].num_rows) for n in names]
        )
        mined, _ = mine_negatives(combined, corpus, settings, model=model, cache_folder=cache_folder,
                                  document_of=document_of)  # fmt: skip
        for name in names:
            part = mined.filter(lambda row, n=name: row["_split"] == n).remove_columns("_split")
            report[name] = {"rows": splits[name].num_rows, "kept": part.num_rows}
            if part.num_rows:
                mined_splits[name] = part
    return mined_splits, report


def mining_pool(data: Any, grounded: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Where negatives come from and which splits of ``data`` (a DatasetDict) may get one.

    With ``grounded`` (the passages of the corpus the data was grounded in, or a corpus the user names), the
    candidates are those passages and a kind whose positive is LLM-written rather than the passage (sts,
    classification: ``TaskKind.passage_first``) is left as it is. Without, the candidates are the distinct
    positives of the data itself: each pair's negative is another pair's positive, the closest one the
    mining model finds. A split named after a kind whose positives are labels (classification) is never
    mined and never lends its labels as candidates. Returns (candidates, mineable split names).
    """

    def labels(name: str) -> bool:
        return name in TASK_KINDS and not TASK_KINDS[name].in_batch_negatives

    pairs = [name for name, split in data.items()
             if {"query", "positive"} <= set(split.column_names) and not labels(name)]  # fmt: skip
    if grounded is not None:
        mineable = [name for name in pairs if not (name in TASK_KINDS and TASK_KINDS[name].passage_first)]
        return list(grounded), mineable
    return list(dict.fromkeys(text for name in pairs for text in data[name]["positive"])), pairs


def mine_folder(source: str | Path, target: str | Path, settings: MiningArguments,
                corpus: CorpusArguments | None = None, *, loaded: Any = None,
                cache_folder: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """``st-synth mine`` and the mine stage of ``st-synth run``: the (query, positive) splits of ``source`` get
    a mined negative (:func:`mining_pool` says which and from where).

    ``source``: a `st-synth generate` folder, or any `datasets` folder or Hub id (your own pairs). The
    candidates come from ``corpus`` when given (``loaded``: that corpus already loaded), else from the corpus
    ``source`` was grounded in (its report), else from the distinct positives of ``source`` itself; with
    ``corpus``, a negative never comes from the positive's own document. A split that has negatives keeps
    them unless ``settings.replace_negatives``. Writes ``target`` (same layout, the earlier stages' reports
    copied) with mining_report.json, and returns that report.
    """
    import json
    import shutil

    from datasets import DatasetDict

    source, target = Path(source), Path(target)
    data, instructions = read_examples(source, "Pairs to mine for")
    if not any({"query", "positive"} <= set(split.column_names) for split in data.values()):
        raise ValueError(f"{source} has no split with query and positive columns; it has: "
                         + "; ".join(f"{n}: {', '.join(s.column_names)}" for n, s in data.items()))  # fmt: skip
    document_of = None
    own_positives = False
    if corpus is not None and corpus.corpus:
        loaded = loaded or Corpus.load(corpus)
        passages, usable = mining_pool(data, loaded.passages)
        origin, document_of = ", ".join(corpus.corpus), loaded.document_of()
    elif (grounded := grounding_passages(source)) is not None:
        passages, usable = mining_pool(data, grounded)
        origin = "the corpus the data was grounded in"
    else:
        passages, usable = mining_pool(data)
        origin, own_positives = "the data's own positives", True
    free: list[str] = []
    if not own_positives and (grounded_kinds := grounded_kinds_of(source)) is not None:
        # Generated with only some kinds grounded: the free kinds' negatives come from their own positives.
        free_data = {name: split for name, split in data.items() if name not in grounded_kinds}
        usable = [name for name in usable if name in grounded_kinds]
        free_passages, free = mining_pool(free_data) if free_data else ([], [])

    def wanted_of(names: list[str]) -> dict[str, Any]:
        return {name: data[name] for name in names
                if "negative" not in data[name].column_names or settings.replace_negatives}  # fmt: skip

    if settings.splits is not None:
        if absent := [name for name in settings.splits if name not in data]:  # e.g. emptied by the filter
            logger.warning("mine splits %s: %s has none such (its splits: %s).", ", ".join(absent), source,
                           ", ".join(data))  # fmt: skip
        usable = [name for name in usable if name in settings.splits]
        free = [name for name in free if name in settings.splits]
    wanted, free_wanted = wanted_of(usable), wanted_of(free)
    mined, per_split = {}, {}
    if wanted or free_wanted:
        model = load_guide(settings.mining_model)
    if wanted:
        mined, per_split = mine_splits(wanted, passages, settings, model=model, cache_folder=cache_folder,
                                       document_of=document_of)  # fmt: skip
    if free_wanted:
        free_mined, free_report = mine_splits(free_wanted, free_passages, settings, model=model,
                                              cache_folder=cache_folder)  # fmt: skip
        mined, per_split = {**mined, **free_mined}, {**per_split, **free_report}
    wanted |= free_wanted
    report = {"corpus": origin, "passages": len(passages), "mining_model": settings.mining_model,
              "replaced_negatives": settings.replace_negatives, "splits": per_split,
              **({"free_kinds_from_own_positives": free} if free else {})}  # fmt: skip
    splits = {
        name: mined.get(name, split) for name, split in data.items() if name not in wanted or name in mined
    }
    save_like(DatasetDict(splits), target, instructions)
    for name in (
        REPORT_FILE,
        FILTER_REPORT_FILE,
    ):  # the reports of the stages before, not datasets' own files
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    (target / MINING_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
