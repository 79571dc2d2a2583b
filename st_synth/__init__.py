"""st-synth: turn any decoder LLM into an instruction-aware text embedder, the e5-mistral way.

Names are imported on first use, so ``st-synth generate`` and the test server start without loading
torch or sentence-transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GenerationConfig": "st_synth.builder",
    "SyntheticDatasetBuilder": "st_synth.builder",
    "build_embedder": "st_synth.embedder",
    "format_instruction": "st_synth.embedder",
    "get_instruction": "st_synth.instructions",
    "register_instruction": "st_synth.instructions",
    "XLMR_LANGUAGES": "st_synth.languages",
    "paper_language_weights": "st_synth.languages",
    "TASK_KINDS": "st_synth.taxonomy",
    "TaskKind": "st_synth.taxonomy",
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
    from st_synth.builder import GenerationConfig, SyntheticDatasetBuilder
    from st_synth.embedder import build_embedder, format_instruction
    from st_synth.instructions import get_instruction, register_instruction
    from st_synth.languages import XLMR_LANGUAGES, paper_language_weights
    from st_synth.taxonomy import TASK_KINDS, TaskKind


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'st_synth' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
