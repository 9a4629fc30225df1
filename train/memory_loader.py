"""A resumable loader over crystal records held in memory (Python API, tests, smoke runs).

It has the loader contract the trainer relies on: iterating yields `CrystalBatch`es for this rank,
`set_epoch(e)` reshuffles, and `state_dict()/load_state_dict()` save and restore the position so a
resumed run sees the same stream. Every rank gets the same number of batches per epoch (the
remainder that cannot be split evenly is dropped for that epoch), so collective calls stay matched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from xtalgen.batch import CrystalBatch, collate
from xtalgen.record import CrystalRecord


class InMemoryLoader:
    def __init__(self, records: Sequence[CrystalRecord], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 property_names: Sequence[str] = ()):
        if batch_size * world_size > len(records):
            raise ValueError(
                f"{len(records)} records cannot fill one batch of {batch_size} on each of {world_size} ranks"
            )
        self.records = list(records)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.property_names = tuple(property_names)
        self.epoch = 0
        self.position = 0  # batches of this epoch already yielded on this rank

    def __len__(self) -> int:
        return len(self.records) // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _order(self) -> np.ndarray:
        order = np.arange(len(self.records))
        if self.shuffle:  # same permutation on every rank: a seeded generator per epoch
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        per_rank = len(self) * self.batch_size
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[CrystalBatch]:
        order = self._order()
        while self.position < len(self):
            start = self.position * self.batch_size
            chosen = order[start:start + self.batch_size]
            self.position += 1
            yield collate([self.records[i] for i in chosen], self.property_names)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
