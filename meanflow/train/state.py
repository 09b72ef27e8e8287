"""What a checkpoint of a training process holds, and putting a process back from one.

A checkpoint holds the model, every EMA copy and the optimizer's tensors (safetensors), and as
JSON the lr schedule, the data position, every rank's RNG states and the counters; the run's
description (``run.json``, :mod:`meanflow.run_record`) is written into the same atomic folder.
Restoring all of it makes a resumed run bit-identical to an uninterrupted one with the same
number of processes on the same machine.

Under FSDP2 the tensors are sharded. Saving gathers them one tensor at a time, one part at a
time (model, then EMA, then optimizer); rank 0 keeps and writes each part and drops it before
the next is gathered, and no other rank ever holds a full copy (:func:`meanflow.distributed.gather_state`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointWriter, check_compatible, load_checkpoint, load_optimizer, optimizer_tensors
from ..data import BatchSource
from ..distributed import Distributed, gather_state, shard_like
from .ema import EMA


def capture_rng(generator: torch.Generator) -> dict:
    """Every random state this process draws from (torch, CUDA, numpy, Python, the objective's
    generator), as JSON-able data."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
        "objective": generator.get_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    """Put back what :func:`capture_rng` captured."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(torch.tensor(state["objective"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


@dataclass
class TrainingState:
    """The parts of one training process that a checkpoint saves and restores; everything else
    (the objective, the wrappers, the logs) is rebuilt from the configuration.

    ``step`` counts optimizer steps taken; ``skipped`` the steps dropped for a non-finite loss
    or gradient (they consumed data and randomness but changed no weight).
    """

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    source: BatchSource
    generator: torch.Generator
    step: int = 0
    skipped: int = 0


def save_state(state: TrainingState, dist: Distributed, root: Path, files: dict[str, str], keep_last: int,
               milestone_every: int) -> Optional[Path]:
    """Write the checkpoint of ``state.step`` under ``root``; every rank calls it, rank 0 writes.

    ``trainer.json`` holds what resuming needs; ``files`` are text files written beside it (the
    run record, which describes the run: config, model, EMA names). Returns the folder on rank 0,
    None elsewhere.
    """
    rng = dist.gather_objects(capture_rng(state.generator))
    writer = CheckpointWriter(root, state.step) if dist.is_main else None
    optimizer_state, optimizer_data = optimizer_tensors(state.optimizer)
    parts = (("model", state.model.state_dict()), ("ema", state.ema.state_tensors()),
             ("optimizer", optimizer_state))
    for name, tensors in parts:
        full = gather_state(tensors, keep=writer is not None)  # collective for sharded tensors
        if writer is not None:
            writer.tensors(name, full)
        del full  # before the next part is gathered: the host holds one part at a time
    path = None
    if writer is not None:
        writer.trainer_state({"schedule": state.schedule.state_dict(),
                              "data": state.source.state_dict(), "rng": rng, "skipped_steps": state.skipped,
                              "world_size": dist.world_size}, optimizer_data)
        for name, text in files.items():
            writer.text(name, text)
        path = writer.commit(keep_last, milestone_every)
    dist.barrier()
    return path


def restore_state(state: TrainingState, dist: Distributed, path: Path) -> None:
    """Load the checkpoint at ``path`` into ``state`` (every rank: tensors are re-sharded like
    the live ones). Refuses, before touching any weight, a checkpoint written by another number
    of processes, on other data, or of another architecture."""
    checkpoint = load_checkpoint(path)
    trainer = checkpoint.trainer
    ranks = trainer["rng"]
    if len(ranks) != dist.world_size:
        raise ValueError(f"the checkpoint was written by {len(ranks)} processes; resuming with "
                         f"{dist.world_size} would not reproduce the run (use the same number)")
    state.source.load_state_dict(trainer["data"])  # a source over user data checks its fingerprint
    current = state.model.state_dict()
    check_compatible(current, checkpoint.model)
    state.model.load_state_dict({key: shard_like(checkpoint.model[key], value) for key, value in current.items()})
    state.ema.load_state_tensors(checkpoint.ema)
    parameters = [p for group in state.optimizer.param_groups for p in group["params"]]
    optimizer_state = {}
    for key, value in checkpoint.optimizer.items():
        like = parameters[int(key.split("/", 1)[0])]
        # Moments have their parameter's shape (and sharding); the step counter is a scalar.
        optimizer_state[key] = shard_like(value, like) if value.shape == like.shape else value
    load_optimizer(state.optimizer, optimizer_state, trainer["optimizer"])
    state.schedule.load_state_dict(trainer["schedule"])
    restore_rng(ranks[dist.rank], state.generator)
    state.step = checkpoint.step
    state.skipped = int(trainer.get("skipped_steps", 0))


__all__ = ["TrainingState", "capture_rng", "restore_rng", "restore_state", "save_state"]
