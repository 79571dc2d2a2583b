"""st-synth: turn any decoder LLM into an instruction-aware text embedder, the e5-mistral way.

Names are imported on first use, so ``st-synth generate`` and the test server start without loading
torch or sentence-transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "GenerationConfig": "st_synth.generation.config",
    "SyntheticDatasetBuilder": "st_synth.generation.builder",
    "build_embedder": "st_synth.model.embedder",
    "format_instruction": "st_synth.model.embedder",
    "get_instruction": "st_synth.evaluation.instructions",
    "register_instruction": "st_synth.evaluation.instructions",
    "XLMR_LANGUAGES": "st_synth.common.languages",
    "paper_language_weights": "st_synth.common.languages",
    "TASK_KINDS": "st_synth.common.taxonomy",
    "TaskKind": "st_synth.common.taxonomy",
}

__all__ = [
    "TASK_KINDS",
    "XLMR_LANGUAGES",
    "GenerationConfig",
    "SyntheticDatasetBuilder",
    "TaskKind",
    "build_embedder",
    "format_instruction",
    "get_instruction",
    "paper_language_weights",
    "register_instruction",
]

if TYPE_CHECKING:
    from st_synth.common.languages import XLMR_LANGUAGES, paper_language_weights
    from st_synth.common.taxonomy import TASK_KINDS, TaskKind
    from st_synth.evaluation.instructions import get_instruction, register_instruction
    from st_synth.generation.builder import SyntheticDatasetBuilder
    from st_synth.generation.config import GenerationConfig
    from st_synth.model.embedder import build_embedder, format_instruction


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'st_synth' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
