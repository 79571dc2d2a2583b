"""Where a build keeps what it has settled: the examples of one shard (:class:`ShardIndices`) and the
kept examples, spooled to Arrow files as they are settled (:class:`Spool`)."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, Value

from st_synth.common.taxonomy import PROVENANCE_COLUMNS, TASK_KINDS
from st_synth.generation.prompting import ExamplePlan

logger = logging.getLogger(__name__)


class ShardIndices(Sequence[int]):
    """The example indices of one shard, ascending, computed rather than held: the blocks of ``block_size``
    examples whose number is ``shard_index`` modulo ``num_shards`` (the last block may be short)."""

    def __init__(self, num_examples: int, block_size: int, num_shards: int = 1, shard_index: int = 0) -> None:
        self.num_examples, self.block_size = num_examples, block_size
        self.blocks = range(shard_index, -(-num_examples // block_size), num_shards)
        # every block is whole but the last one of all, which may be this shard's
        short = self.blocks and self.blocks[-1] == -(-num_examples // block_size) - 1
        self._len = len(self.blocks) * block_size - ((-num_examples) % block_size if short else 0)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, position):  # type: ignore[override]
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(self._len))]
        if position < 0:
            position += self._len
        if not 0 <= position < self._len:
            raise IndexError(f"position {position} of {self._len} examples")
        return self.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def __iter__(self) -> Iterator[int]:
        for block in self.blocks:
            yield from self.block(block)

    def block(self, block: int) -> range:
        """The indices of block ``block`` (none for a block of another shard or past the end)."""
        if block not in self.blocks:
            return range(0)
        return range(block * self.block_size, min((block + 1) * self.block_size, self.num_examples))


@dataclass
class Kept:
    attempt: int
    instruction: str
    texts: tuple[str, ...]
    key: bytes  # a 16-byte digest of the kind and the normalised texts: what exact duplicates are judged on
    template: str = ""  # the template ids its prompts came from ("+"-joined: brainstorm, then example)


SPOOL_PREFIX = ".st-synth-spool-"


def _remove_orphaned_spools(where: Path) -> None:
    """Remove the spools of processes that no longer run (killed before their exit handler could)."""
    for folder in where.glob(f"{SPOOL_PREFIX}*"):
        pid = folder.name[len(SPOOL_PREFIX) :].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # another user's process: alive
            pass


class Spool:
    """Settled examples, written to Arrow files (one per kind, in index order) as they are settled, so that
    a run of any size holds only the examples not settled yet. The files live in a temporary folder beside
    the answer cache until the process ends (the dataset returned is memory-mapped from them)."""

    FLUSH = 4096  # rows per kind buffered before they are written

    def __init__(self, where: Path, grounded: frozenset[str]) -> None:
        self.where = where
        self.grounded = grounded
        self.folder: Path | None = None
        self.buffers: dict[str, dict[str, list[str]]] = {}
        self.writers: dict[str, Any] = {}

    def columns(self, kind: str) -> tuple[str, ...]:
        return TASK_KINDS[kind].grounded_columns() if kind in self.grounded else TASK_KINDS[kind].columns

    def add(self, plan: ExamplePlan, kept: Kept) -> None:
        columns = self.columns(plan.kind)
        rows = self.buffers.setdefault(plan.kind, {column: [] for column in columns})
        rows["instruction"].append(kept.instruction)
        for column, text in zip(columns[1 : -len(PROVENANCE_COLUMNS)], kept.texts, strict=True):
            rows[column].append(text)
        rows["language"].append(plan.language_label)
        rows["template"].append(kept.template)
        if len(rows["instruction"]) >= self.FLUSH:
            self._flush(plan.kind)

    def _flush(self, kind: str) -> None:
        from datasets.arrow_writer import ArrowWriter

        rows = self.buffers.pop(kind, None)
        if not rows or not rows["instruction"]:
            return
        if kind not in self.writers:
            if self.folder is None:
                self.where.mkdir(parents=True, exist_ok=True)
                _remove_orphaned_spools(self.where)
                self.folder = Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", dir=self.where))
                atexit.register(shutil.rmtree, self.folder, True)
            features = Features({column: Value("string") for column in self.columns(kind)})
            self.writers[kind] = ArrowWriter(features=features, path=str(self.folder / f"{kind}.arrow"))
        self.writers[kind].write_batch(rows)

    def finish(self, kinds: Any) -> DatasetDict:
        splits = {}
        for kind in kinds:
            self._flush(kind)
            writer = self.writers.pop(kind, None)
            if writer is None:
                logger.warning("No %s examples were kept; the dataset has no %s split.", kind, kind)
                continue
            writer.finalize()
            splits[kind] = Dataset.from_file(str(self.folder / f"{kind}.arrow"))
        return DatasetDict(splits)
