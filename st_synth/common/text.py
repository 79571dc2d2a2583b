"""Text helpers every stage shares: the normal form texts are compared in, and seeded random streams."""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator

_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The form used to compare texts: NFKC, case-folded, whitespace collapsed, outer punctuation off.

    Example::

        >>> normalize("  Hello,   World! ")
        'hello, world'
    """
    text = _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()
    return text.strip(" .!?;:,\"'`")


DEFAULT_NGRAM = 13
# A lone word ("Alabama", "Asia": a Wikipedia heading and a newsgroup or chatterbot text) is vocabulary, not
# benchmark text: exact matches count from two words up.
MIN_EXACT_WORDS = 2


def _digest(words: list[str]) -> bytes:
    return hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest()


class TextOverlap:
    """Whether a text overlaps a set of texts: equal after :func:`normalize` (from ``MIN_EXACT_WORDS`` words),
    or sharing a run of ``ngram`` consecutive words (13 by default). The decontamination rule
    (:class:`st_synth.data.decontamination.Decontaminator` applies it to training data).

    Example::

        >>> TextOverlap(["A test of the rule."]).why("a TEST of the rule")
        'exact'
    """

    def __init__(self, texts: Iterable[str], ngram: int = DEFAULT_NGRAM) -> None:
        if ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {ngram}")
        self.ngram = ngram
        self.exact: set[str] = set()
        self.grams: set[bytes] = set()  # fixed-size hashes: the index stays small for large benchmarks
        for text in texts:
            normal = normalize(text)
            self.exact.add(normal)
            self.grams.update(self._grams(normal.split()))

    def _grams(self, words: list[str]) -> Iterator[bytes]:
        for start in range(len(words) - self.ngram + 1):
            yield _digest(words[start : start + self.ngram])

    def why(self, text: str) -> str | None:
        """``"exact"`` or ``"ngram"`` when ``text`` overlaps the texts, else None."""
        normal = normalize(text)
        if normal in self.exact and len(normal.split()) >= MIN_EXACT_WORDS:
            return "exact"
        if any(gram in self.grams for gram in self._grams(normal.split())):
            return "ngram"
        return None


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
