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

from collections.abc import Iterator

import torch
from datasets import Dataset
from sentence_transformers.base.sampler import DefaultBatchSampler

LENGTH_GROUPED = "length_grouped"


class LengthGroupedBatchSampler(DefaultBatchSampler):
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
