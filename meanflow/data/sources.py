"""Batch sources for the training loop, with their position as plain state for exact resume.

A source yields ``(x, labels)`` batches forever: ``x`` (B, ...) float32, ``labels`` (B,) int64 or
None. ``state_dict()`` captures where it is, so a resumed run sees the very batches an
uninterrupted run would have seen. Under data parallelism each process takes its own slice of
one global batch.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
from torch import Tensor


class BatchSource(Protocol):
    """An endless stream of batches with a resumable position."""

    def next_batch(self) -> tuple[Tensor, Optional[Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TensorBatches:
    """Shuffled epochs over in-memory tensors, optionally with random horizontal flips.

    Each epoch is a permutation drawn from a generator seeded by (seed, epoch), so the position
    is just (epoch, offset). A global batch of ``batch_size * world_size`` samples is cut from the
    permutation; process ``rank`` takes rows ``[rank * batch_size, (rank + 1) * batch_size)`` of it.
    The last incomplete global batch of an epoch is dropped.

    Args:
        data: (N, ...) samples; images are (N, C, H, W).
        labels: (N,) int64 or None.
        batch_size: the per-process batch size.
        seed: the shuffling seed (the same on every process).
        horizontal_flip: flip each image left-right with probability 1/2.
    """

    def __init__(
        self,
        data: Tensor,
        labels: Optional[Tensor],
        batch_size: int,
        seed: int = 0,
        horizontal_flip: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        global_batch = batch_size * world_size
        if len(data) < global_batch:
            raise ValueError(
                f"the data set has {len(data)} samples, fewer than one global batch of {global_batch} "
                f"({batch_size} per process x {world_size} processes); lower training.batch_size"
            )
        if labels is not None and len(labels) != len(data):
            raise ValueError(f"{len(labels)} labels for {len(data)} samples")
        if horizontal_flip and data.dim() != 4:
            raise ValueError("horizontal flips need images of shape (N, C, H, W)")
        self.data, self.labels = data, labels
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.horizontal_flip = horizontal_flip
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=generator)

    def next_batch(self) -> tuple[Tensor, Optional[Tensor]]:
        global_batch = self.batch_size * self.world_size
        if self.offset + global_batch > len(self.data):
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.offset + self.rank * self.batch_size
        rows = self._order[start:start + self.batch_size]
        x = self.data[rows]
        if self.horizontal_flip:
            # The flip decision depends on (seed, epoch, offset) only: reproducible after resume.
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + self.offset)
            flips = torch.rand(global_batch, generator=generator)[self.rank * self.batch_size:][: self.batch_size] < 0.5
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        self.offset += global_batch
        return x, None if self.labels is None else self.labels[rows]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)


class ToyStream:
    """Fresh exact samples of a 2-D toy distribution every step (there is no finite data set).

    The generator is seeded by (seed, rank); its state is the stream's position.
    """

    def __init__(self, name: str, batch_size: int, seed: int = 0, rank: int = 0):
        from ..toys import sample_toy

        self._sample = sample_toy
        self.name, self.batch_size = name, batch_size
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)

    def next_batch(self) -> tuple[Tensor, Optional[Tensor]]:
        return self._sample(self.name, self.batch_size, generator=self.generator), None

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
