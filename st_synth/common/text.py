"""Text helpers every stage shares: the normal form texts are compared in, and seeded random streams."""

from __future__ import annotations

import random
import re
import unicodedata

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
