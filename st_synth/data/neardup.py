"""Near-duplicate examples: MinHash over character 5-grams, LSH bands in sorted arrays, signatures on disk.

Two examples are near-duplicates when the Jaccard similarity of the sets of character 5-grams of their
normalised texts (lower case, whitespace collapsed, the texts of an example joined) is at least a threshold,
0.8 by default, the figure commonly used to deduplicate LLM training text (e.g. for The Pile, SlimPajama,
BigCode). It catches a long text repeated with a few words changed; texts that share only their frame do
not reach it (``tests/test_neardup.py``). Character n-grams need no word boundaries, so every language of
the mix is treated the same way.

The texts of an example are one set, so an example that repeats a long document under another short query is
a near-duplicate too: the generator wrote that document twice.

Each example has a MinHash signature of 96 32-bit values. Candidates come from locality-sensitive hashing:
16 bands of 6 values, each band hashed to 28 bits; a candidate shares at least one band hash with the query,
and is a near-duplicate when the share of equal signature values (an unbiased estimate of the Jaccard
similarity) reaches the threshold. With these bands a pair at similarity 0.8 becomes a candidate with
probability 1 - (1 - 0.8^6)^16 = 0.992 (0.9: 0.99998), which is why thresholds start at 0.8; 6 values a band
(not 4) keep pairs that share a frame (similarity 0.2-0.3) from crowding the candidates.

Memory, at paper scale: the index holds 16 eight-byte band entries per example (band, hash and position in
one sorted ``uint64`` array, so a lookup is one ``searchsorted``); the signatures (384 bytes each) and ids go
to an unlinked temporary file (gone when the process ends, killed or not) and only a candidate's are read
back: with 28-bit band hashes a query that has no near-duplicate meets a chance candidate in about 6 of
1,000 lookups at 100k examples of a kind (16 x 100k / 2^28). The latest entries (up to ``BUFFER``) are held in memory and
merged into the sorted array in one pass when the buffer is full.

Exact repeats are judged on fixed-size keys (:class:`ExactKeys`): the first 8 bytes of each example's digest,
in a sorted ``uint64`` array. Two different examples share such a key with probability about n^2 / 2^65
(1e-8 at 500k examples).

Why not ``datasketch`` (the usual MinHash LSH): it is not in this project's package index, and its in-memory
LSH keeps Python objects per band entry. Why not the guide model's embeddings: an encoder pass over every text
while generating; MinHash costs about a tenth of a millisecond per example here (numpy).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

SHINGLE = 5
NUM_PERM = 96
BANDS, ROWS, BAND_BITS = 16, 6, 28
MIN_THRESHOLD = 0.8
_SPACE = re.compile(r"\s+")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


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


def band_words(sig: np.ndarray) -> np.ndarray:
    """The LSH words of a signature: for each band of 6 values, the band's number (4 bits) and its hash (28
    bits) in one ``uint32``."""
    with np.errstate(over="ignore"):
        combined = (sig.astype(np.uint64).reshape(BANDS, ROWS) * _ROW_WEIGHTS).sum(axis=1, dtype=np.uint64)
    hashed = _mix(combined) >> np.uint64(64 - BAND_BITS)
    return ((np.arange(BANDS, dtype=np.uint64) << np.uint64(BAND_BITS)) | hashed).astype(np.uint32)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """The MinHash estimate of the Jaccard similarity of two signatures."""
    return float(np.mean(a == b))


def check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, int | float) and MIN_THRESHOLD <= threshold <= 1):
        raise ValueError(
            f"near_duplicate_threshold must be a Jaccard similarity from {MIN_THRESHOLD} to 1.0 (character "
            f"5-grams), got {threshold!r}; turn near-duplicate removal off with --no_near_duplicates"
        )


def exact_key(kind: str, normalized: tuple[str, ...] | list[str]) -> bytes:
    """What exact duplicates are judged on: a 16-byte digest of the kind and the texts in the validator's
    normalised form (``st_synth.generation.validation.normalize``), the same in the builder and in ``st-synth dedup``."""
    return hashlib.blake2b(json.dumps([kind, *normalized]).encode(), digest_size=16).digest()


_POSITION = np.uint64(0xFFFFFFFF)
_RECORD = np.dtype([("signature", "<u4", (NUM_PERM,)), ("id", "<i8")])


class NearDuplicateIndex:
    """Signatures added so far, searched for one at or above ``threshold``. One index per kind.

    ``directory``: where the signatures' temporary file is made (default: the system's temporary folder; give
    a folder on disk where that one is in memory).
    """

    BUFFER = 1024

    def __init__(self, threshold: float = 0.8, directory: str | Path | None = None) -> None:
        check_threshold(threshold)
        self.threshold = threshold
        # band word << 32 | position, sorted; positions below self._merged are on disk
        self._keys = np.empty(0, dtype=np.uint64)
        self._merged = 0
        # Lives as long as the index (close()); it has no name, so a killed process leaves nothing behind.
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".st-synth-minhash-")  # noqa: SIM115
        self._recent_words = np.empty((self.BUFFER, BANDS), dtype=np.uint32)
        self._recent = np.empty(self.BUFFER, dtype=_RECORD)
        self._recent_map: dict[int, list[int]] = {}  # the buffer's band words -> their positions
        self._count = 0  # entries held in the buffer
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # the last signature found and its words

    def __len__(self) -> int:
        return self._merged + self._count

    def _words(self, sig: np.ndarray) -> np.ndarray:
        if self._last is not None and self._last[0] is sig:  # add() right after find(): hashed once
            return self._last[1]
        words = band_words(sig)
        self._last = (sig, words)
        return words

    def _candidates(self, words: np.ndarray) -> list[int]:
        """Positions (ascending) of the entries that share a band hash with ``words``."""
        found: set[int] = set()
        if len(self._keys):
            wide = words.astype(np.uint64) << np.uint64(32)
            lows = np.searchsorted(self._keys, wide, side="left")
            highs = np.searchsorted(self._keys, wide | _POSITION, side="right")
            for band in np.flatnonzero(highs > lows):
                found.update((self._keys[lows[band] : highs[band]] & _POSITION).tolist())
        if self._recent_map:
            for word in words.tolist():
                found.update(self._recent_map.get(word, ()))
        return sorted(found)

    def _record(self, position: int) -> np.void:
        if position >= self._merged:
            return self._recent[position - self._merged]
        size = _RECORD.itemsize
        return np.frombuffer(os.pread(self._file.fileno(), size, position * size), dtype=_RECORD)[0]

    def find(self, sig: np.ndarray) -> int | None:
        """The id (as added) of the first added signature at or above the threshold, or None."""
        for position in self._candidates(self._words(sig)):
            record = self._record(position)
            if similarity(record["signature"], sig) >= self.threshold:
                return int(record["id"])
        return None

    def add(self, sig: np.ndarray, ident: int) -> None:
        words = self._words(sig)
        position = self._merged + self._count
        self._recent_words[self._count] = words
        self._recent[self._count] = (sig, ident)
        for word in words.tolist():
            self._recent_map.setdefault(word, []).append(position)
        self._count += 1
        if self._count == self.BUFFER:
            self._merge()

    def _merge(self) -> None:
        """Write the buffer's records to the file and its band entries into the sorted array."""
        self._file.seek(0, os.SEEK_END)
        self._file.write(self._recent[: self._count].tobytes())
        self._file.flush()
        positions = np.arange(self._merged, self._merged + self._count, dtype=np.uint64)
        new = np.sort(
            (
                (self._recent_words[: self._count].astype(np.uint64) << np.uint64(32)) | positions[:, None]
            ).ravel()
        )
        self._keys = np.insert(self._keys, np.searchsorted(self._keys, new), new)
        self._merged += self._count
        self._count = 0
        self._recent_map.clear()

    def close(self) -> None:
        self._file.close()


class ExactKeys:
    """A set of example digests held as 8-byte integers: a sorted array, plus a small set of the latest."""

    MERGE = 4096

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()

    @staticmethod
    def _int(key: bytes) -> int:
        return int.from_bytes(key[:8], "little")

    def __contains__(self, key: bytes) -> bool:
        value = self._int(key)
        if value in self._recent:
            return True
        at = int(np.searchsorted(self._sorted, np.uint64(value)))
        return at < len(self._sorted) and int(self._sorted[at]) == value

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def add(self, key: bytes) -> None:
        if key in self:
            return
        self._recent.add(self._int(key))
        if len(self._recent) >= self.MERGE:
            new = np.sort(np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent)))
            self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, new), new)
            self._recent.clear()
