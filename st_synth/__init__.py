"""st-synth: turn any decoder LLM into an instruction-aware text embedder, the e5-mistral way."""

from __future__ import annotations

from st_synth.builder import GenerationConfig, SyntheticDatasetBuilder
from st_synth.embedder import build_embedder, format_instruction
from st_synth.instructions import get_instruction, register_instruction
from st_synth.languages import XLMR_LANGUAGES, paper_language_weights
from st_synth.taxonomy import TASK_KINDS, TaskKind

__version__ = "0.1.0"

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
