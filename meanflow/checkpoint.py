"""Checkpoints as data: safetensors for tensors, JSON for everything else; written atomically.

A checkpoint is a folder ``step_<9 digits>/`` holding

    model.safetensors       the raw model weights
    ema.safetensors         every EMA copy, keys ``<ema name>/<tensor name>``
    optimizer.safetensors   the optimizer's tensors, keys ``<param index>/<state name>``
    trainer.json            step, config, model spec, optimizer hyper-parameters, RNG and data
                            positions, counters
    run.json                the run's description (:mod:`meanflow.run_record`), given by the caller

It is written into ``step_<n>.tmp/``, every file fsync'ed, then renamed in one step: a crash or kill
at any moment leaves either the complete folder or a ``.tmp`` one that loading ignores. Nothing
loaded from a checkpoint is executed: safetensors and JSON carry no code. :class:`CheckpointWriter`
writes the folder one part at a time, so a sharded run can gather, write and drop each part in
turn; :func:`save_checkpoint` writes it from whole dictionaries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from .io import fsync_directory

_NAME = re.compile(r"^step_(\d{9})$")
FORMAT_VERSION = 2  # 2: the run's description moved to run.json (meanflow.run_record)


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("checkpoints need the 'safetensors' package: pip install 'meanflow[all]'") from None
    return st


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors on the CPU and the trainer's JSON state."""

    path: Path
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    trainer: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.trainer["step"])

    def ema_weights(self, name: Optional[str] = None) -> dict[str, Tensor]:
        """The weights of one EMA copy (by name, e.g. ``ema_0.9999``; default the first), or
        ``"raw"`` for the trained weights themselves."""
        names = list(self.trainer.get("ema_names", []))
        name = name or (names[0] if names else "raw")
        if name == "raw":
            return self.model
        if name not in names:
            raise ValueError(f"unknown weights {name!r}; this checkpoint has {['raw', *names]}")
        prefix = f"{name}/"
        return {key[len(prefix):]: value for key, value in self.ema.items() if key.startswith(prefix)}


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (``.tmp`` folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "trainer.json").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{index}/{key}"] = value.detach()  # callers gather / move to the CPU
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], data: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(data["scalars"].items()):
        index, key = flat.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": data["param_groups"]})


def _write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    st = _safetensors()
    st.save_file(_distinct_storage(tensors), str(path))
    _fsync_file(path)


def _distinct_storage(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors of which no two share storage, as safetensors requires.

    Only tensors that do share a storage (tied weights, views of one buffer) are cloned: cloning
    everything would double the host memory of the largest part being written (gigabytes for
    an XL/2 optimizer state).
    """
    ready = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    owners: dict[int, int] = {}
    for value in ready.values():
        pointer = value.untyped_storage().data_ptr()
        owners[pointer] = owners.get(pointer, 0) + 1
    return {key: value.clone() if owners[value.untyped_storage().data_ptr()] > 1 else value
            for key, value in ready.items()}


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


class CheckpointWriter:
    """Writes the checkpoint of one step part by part, then publishes it atomically.

    Each part is written (and fsync'ed) as soon as it is given, so a caller can gather one part,
    write it and drop it before gathering the next: the host never holds more than the largest
    part. Nothing is visible under ``root`` until :meth:`commit` renames the staging folder;
    a writer that is abandoned leaves a ``.tmp`` folder that loading ignores and the next
    save removes.
    """

    def __init__(self, root: Path, step: int):
        self.root, self.step = Path(root), step
        self.root.mkdir(parents=True, exist_ok=True)
        self.final = self.root / checkpoint_name(step)
        self.staging = self.root / (checkpoint_name(step) + ".tmp")
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()

    def tensors(self, part: str, tensors: dict[str, Tensor]) -> None:
        """``<part>.safetensors`` (part: "model", "ema" or "optimizer")."""
        _write_safetensors(self.staging / f"{part}.safetensors", tensors)

    def trainer_state(self, trainer: dict[str, Any], optimizer_data: dict[str, Any]) -> None:
        """``trainer.json``: the trainer's JSON state with the step, format and optimizer's non-tensor state."""
        record = dict(trainer, step=self.step, format_version=FORMAT_VERSION, optimizer=optimizer_data)
        self.text("trainer.json", json.dumps(record, indent=1))

    def text(self, name: str, text: str) -> None:
        """A further text file of the checkpoint (e.g. the run record)."""
        (self.staging / name).write_text(text)
        _fsync_file(self.staging / name)

    def commit(self, keep_last: int = 3, milestone_every: int = 0) -> Path:
        """Publish the checkpoint (one rename), then prune old ones; returns its folder."""
        fsync_directory(self.staging)
        if self.final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(self.final)
        os.rename(self.staging, self.final)
        fsync_directory(self.root)
        _prune(self.root, keep_last, milestone_every)
        return self.final


def save_checkpoint(
    root: Path,
    step: int,
    model: dict[str, Tensor],
    ema: dict[str, Tensor],
    optimizer: tuple[dict[str, Tensor], dict[str, Any]],
    trainer: dict[str, Any],
    keep_last: int = 3,
    milestone_every: int = 0,
    files: Optional[dict[str, str]] = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically, then prune old ones.

    Keeps the newest ``keep_last`` checkpoints plus every ``milestone_every``-th step (0: none).
    ``files`` are further text files of the checkpoint (name -> content, e.g. the run record),
    written inside the same atomic folder. (:class:`CheckpointWriter` writes the same folder
    one part at a time.)
    """
    writer = CheckpointWriter(root, step)
    optimizer_tensors_, optimizer_data = optimizer
    writer.tensors("model", model)
    writer.tensors("ema", ema)
    writer.tensors("optimizer", optimizer_tensors_)
    writer.trainer_state(trainer, optimizer_data)
    for name, text in (files or {}).items():
        writer.text(name, text)
    return writer.commit(keep_last, milestone_every)


def _prune(root: Path, keep_last: int, milestone_every: int) -> None:
    complete = list_checkpoints(root)
    for path in complete[:-keep_last] if keep_last > 0 else []:
        step = int(_NAME.match(path.name).group(1))
        if milestone_every and step % milestone_every == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint folder (or the latest one under a run / checkpoints folder)."""
    path = resolve_checkpoint(path)
    st = _safetensors()
    trainer = json.loads((path / "trainer.json").read_text())
    return Checkpoint(
        path=path,
        model=st.load_file(str(path / "model.safetensors")),
        ema=st.load_file(str(path / "ema.safetensors")),
        optimizer=st.load_file(str(path / "optimizer.safetensors")),
        trainer=trainer,
    )


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint inside a run or checkpoints folder."""
    path = Path(path)
    if (path / "trainer.json").exists():
        return path
    for root in (path, path / "checkpoints"):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise ValueError(f"no checkpoint at {path}: expected a step_<n> folder with trainer.json, or a run folder holding checkpoints/")


def check_compatible(expected: dict[str, Tensor], stored: dict[str, Tensor], what: str = "model") -> None:
    """Refuse weights of another architecture, naming the differences."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(stored[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(stored)) if stored[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"the checkpoint's {what} does not match this architecture:"]
        if missing:
            lines.append(f"  missing in checkpoint ({len(missing)}): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            lines.append(f"  not in model ({len(unexpected)}): {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if mismatched:
            lines.append(f"  shape differences ({len(mismatched)}): " + "; ".join(mismatched[:5]))
        raise ValueError("\n".join(lines))


def load_weights(path: Path) -> tuple[Path, dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """What sampling and evaluation need from a checkpoint, and no more: (folder, model weights,
    EMA weights, trainer state). The optimizer state is not read."""
    path = resolve_checkpoint(path)
    st = _safetensors()
    trainer = json.loads((path / "trainer.json").read_text())
    return path, st.load_file(str(path / "model.safetensors")), st.load_file(str(path / "ema.safetensors")), trainer
