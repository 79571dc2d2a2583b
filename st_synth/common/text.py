"""Text helpers every stage shares: the normal form texts are compared in, and seeded random streams."""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Iterable

_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The form used to compare texts: NFKC, case-folded, whitespace collapsed, outer punctuation off.

    Example::

        >>> normalize("  Hello,   World! ")
        'hello, world'
    """
    text = _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()
    return text.strip(" .!?;:,\"'`")


def seeded_rng(*parts: object) -> random.Random:
    """A random stream fixed by ``parts`` alone (the seed, a stage name, an index...): the same parts give
    the same draws in any process and run."""
    return random.Random(":".join(map(str, parts)))


def name_list(value: str | Iterable[object] | None) -> list[str]:
    """A setting that takes several names, as a list: one comma-separated string (a flag) or a list (YAML),
    whose items may hold commas too; names stripped, empty ones dropped.

    Example::

        >>> name_list("retrieval, sts")
        ['retrieval', 'sts']
        >>> name_list(["LeeDocSTS,ChatterbotQARetrieval", " x "])
        ['LeeDocSTS', 'ChatterbotQARetrieval', 'x']
    """
    if not value:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [name.strip() for item in items for name in str(item).split(",") if name.strip()]
