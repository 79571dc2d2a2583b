"""Datasets in and out of every stage: the one reader (path, ``builtin:`` name or Hub id), corpora, the round-trip filter, hard-negative mining, near-duplicates and public data."""
