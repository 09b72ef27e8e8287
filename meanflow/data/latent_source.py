"""The training batch source over a latent cache: a fresh posterior sample per draw, read one batch ahead.

Every draw turns the cached moments of an image into a raw VAE latent ``mean + std * eps``, so
the model never sees the same latent twice (the posterior noise is a mild augmentation, as in
the paper), and normalises it: by the SD scale factor (MeanFlow) or per channel by fixed
statistics (Improved MeanFlow; :class:`LatentNormalisation`). While the training step runs, the next batch is read from the memory-mapped
cache in a background thread, so the disk read overlaps the step.
"""

from __future__ import annotations

import atexit
import enum
import hashlib
import threading
import time
import weakref
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from ..vae import SD_VAE_SCALE_FACTOR
from ..validation import PathLike, check_integer, parse_enum
from .latent_dataset import LatentDataset

Batch = tuple[Tensor, Optional[Tensor]]
Position = tuple[int, int]

# The per-channel statistics of raw SD-VAE (ft-mse) latents of ImageNet 256 that Improved MeanFlow
# normalises by: Lyy-iiis/imeanflow, utils/vae_util.py (main l. 54-59, torch l. 68-69).
IMF_LATENT_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
IMF_LATENT_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)


class LatentNormalisation(str, enum.Enum):
    """How a raw VAE latent ``z`` becomes a training sample (``data.latent_normalisation``).

    SD_SCALE: ``0.18215 z`` (MeanFlow, DiT and the SD-VAE convention). IMF_CHANNELS: ``(z - mean)
    / std`` per channel with :data:`IMF_LATENT_MEAN` and :data:`IMF_LATENT_STD` (Improved
    MeanFlow's official pipeline; its released models generate latents in this form).
    """

    SD_SCALE = "sd_scale"
    IMF_CHANNELS = "imf_channels"

    def channel_statistics(self) -> Optional[tuple[tuple, tuple]]:
        """(mean, std) per channel for a per-channel normalisation, None for the scale factor."""
        return (IMF_LATENT_MEAN, IMF_LATENT_STD) if self is LatentNormalisation.IMF_CHANNELS else None

    def apply(self, z: Tensor) -> Tensor:
        """Raw latents (B, C, h, w) -> training samples (B, C, h, w)."""
        statistics = self.channel_statistics()
        if statistics is None:
            return z * SD_VAE_SCALE_FACTOR
        mean, std = (z.new_tensor(values).view(1, -1, 1, 1) for values in statistics)
        return (z - mean) / std


LATENT_NORMALISATIONS = tuple(choice.value for choice in LatentNormalisation)


def _derived_seed(*values: int) -> int:
    """A 63-bit seed from integers, the same in every process and Python version."""
    # The b"meanflow.latents" salt predates this module's name; changing it would change every batch.
    digest = hashlib.sha256(b"meanflow.latents" + b"".join(int(v).to_bytes(16, "little", signed=True) for v in values))
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


class _Stream(enum.IntEnum):
    """The purposes that get independent random streams from one batch position."""

    PERMUTATION = 0
    FLIP = 1
    NOISE = 2


# Read-ahead threads that may still run; a WeakSet, so finished and dropped ones leave by themselves.
_in_flight: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()
_EXIT_WAIT_SECONDS = 10.0


@atexit.register
def _finish_reads_at_exit() -> None:
    """Wait (at most _EXIT_WAIT_SECONDS in all) for reads in flight; a read stuck longer is abandoned."""
    deadline = time.monotonic() + _EXIT_WAIT_SECONDS
    for thread in list(_in_flight):
        thread.join(max(0.0, deadline - time.monotonic()))


class _ReadAhead:
    """One batch being read in a daemon thread; :meth:`result` waits for it and re-raises its error.

    Each thread reads a single batch and ends. Being a daemon it never keeps the interpreter
    alive; and :func:`_finish_reads_at_exit` lets a read in flight end before the interpreter
    stops daemon threads, because one stopped inside a torch call aborts the whole process
    ("terminate called without an active exception") after the program has finished.
    """

    def __init__(self, read: Callable[[int, int], Batch], position: Position):
        self.position = position
        self._batch: Optional[Batch] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(read,), name="meanflow-latent-read-ahead", daemon=True)
        _in_flight.add(self._thread)
        self._thread.start()

    def _run(self, read: Callable[[int, int], Batch]) -> None:
        try:
            self._batch = read(*self.position)
        except BaseException as error:  # handed to the caller, whatever it is
            self._error = error

    def wait(self) -> None:
        """Block until the read has ended, with a batch or an error."""
        self._thread.join()

    def result(self) -> Batch:
        """The batch, once read; the reader's exception is raised here, in the caller's thread."""
        self.wait()
        if self._error is not None:
            raise self._error
        return self._batch


class LatentBatches:
    """Shuffled epochs over a latent cache; a fresh posterior sample every time a batch is drawn.

    Like :class:`~meanflow.data.sources.TensorBatches`: epoch ``e`` is a permutation drawn from
    (seed, e), a global batch of ``batch_size * world_size`` images is cut from it at ``offset``,
    process ``rank`` takes rows ``[rank * batch_size, (rank + 1) * batch_size)`` and the last
    incomplete global batch of an epoch is dropped. Each image then becomes::

        z = normalise(mean + std * eps),   eps ~ N(0, I)

    using the mirrored image's (mean, std) with probability 1/2 when ``flip`` is set, where
    ``normalise`` is ``normalisation``'s (``0.18215 z`` by default). The flip
    decisions and eps of a global batch come from generators seeded by (seed, epoch, offset), and
    each rank takes its rows of them, so the position (epoch, offset) is the whole state: a
    resumed run draws bit-identical batches on every rank, even though the training loop saves
    the state of rank 0 only, and an image seen in two epochs gets two different samples.

    Because a batch is a pure function of its position, reading ahead changes nothing but the
    timing: with ``prefetch`` the batch after the one just returned is read in a background
    thread, ``state_dict()`` still names the next batch the caller will get, and
    ``load_state_dict()`` drops a read-ahead batch of the old position.

    Args:
        cache_dir: a finished latent cache.
        batch_size: the per-process batch size.
        seed: the shuffling and sampling seed (the same on every process).
        rank, world_size: this process's slice of the global batch.
        flip: use mirrored images half the time (the cache must hold flips).
        class_conditional: return the labels; False returns None in their place.
        prefetch: read the next batch in a background thread while the caller uses this one.
        normalisation: a :class:`LatentNormalisation` (or its value): how raw latents are scaled.

    ``next_batch()`` returns latents (B, C, h, w) float32 and labels (B,) int64 (or None).
    """

    def __init__(
        self,
        cache_dir: PathLike,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        flip: bool = True,
        class_conditional: bool = True,
        prefetch: bool = True,
        normalisation: Union[LatentNormalisation, str] = LatentNormalisation.SD_SCALE,
    ):
        check_integer("batch_size", batch_size)
        self.normalisation = parse_enum(LatentNormalisation, normalisation, "data.latent_normalisation")
        check_integer("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.dataset = LatentDataset(cache_dir)
        if flip and not self.dataset.has_flips:
            raise ValueError(
                f"horizontal flips were asked for but the latent cache {self.dataset.cache_dir} was encoded "
                "with --no-flip; set data.horizontal_flip=false or re-encode without --no-flip"
            )
        statistics = self.normalisation.channel_statistics()
        if statistics is not None and len(statistics[0]) != self.dataset.latent_shape[0]:
            raise ValueError(
                f"data.latent_normalisation={self.normalisation.value!r} has statistics for {len(statistics[0])} "
                f"latent channels, but the cache {self.dataset.cache_dir} holds {self.dataset.latent_shape[0]}; "
                "use data.latent_normalisation=sd_scale for this VAE"
            )
        global_batch = batch_size * world_size
        if len(self.dataset) < global_batch:
            raise ValueError(
                f"the latent cache has {len(self.dataset)} images, fewer than one global batch of {global_batch} "
                f"({batch_size} per process x {world_size} processes); lower training.batch_size"
            )
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.flip, self.class_conditional = flip, class_conditional
        self.prefetch = prefetch
        self.epoch, self.offset = 0, 0
        # (epoch, its permutation): replaced whole, so the reader thread and the caller never see half of one.
        self._order: tuple[int, Tensor] = (0, self._permutation(0))
        self._ahead: Optional[_ReadAhead] = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w)."""
        return self.dataset.latent_shape

    def next_batch(self) -> Batch:
        """The batch at the current position, (B, C, h, w) latents and (B,) labels or None; then move on."""
        position = self._position_of_next()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.position == position:
            batch = ahead.result()  # a failed read raises here, and the position stays where it was
        else:
            batch = self._read(*position)
        self.epoch, self.offset = position[0], position[1] + self.batch_size * self.world_size
        if self.prefetch:
            self._ahead = _ReadAhead(self._read, self._position_of_next())
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch ``next_batch`` returns (a batch read ahead is not counted)."""
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        self._ahead = None  # read for the old position; its thread ends on its own
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def close(self) -> None:
        """Wait for the batch being read ahead, drop it, and read synchronously from now on."""
        ahead, self._ahead, self.prefetch = self._ahead, None, False
        if ahead is not None:
            ahead.wait()

    def _position_of_next(self) -> Position:
        """(epoch, offset) of the batch the next call returns: the next epoch once too few images remain."""
        if self.offset + self.batch_size * self.world_size > len(self.dataset):
            return self.epoch + 1, 0
        return self.epoch, self.offset

    def _read(self, epoch: int, offset: int) -> Batch:
        """The batch at (epoch, offset): a pure function of the position (safe in any thread)."""
        global_batch = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        rows = self._permutation_of(epoch)[offset:offset + global_batch][mine]  # (B,)
        flipped = None
        if self.flip:
            coins = torch.rand(global_batch, generator=self._generator(_Stream.FLIP, epoch, offset))
            flipped = (coins < 0.5)[mine]  # (B,)
        mean, std = self.dataset.moments(rows, flipped)  # (B, C, h, w) each
        noise = self._generator(_Stream.NOISE, epoch, offset)
        eps = torch.randn((global_batch, *self.latent_shape), generator=noise)[mine]  # (B, C, h, w)
        z = self.normalisation.apply(mean + std * eps)  # (B, C, h, w)
        return z, self.dataset.labels[rows] if self.class_conditional else None

    def _permutation_of(self, epoch: int) -> Tensor:
        cached_epoch, order = self._order
        if cached_epoch != epoch:
            order = self._permutation(epoch)
            self._order = (epoch, order)
        return order

    def _permutation(self, epoch: int) -> Tensor:
        return torch.randperm(len(self.dataset), generator=self._generator(_Stream.PERMUTATION, epoch))

    def _generator(self, stream: int, *position: int) -> torch.Generator:
        return torch.Generator().manual_seed(_derived_seed(self.seed, stream, *position))


__all__ = ["IMF_LATENT_MEAN", "IMF_LATENT_STD", "LATENT_NORMALISATIONS", "LatentBatches", "LatentNormalisation"]
