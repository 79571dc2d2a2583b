"""Real texts that ship inside packages st-synth already depends on, read as ``builtin:NAME`` wherever a
dataset is named: documents (a ``text`` column) for a corpus, (query, positive) pairs for training. None of
them is a text of a shipped evaluation task (LeeDocSTS uses gensim's other Lee file, ``lee.cor``).

======================================  =========  ============================================================
name                                    gives      what it is
======================================  =========  ============================================================
``builtin:lee-background``              documents  gensim's ``lee_background.cor``: 300 Australian news articles
``builtin:wikipedia``                   documents  the first prose paragraph of each section of gensim's
                                                   English Wikipedia sample (~100 articles)
``builtin:lee-background-pairs``        pairs      each of those news articles cut into its two halves
``builtin:wikipedia-section-pairs``     pairs      (``"Title: Section"``, that section's first paragraph)
======================================  =========  ============================================================
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from st_synth.common.names import unknown_name

Gives = Literal["documents", "pairs"]
PREFIX = "builtin:"


def _lee_background() -> Any:
    from datasets import Dataset

    from st_synth.data.offline_tasks import gensim_test_data

    text = (gensim_test_data() / "lee_background.cor").read_text(encoding="utf-8", errors="replace")
    return Dataset.from_dict({"text": [line.strip() for line in text.strip().split("\n") if line.strip()]})


def _wikipedia() -> Any:
    from datasets import Dataset

    from st_synth.data.offline_tasks import wikipedia_section_pairs

    return Dataset.from_dict({"text": list(wikipedia_section_pairs(min_words=20)["positive"])})


def _lee_background_pairs() -> Any:
    from st_synth.data.offline_tasks import lee_background_pairs

    return lee_background_pairs()


def _wikipedia_section_pairs() -> Any:
    from st_synth.data.offline_tasks import wikipedia_section_pairs

    return wikipedia_section_pairs()


@dataclass(frozen=True)
class Builtin:
    """One builtin source: what it gives (``documents``: a ``text`` column; ``pairs``: ``query`` and
    ``positive``) and its loader (the module docstring says what each one is)."""

    gives: Gives
    load: Callable[[], Any]


BUILTINS: dict[str, Builtin] = {
    "lee-background": Builtin("documents", _lee_background),
    "wikipedia": Builtin("documents", _wikipedia),
    "lee-background-pairs": Builtin("pairs", _lee_background_pairs),
    "wikipedia-section-pairs": Builtin("pairs", _wikipedia_section_pairs),
}
# Names that read as pairs before the registry was one (a documents source had the same name): (old) -> new.
RENAMED_PAIRS = {"lee-background": "lee-background-pairs", "wiki-sections": "wikipedia-section-pairs"}


def names(gives: Gives) -> list[str]:
    """The builtin names that give ``gives``."""
    return [name for name, entry in BUILTINS.items() if entry.gives == gives]


def load_builtin(source: str, gives: Gives) -> Any:
    """``builtin:NAME`` as a ``datasets.Dataset`` of ``gives``.

    Raises:
        ValueError: an unknown name, or one that gives the other thing, naming the ones that fit.
    """
    name = source.removeprefix(PREFIX)
    if gives == "pairs" and name in RENAMED_PAIRS:
        new = RENAMED_PAIRS[name]
        warnings.warn(f"The builtin source '{PREFIX}{name}' as pairs is now called '{PREFIX}{new}'; the old name "
                      "still works, for now.", FutureWarning, stacklevel=3)  # fmt: skip
        name = new
    entry = BUILTINS.get(name)
    if entry is None or entry.gives != gives:
        raise unknown_name(f"builtin source of {gives}", name, names(gives))
    return entry.load()
