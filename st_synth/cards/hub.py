"""Publishing to the Hugging Face Hub: one folder, one commit, a rendered card, no token on disk."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from huggingface_hub import HfApi

from st_synth.cards.render import write_dataset_card
from st_synth.common.names import REPORT_FILE
from st_synth.data.examples import METADATA
from st_synth.data.reader import load_saved

logger = logging.getLogger(__name__)


def push_dataset(
    dataset: DatasetDict,
    report: dict[str, Any],
    repo_id: str,
    *,
    metadata: DatasetDict,
    token: str | None = None,
    private: bool | None = None,
) -> str:
    """Upload a generated dataset as parquet files with a dataset card and the generation report: each kind's
    texts (``dataset``) as a configuration of its own (a Hub configuration has one set of columns for all its
    splits, and the kinds with a negative have one more), split ``train``; what
    :mod:`st_synth.data.examples` saves beside them (``metadata``) as the ``metadata`` configuration, one split
    per kind. So ``load_dataset(repo_id, "retrieval", split="train")`` gives what sentence-transformers trains
    on and ``load_dataset(repo_id, "metadata")`` the rest, row for row.

    The token comes from ``token`` or huggingface_hub's own lookup (``HF_TOKEN``, ``hf auth login``) and
    is never written anywhere.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for kind in dataset:
            (folder / kind).mkdir()
            dataset[kind].to_parquet(str(folder / kind / "train-00000-of-00001.parquet"))
        (folder / METADATA).mkdir()
        for kind, data in metadata.items():
            data.to_parquet(str(folder / METADATA / f"{kind}-00000-of-00001.parquet"))
        write_dataset_card(folder, dataset, report, repo_id)
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        return _upload(folder, repo_id, "dataset", "Upload synthetic embedding data generated with st-synth",
                       token=token, private=private)  # fmt: skip


def push_dataset_folder(
    folder: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None
) -> str:
    """:func:`push_dataset` for a folder st-synth saved (``st-synth generate``, ``filter``, ``mine``, a run's
    ``data/``): its texts, its ``metadata/`` and its generation report."""
    folder = Path(folder)
    if not (folder / METADATA).is_dir():
        raise ValueError(f"{folder} is not a folder of examples st-synth saved (it has no {METADATA}/).")
    report_file = folder / REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return push_dataset(load_saved(folder), report, repo_id, metadata=load_saved(folder / METADATA), token=token,
                        private=private)  # fmt: skip


def push_model(
    folder: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None
) -> str:
    """Upload a saved SentenceTransformer folder (weights, configs, prompts, card) in one commit."""
    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved SentenceTransformer folder (no modules.json).")
    return _upload(folder, repo_id, "model", "Upload e5-style embedder trained with st-synth",
                   token=token, private=private)  # fmt: skip


def _upload(folder: Path, repo_id: str, repo_type: str, message: str, *, token: str | None,
            private: bool | None) -> str:  # fmt: skip
    """Create the repo if needed and upload ``folder`` as one commit; return the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, repo_type=repo_type, folder_path=str(folder), commit_message=message
    )
    logger.info("Pushed %s to %s", repo_type, repo_id)
    return str(getattr(commit, "commit_url", commit))
