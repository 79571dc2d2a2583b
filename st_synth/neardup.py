"""Near-duplicate examples: MinHash over character 5-grams, LSH bands held in faiss hash tables.

Two examples are near-duplicates when the Jaccard similarity of the sets of character 5-grams of their
normalised texts (lower case, whitespace collapsed, the texts of an example joined) is at least a threshold,
0.8 by default, the figure commonly used to deduplicate LLM training text (e.g. for The Pile, SlimPajama,
BigCode). It catches a long text repeated with a few words changed; texts that share only their frame do
not reach it (``tests/test_neardup.py``). Character n-grams need no word boundaries, so every language of
the mix is treated the same way.

The texts of an example are one set, so an example that repeats a long document under another short query is
a near-duplicate too: the generator wrote that document twice.

Each example keeps a MinHash signature of 96 32-bit values (384 bytes, whatever its length). Candidates come
from locality-sensitive hashing: 16 bands of 6 values, each band hashed to 16 bits, stored as one 256-bit
code in faiss's ``IndexBinaryMultiHash`` (16 hash tables, one per band: a candidate shares at least one band
with the query). A candidate is a near-duplicate when the share of equal signature values (an unbiased
estimate of the Jaccard similarity) reaches the threshold. With these bands a pair at similarity 0.8 becomes
a candidate with probability 1 - (1 - 0.8^6)^16 = 0.992 (0.9: 0.99998), which is why thresholds start at 0.8;
6 values a band (not 4) keep pairs that share a frame (similarity 0.2-0.3) from crowding the candidates.

Why not ``datasketch`` (the usual MinHash LSH): it is not in this project's package index. Why not the guide
model's embeddings: an encoder pass over every text while generating; MinHash costs about a tenth of a
millisecond per example here (numpy).
"""

from __future__ import annotations

import re
from array import array

import numpy as np

SHINGLE = 5
NUM_PERM = 96
BANDS, ROWS, BAND_BITS = 16, 6, 16
MIN_THRESHOLD = 0.8
_SPACE = re.compile(r"\s+")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_CHUNK = 1024  # signatures held at first; the array doubles as it fills


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


# The 96 hash functions: x -> (a * x + b) mod 2^64, top 32 bits (a odd), over already mixed 5-gram hashes.
_A = _mix(np.arange(1, NUM_PERM + 1, dtype=np.uint64)) | np.uint64(1)
_B = _mix(np.arange(1001, 1001 + NUM_PERM, dtype=np.uint64))
# A band's hash: its values weighted by odd 64-bit constants, summed (mod 2^64), then mixed.
_ROW_WEIGHTS = _mix(np.arange(2001, 2001 + ROWS, dtype=np.uint64)) | np.uint64(1)


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text.lower()).strip()


def signature(texts: tuple[str, ...] | list[str]) -> np.ndarray:
    """The MinHash signature (96 x uint32) of the character 5-gram set of ``texts``."""
    data = np.frombuffer("\x1f".join(normalise(t) for t in texts).encode("utf-8"), dtype=np.uint8)
    if len(data) < SHINGLE:
        data = np.concatenate([data, np.zeros(SHINGLE - len(data), dtype=np.uint8)])
    # Each 5-gram's 5 bytes as one 40-bit integer (exact: no two 5-grams share it).
    data = data.astype(np.uint64)
    count = len(data) - SHINGLE + 1
    shingles = data[:count].copy()
    for offset in range(1, SHINGLE):
        shingles |= data[offset : offset + count] << np.uint64(8 * offset)
    with np.errstate(over="ignore"):
        hashed = _A[None, :] * _mix(shingles)[:, None] + _B[None, :]  # a repeated 5-gram changes no minimum
    return (hashed.min(axis=0) >> np.uint64(32)).astype(np.uint32)


def band_code(sig: np.ndarray) -> np.ndarray:
    """The LSH code of a signature: each band of 6 values hashed to 16 bits, 16 bands in 32 bytes."""
    with np.errstate(over="ignore"):
        combined = (sig.astype(np.uint64).reshape(BANDS, ROWS) * _ROW_WEIGHTS).sum(axis=1, dtype=np.uint64)
    return (_mix(combined) & np.uint64(0xFFFF)).astype("<u2").view(np.uint8)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """The MinHash estimate of the Jaccard similarity of two signatures."""
    return float(np.mean(a == b))


def check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, int | float) and MIN_THRESHOLD <= threshold <= 1):
        raise ValueError(
            f"near_duplicate_threshold must be a Jaccard similarity from {MIN_THRESHOLD} to 1.0 (character "
            f"5-grams), got {threshold!r}; turn near-duplicate removal off with --no_near_duplicates"
        )


class NearDuplicateIndex:
    """Signatures added so far, searched for one at or above ``threshold``. One index per kind."""

    def __init__(self, threshold: float = 0.8) -> None:
        import faiss

        check_threshold(threshold)
        self.threshold = threshold
        self._tables = faiss.IndexBinaryMultiHash(BANDS * BAND_BITS, BANDS, BAND_BITS)
        self._ids = array("q")
        self._signatures = np.empty((_CHUNK, NUM_PERM), dtype=np.uint32)  # grown by doubling

    def __len__(self) -> int:
        return len(self._ids)

    def find(self, sig: np.ndarray) -> int | None:
        """The id (as added) of the first added signature at or above the threshold, or None."""
        if not self._ids:
            return None
        # Radius above the code's length: every code sharing a band comes back, whatever its distance.
        _, _, found = self._tables.range_search(band_code(sig)[None, :], BANDS * BAND_BITS + 1)
        if not len(found):
            return None
        found = np.sort(found)
        close = found[np.mean(self._signatures[found] == sig[None, :], axis=1) >= self.threshold]
        return self._ids[int(close[0])] if len(close) else None

    def add(self, sig: np.ndarray, ident: int) -> None:
        position = len(self._ids)
        if position == len(self._signatures):
            grown = np.empty((2 * position, NUM_PERM), dtype=np.uint32)
            grown[:position] = self._signatures
            self._signatures = grown
        self._signatures[position] = sig
        self._tables.add(band_code(sig)[None, :])
        self._ids.append(ident)
