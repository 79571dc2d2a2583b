"""Names st-synth owns in one place: the files and folders it writes, and the one "unknown name" message.

Every module imports these instead of spelling them again, so a renamed file cannot leave a reader behind.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# Written by generation beside the DatasetDict, read by filtering, training, the cards and the Hub upload.
REPORT_FILE = "generation_report.json"
# A training run's output folder: the LoRA adapter alone, the merged model, and what the run did.
ADAPTER_DIR = "adapter"
FINAL_DIR = "final"
SUMMARY_FILE = "training_summary.json"
# The facts a model card is rendered from, kept in the model folder so scores can be added later.
CARD_DATA_FILE = "st_synth_card.json"
# `st-synth run`: what a finished training stage was made from (its reuse fingerprint) and what it did.
FILTER_REPORT_FILE = "filter_report.json"
MINING_REPORT_FILE = "mining_report.json"
RUN_FILE = "st_synth_run.json"
RUN_SUMMARY_FILE = "run_summary.json"
# `st-synth run`'s output folder, stage by stage.
RUN_SYNTHETIC_DIR = "synthetic"
RUN_DATA_DIR = "data"
RUN_EMBEDDINGS_DIR = "embeddings"  # corpus embeddings the filter and the mining share
RUN_MODEL_DIR = "model"
RUN_EVAL_DIR = "eval"


def close_matches(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` of ``choices`` spelled like ``name`` (case-insensitively), best first."""
    choices = list(choices)
    by_lower = {choice.lower(): choice for choice in choices}
    found = difflib.get_close_matches(name.strip().lower(), list(by_lower), n=n, cutoff=cutoff)
    return [by_lower[match] for match in found]


def unknown_name(what: str, name: str, choices: Iterable[str], *, list_choices: bool = True,
                 extra: str = "", cutoff: float = 0.6, choose: str = "Choose one of") -> ValueError:  # fmt: skip
    """The error for a name that is not one of ``choices``: close matches first, then the valid choices.

    ``list_choices=False`` for long lists (mteb's task names), where only the close matches help.
    """
    choices = list(choices)
    close = close_matches(name, choices, cutoff=cutoff)
    message = f"Unknown {what} {name!r}."
    if close:
        message += f" Did you mean {' or '.join(repr(c) for c in close)}?"
    if list_choices:
        message += f" {choose}: {', '.join(choices)}."
    if extra:
        message += f" {extra}"
    return ValueError(message)
