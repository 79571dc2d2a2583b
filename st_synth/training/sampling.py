"""A batch sampler that pays less for padding: similar lengths together, no duplicate texts in a batch.

Each text column is padded to its longest text within the batch, so a batch that mixes a 60-token
document with a 500-token one pays for 440 pad tokens on the short one. ``LengthGroupedBatchSampler``
shuffles the rows, cuts the shuffled order into windows of ``batch_size * window_batches`` rows, sorts
each window by length, forms batches from it (skipping, like sentence-transformers'
``NoDuplicatesBatchSampler``, any row whose texts already appear in the batch: in-batch duplicates are
false negatives), and finally shuffles the order of the batches. Batches stay random in content and
order; only their length spread shrinks. It plugs in as ``batch_sampler`` of
``SentenceTransformerTrainingArguments`` (the recipe's ``batch_sampler: length_grouped``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

import torch
from datasets import Dataset
from sentence_transformers.base.sampler import DefaultBatchSampler, MultiDatasetDefaultBatchSampler
from torch.utils.data import BatchSampler, ConcatDataset

LENGTH_GROUPED = "length_grouped"
SOURCE_ORDERS = ("proportional", "round_robin")


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """Rows of similar length batched together, no duplicate text in a batch (see the module docstring): the
    shuffled rows are cut into windows of ``batch_size * window_batches``, each sorted by length and cut into
    batches, and the batches shuffled. Give it as ``batch_sampler`` (``length_grouped`` in YAML)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        window_batches: int = 32,
    ) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)  # fmt: skip
        if window_batches < 1:
            raise ValueError(f"window_batches must be at least 1, got {window_batches}")
        self.window_batches = window_batches
        labels = set(valid_label_columns or [])
        columns = [c for c in dataset.column_names if c not in labels and c != "dataset_name"]
        self.lengths: list[int] = [0] * len(dataset)
        self.keys: list[frozenset[int]] = [frozenset()] * len(dataset)
        offset = 0
        for batch in dataset.select_columns(columns).iter(batch_size=4096):
            rows = list(zip(*(batch[c] for c in columns), strict=True))
            for i, texts in enumerate(rows, start=offset):
                strings = [str(t) for t in texts]
                self.lengths[i] = max(len(s) for s in strings)  # the longest column sets the padding
                self.keys[i] = frozenset(hash(s) for s in strings)
            offset += len(rows)

    def _batches(self) -> list[list[int]]:
        epoch = getattr(self, "epoch", 0)
        if getattr(self, "_cached", (None, None))[0] == epoch:
            return self._cached[1]
        self._cached = (epoch, self._build(epoch))
        return self._cached[1]

    def _build(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = self.batch_size * self.window_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            pending = sorted(order[start : start + window], key=self.lengths.__getitem__, reverse=True)
            while pending:
                batch, seen, rest = [], set(), []
                for index in pending:
                    if len(batch) < self.batch_size and not (self.keys[index] & seen):
                        batch.append(index)
                        seen |= self.keys[index]
                    else:
                        rest.append(index)
                batches.append(batch)
                pending = rest
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


class SourceAlignedBatchSampler(MultiDatasetDefaultBatchSampler):
    """One source per optimizer step on every rank: the multi-dataset sampler for multi-process training.

    sentence-transformers' proportional and round-robin samplers order *per-device* batches, and accelerate
    then deals consecutive batches to consecutive ranks, so at one step rank 0 may train on retrieval while
    rank 1 trains on short-short matching. The ranks then issue different collectives (a loss that gathers
    negatives against one that does not; three text columns against two) and the job hangs; where it does
    not hang, gathered in-batch negatives come from another task.

    Here each source's own sampler forms *global* batches (``world_size`` x the per-device size, built with
    ``batch_size`` already multiplied), sources are ordered over global batches (``order``: proportional or
    round-robin, seeded as sentence-transformers does), and every global batch is cut into ``world_size``
    equal, contiguous per-rank parts that are yielded one after the other, which is exactly how accelerate's
    ``BatchSamplerShard`` hands them out: part ``r`` to rank ``r``. A global batch whose rows do not divide
    evenly loses its last ``rows % world_size`` rows (fewer than ``world_size``; all ranks must gather tensors
    of one size), and one with fewer rows than ranks is skipped, on every rank alike. So is a batch that
    cannot contrast anything: one row per rank of a source without its own negatives (query, positive only),
    whose in-batch loss is exactly zero (a step with no gradient that still moves the learning-rate schedule;
    the main job had two: one-row long_long remnants). ``skipped`` counts them per source. Every rank computes the
    same plan from the same data and seed; :meth:`check_agreement` refuses to start when they differ.

    ``plan()`` gives the step-by-step sources (one entry per global batch), which the trainer logs.
    """

    def __init__(
        self,
        dataset: ConcatDataset,
        batch_samplers: list[BatchSampler],
        generator: torch.Generator | None = None,
        seed: int = 0,
        *,
        names: list[str] | None = None,
        world_size: int = 1,
        order: str = "proportional",
    ) -> None:
        super().__init__(dataset, batch_samplers=batch_samplers, generator=generator, seed=seed)
        if order not in SOURCE_ORDERS:
            raise ValueError(f"Unknown source order {order!r}; choose one of: {', '.join(SOURCE_ORDERS)}.")
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.names = list(names or (str(i) for i in range(len(batch_samplers))))
        self.world_size = world_size
        self.order = order
        # Per-rank parts vary in size (a source's last global batch), so accelerate must not wait for a
        # "full" batch before dealing a group out: a None batch size tells it sizes are dynamic.
        self.batch_size = None  # type: ignore[assignment]
        self._plans: tuple[int, list[tuple[int, list[int]]]] | None = None
        self.skipped: dict[str, int] = {}  # this epoch's batches that contrast nothing, per source
        self._checked_epoch: int | None = None

    def _global_batches(self) -> list[tuple[int, list[int]]]:
        """``(source index, global batch of dataset indices)`` in training order for this epoch."""
        if self._plans is not None and self._plans[0] == self.epoch:
            return self._plans[1]
        offsets = [0, *accumulate(len(d) for d in self.dataset.datasets)]
        per_source = [
            [[index + offsets[source] for index in batch] for batch in sampler]
            for source, sampler in enumerate(self.batch_samplers)
        ]
        if self.order == "round_robin":
            rounds = min(len(batches) for batches in per_source)
            sequence = [source for _ in range(rounds) for source in range(len(per_source))]
        else:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            slots = [source for source, batches in enumerate(per_source) for _ in batches]
            sequence = [slots[i] for i in torch.randperm(len(slots), generator=generator).tolist()]
        cursors = [0] * len(per_source)
        plan = []
        self.skipped = {}
        for source in sequence:
            batch = per_source[source][cursors[source]]
            cursors[source] += 1
            if len(batch) >= self.world_size * self._fewest_rows_per_rank(source):
                plan.append((source, batch))
            else:
                self.skipped[self.names[source]] = self.skipped.get(self.names[source], 0) + 1
        self._plans = (self.epoch, plan)
        return plan

    def _fewest_rows_per_rank(self, source: int) -> int:
        """1, or 2 for a source without its own negatives: one (query, positive) row contrasts with nothing."""
        columns = getattr(self.dataset.datasets[source], "column_names", None) or []
        texts = [column for column in columns if column != "dataset_name"]
        return 1 if len(texts) >= 3 or not texts else 2

    def plan(self) -> list[tuple[str, int]]:
        """``(source name, rows per rank)`` for each step of this epoch, the same on every rank."""
        return [
            (self.names[source], len(batch) // self.world_size) for source, batch in self._global_batches()
        ]

    def check_agreement(self) -> None:
        """All ranks compare a digest of their plan; on any difference every rank raises (none waits)."""
        import torch.distributed as dist

        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        plan = self.plan()
        mine = (len(plan), hashlib.sha256(repr(plan).encode()).hexdigest()[:16])
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) > 1:
            described = ", ".join(
                f"rank {r}: {n} steps (plan {digest})" for r, (n, digest) in enumerate(everyone)
            )
            raise RuntimeError(
                f"The ranks disagree on the batch plan ({described}), so they would issue different "
                "collectives and wait on each other forever. Every rank must load the same data with the same "
                "seed and settings (same --dataset folder contents, --kinds, --max_examples_per_source, seed)."
            )

    def __iter__(self) -> Iterator[list[int]]:
        if self._checked_epoch != self.epoch:
            self.check_agreement()
            self._checked_epoch = self.epoch
        for _, batch in self._global_batches():
            rows = len(batch) // self.world_size
            for rank in range(self.world_size):
                yield batch[rank * rows : (rank + 1) * rows]

    def __len__(self) -> int:
        return len(self._global_batches()) * self.world_size
