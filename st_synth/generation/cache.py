"""A content-addressed answer cache in SQLite: a request that was paid for once is never paid again.

Each answer is committed as soon as it arrives (WAL journal), so a process killed at any moment loses at
most the requests that were still in flight. Keys hash everything that determines an answer except the
endpoint address and the response-format mode: the same model asked the same thing with the same
sampling parameters and seed gives the same answer wherever it is served from.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path


class CacheError(RuntimeError):
    """The answer cache cannot be opened, read or written (not a database, disk full, no permission)."""


def request_key(model: str, body: dict) -> str:
    """The cache key of a request: a digest of the model name and the request body (messages, sampling,
    response format), so the same request gives the same key in any process or run."""
    canonical = json.dumps(
        {"model": model, **body}, sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


SQLITE_BUSY, SQLITE_LOCKED = 5, 6  # sqlite3 names them only from Python 3.11
BUSY_WAIT_S = 60.0
"""How long a run waits for another process that holds the cache file before giving up."""


def held_by_another(error: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: by result code on Python 3.11+, by SQLite's message on 3.10 ("database
    is locked", "database table is locked", "database schema is locked")."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (SQLITE_BUSY, SQLITE_LOCKED)
    return "is locked" in str(error)


_REFUSED = "batch:refused:"  # + request key: a batch engine refused it (see mark_refused)


class AnswerCache:
    """Every answer a generation run paid for, in one SQLite file, keyed by the request (:func:`request_key`):
    a rerun, a resumed run or another shard asks the cache first, so no request is paid twice. Also keeps the
    run's metadata (the endpoint's confirmed response format, Batch API records). Safe across threads; one
    writer at a time across processes (SQLite's own locking).

    Example::

        cache = AnswerCache("answers.sqlite")
        cache.get(key)  # the stored answer (content and token counts), or None"""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=BUSY_WAIT_S, check_same_thread=False, isolation_level=None
            )
            self._set_up()
        except (sqlite3.Error, OSError) as error:
            raise CacheError(
                f"Cannot use {self.path} as the answer cache ({error}). Pass another cache path (--cache, or "
                "generate.cache in a run config), or move that file away."
            ) from None

    def _set_up(self) -> None:
        """WAL journal and the two tables, retried while another process holds the file.

        Several runs may open one fresh cache at the same moment. SQLite's busy timeout covers most waits,
        but switching the journal mode and a transaction whose snapshot went stale answer "database is
        locked" at once, without waiting, so those are retried here until ``BUSY_WAIT_S`` has passed.
        """
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                )
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                )
                self._db.execute("COMMIT")
                return
            except sqlite3.OperationalError as error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if not held_by_another(error) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.01, 0.1))

    @staticmethod
    def count(path: str | Path) -> int:
        """The answers in the cache at ``path`` (0 where there is none yet), read-only, so that another
        process may watch a run's progress."""
        try:
            with closing(sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)) as db:
                return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        except sqlite3.Error:
            return 0

    @classmethod
    def check(cls, path: str | Path) -> None:
        """Open and close the cache: refuse a file that is not one before any request is paid for."""
        cls(path).close()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)", (key, json.dumps(value))
                )
            except sqlite3.Error as error:
                raise CacheError(
                    f"Cannot write the answer cache {self.path} ({error}). The {self._count()} answers "
                    "already in it are kept: free some space (or pass a cache on another disk) and run the "
                    "same command again to resume."
                ) from None

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def mark_refused(self, key: str, reason: str) -> None:
        """Record that a batch engine refused the request ``key`` (HTTP 4xx): it is dropped like a refused
        online request and never exported again."""
        self.set_meta(_REFUSED + key, reason)

    def refused_reason(self, key: str) -> str | None:
        """Why a batch engine refused the request ``key``, or None."""
        return self.get_meta(_REFUSED + key)

    def meta_items(self, prefix: str) -> dict[str, str]:
        """Every meta entry whose key starts with ``prefix`` (the prefix cut off)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix)
            ).fetchall()
        return {key[len(prefix) :]: value for key, value in rows}

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    def _count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
