"""Checkpoints as data: safetensors for tensors, JSON for everything else; written atomically.

A checkpoint is a folder ``step_<9 digits>/`` holding

    model.safetensors       the raw model weights
    ema.safetensors         every EMA copy, keys ``<ema name>/<tensor name>``
    optimizer.safetensors   the optimizer's tensors, keys ``<param index>/<state name>``
    trainer.json            step, config, model spec, optimizer hyper-parameters, RNG and data
                            positions, counters
    run.json                the run's description (:mod:`meanflow.run_record`), given by the caller

The write protocol makes a kill or crash at any instant leave each step either whole or invisible:

- a checkpoint is written into ``step_<n>.tmp/``, every file fsync'ed, then renamed to
  ``step_<n>/`` in one step;
- re-saving a step that exists moves the old folder aside to ``step_<n>.old/``, renames the new
  one in, then deletes the old one. A kill between the two renames leaves the old copy whole;
  the listing uses it while ``step_<n>/`` is absent, and the next save puts it back;
- a folder is deleted (pruned, or the old copy of a re-save) by renaming it to
  ``step_<n>.deleting/`` first and only then removing its files, so a delete cut short leaves a
  name the listing ignores and the next save removes.

:func:`list_checkpoints` counts a ``step_<n>`` folder as a checkpoint only if it holds every file
of :data:`REQUIRED_FILES`; others (left by an interrupted delete of an older version, or damaged
by hand) are named in one warning and skipped. Loading never executes anything: safetensors and
JSON carry no code, and a damaged or disguised file is refused with a ``ValueError`` that names
it and says what to do. :class:`CheckpointWriter` writes the folder one part at a time, so a
sharded run can gather, write and drop each part in turn; :func:`save_checkpoint` writes it from
whole dictionaries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .io import fsync_directory

FORMAT_VERSION = 2  # 2: the run's description moved to run.json (meanflow.run_record)
KNOWN_FORMATS = (1, 2)
REQUIRED_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "trainer.json")
TRAINER_FILE = "trainer.json"

# The names a step's folders take: the checkpoint itself, and the three transient states.
_STAGING, _ASIDE, _DELETING = ".tmp", ".old", ".deleting"
_FOLDER = re.compile(r"^step_(\d{9})(\.tmp|\.old|\.deleting)?$")


class IncompleteCheckpointWarning(UserWarning):
    """A ``step_<n>`` folder lacks some of :data:`REQUIRED_FILES`; the listing skips it."""


class MissingEntryError(KeyError, ValueError):
    """An entry that a checkpoint's trainer.json should hold is absent. A ``ValueError`` (a
    damaged file) and, for code that looks entries up, a ``KeyError``."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class TrainerState(dict):
    """The content of a checkpoint's trainer.json: a dict whose missing entries raise a
    :class:`MissingEntryError` naming the file, instead of a bare ``KeyError``."""

    def __init__(self, data: dict, source: Path):
        super().__init__(data)
        self.source = source

    def __missing__(self, key: str) -> Any:
        raise MissingEntryError(f"{self.source} lacks the entry {key!r}: it was not written by a complete save of "
                                f"this version of meanflow. {_use_another(self.source.parent)}")


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


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


# -- the listing --------------------------------------------------------------------------

def missing_files(folder: Path) -> list[str]:
    """The files of :data:`REQUIRED_FILES` that ``folder`` lacks (empty: a complete checkpoint)."""
    return [name for name in REQUIRED_FILES if not (Path(folder) / name).is_file()]


def _step_folders(root: Path) -> dict[int, dict[str, Path]]:
    """Every folder of a step under ``root``: step -> {suffix ('' for the checkpoint itself): path}."""
    found: dict[int, dict[str, Path]] = {}
    try:
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        match = _FOLDER.match(entry.name)
        if match and entry.is_dir():
            found.setdefault(int(match.group(1)), {})[match.group(2) or ""] = entry
    return found


_reported: set[Path] = set()  # incomplete folders already warned about in this process


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first; never raises for what it finds.

    A step's checkpoint is ``step_<n>/`` when it holds every required file, else the whole copy
    ``step_<n>.old/`` of a re-save cut short between its two renames. Staging and deleting
    folders are ignored; incomplete ``step_<n>/`` folders are skipped and named in a warning
    (:class:`IncompleteCheckpointWarning`, once per folder and process).
    """
    found, incomplete = [], []
    for step, folders in sorted(_step_folders(Path(root)).items()):
        final, aside = folders.get(""), folders.get(_ASIDE)
        if final is not None and not missing_files(final):
            found.append(final)
            continue
        if final is not None:
            incomplete.append(final)
        if aside is not None and not missing_files(aside):
            found.append(aside)
    _report_incomplete(incomplete)
    return found


def _report_incomplete(folders: Sequence[Path]) -> None:
    new = [folder for folder in folders if folder not in _reported]
    if not new:
        return
    _reported.update(new)
    names = "; ".join(f"{folder} (lacks {', '.join(missing_files(folder))})" for folder in new)
    warnings.warn(f"skipping {len(new)} incomplete checkpoint folder(s), left by an interrupted save or delete "
                  f"or damaged: {names}. Training resumes from the newest complete checkpoint; pruning removes "
                  f"such folders once they are older than the checkpoints it keeps, or delete them yourself",
                  IncompleteCheckpointWarning, stacklevel=3)


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (see :func:`list_checkpoints`), or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


# -- writing ------------------------------------------------------------------------------

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


def _rename(source: Path, target: Path) -> None:
    """One durable rename inside a checkpoints folder."""
    os.rename(source, target)
    fsync_directory(target.parent)


def _discard(folder: Path) -> None:
    """Delete a step's folder so that no instant shows it half-deleted under a listed name:
    rename it to ``step_<n>.deleting`` first, then remove the files."""
    match = _FOLDER.match(folder.name)
    trash = folder.with_name(f"step_{match.group(1)}{_DELETING}")
    if trash.exists():  # an earlier delete of this step was cut short
        shutil.rmtree(trash, ignore_errors=True)
    _rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _recover(root: Path) -> None:
    """Finish what an interrupted save or delete left: an old copy moved aside by a re-save
    goes back when its step has no complete folder (else it is deleted), and folders being
    deleted are removed. Called by the writer, the one process that changes ``root``."""
    for step, folders in _step_folders(root).items():
        final, aside = folders.get(""), folders.get(_ASIDE)
        if aside is not None:
            if (final is None or missing_files(final)) and not missing_files(aside):
                if final is not None:
                    _discard(final)
                _rename(aside, root / checkpoint_name(step))
            else:
                _discard(aside)
        if _DELETING in folders:
            shutil.rmtree(folders[_DELETING], ignore_errors=True)


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
        _recover(self.root)
        self.final = self.root / checkpoint_name(step)
        self.staging = self.root / (checkpoint_name(step) + _STAGING)
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()

    def tensors(self, part: str, tensors: dict[str, Tensor]) -> None:
        """``<part>.safetensors`` (part: "model", "ema" or "optimizer")."""
        _write_safetensors(self.staging / f"{part}.safetensors", tensors)

    def trainer_state(self, trainer: dict[str, Any], optimizer_data: dict[str, Any]) -> None:
        """``trainer.json``: the trainer's JSON state with the step, format and optimizer's non-tensor state."""
        record = dict(trainer, step=self.step, format_version=FORMAT_VERSION, optimizer=optimizer_data)
        self.text(TRAINER_FILE, json.dumps(record, indent=1))

    def text(self, name: str, text: str) -> None:
        """A further text file of the checkpoint (e.g. the run record)."""
        (self.staging / name).write_text(text)
        _fsync_file(self.staging / name)

    def commit(self, keep_last: int = 3, milestone_every: int = 0) -> Path:
        """Publish the checkpoint (one rename; a re-save of the step moves the old folder aside
        first and deletes it after), then prune old ones; returns its folder."""
        fsync_directory(self.staging)
        aside = self.root / (checkpoint_name(self.step) + _ASIDE)
        replacing = self.final.exists()  # e.g. a stop signal right after a periodic save
        if replacing:
            if aside.exists():
                _discard(aside)
            _rename(self.final, aside)
        _rename(self.staging, self.final)
        if replacing:
            _discard(aside)
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
    """Keep the newest ``keep_last`` complete checkpoints (all when ``keep_last <= 0``) and the
    milestones; delete every other step folder older than them (incomplete ones included), then
    abandoned staging folders and deletes that were cut short."""
    kept = list_checkpoints(root)[-keep_last:] if keep_last > 0 else []
    if kept:
        oldest_kept = int(_FOLDER.match(kept[0].name).group(1))
        for step, folders in sorted(_step_folders(root).items()):
            milestone = milestone_every and step % milestone_every == 0
            if step < oldest_kept and not milestone and "" in folders:
                _discard(folders[""])
    for step, folders in _step_folders(root).items():
        for suffix in (_STAGING, _DELETING):
            if suffix in folders:
                shutil.rmtree(folders[suffix], ignore_errors=True)


# -- loading ------------------------------------------------------------------------------

def _use_another(folder: Path) -> str:
    """What to do about a damaged checkpoint folder."""
    return (f"The checkpoint {folder} is damaged (a copy or write cut short?): copy it again from where it came "
            f"from, or delete that folder to resume (or load) from the previous checkpoint of the run")


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path`` (``what`` it is, for messages); a missing, empty, corrupt or
    non-object file is a ``ValueError`` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the folder lacks its {what}. {_use_another(path.parent)}") from None
    if not data.strip():
        raise ValueError(f"{path} is empty ({len(data)} bytes) instead of the {what}. {_use_another(path.parent)}")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}), so it cannot be the {what}. "
                         f"{_use_another(path.parent)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not the object the {what} is. "
                         f"{_use_another(path.parent)}")
    return value


def read_trainer_state(folder: Path, required: Sequence[str] = ("step",)) -> TrainerState:
    """A checkpoint's trainer.json, refused when damaged, of an unknown format, or without the
    ``required`` entries."""
    path = Path(folder) / TRAINER_FILE
    data = read_json_object(path, "trainer state")
    version = data.get("format_version", 1)
    if version not in KNOWN_FORMATS:
        raise ValueError(f"{path} has checkpoint format {version!r}; this version of meanflow reads formats "
                         f"{list(KNOWN_FORMATS)}. Upgrade meanflow to read it")
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it is not the trainer state of a complete checkpoint. "
                         f"{_use_another(path.parent)}")
    step = data.get("step")
    if "step" in required and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"{path} has step {step!r}, not an integer >= 0. {_use_another(path.parent)}")
    optimizer = data.get("optimizer")
    if "optimizer" in required and not (isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)
                                        and isinstance(optimizer.get("scalars"), dict)):
        raise ValueError(f"{path} has no valid 'optimizer' entry (an object with 'param_groups' and 'scalars'). "
                         f"{_use_another(path.parent)}")
    return TrainerState(data, path)


def _not_safetensors(path: Path, head: bytes, size: int) -> str:
    """Why a file whose first bytes are ``head`` cannot be a safetensors file."""
    never = ("a pickle can run any code, so meanflow reads checkpoints only as safetensors and JSON and never "
             "unpickles a file. Save the tensors with safetensors.torch.save_file in the program that made them")
    if head.startswith(b"PK\x03\x04"):
        return f"{path} is a zip archive (the format of torch.save), not a safetensors file, and is refused: {never}"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocols 2-5
        return f"{path} holds pickled data (torch.save's legacy format), not safetensors, and is refused: {never}"
    if len(head) < 8:
        return (f"{path} is truncated: {size} bytes, fewer than the 8 of a safetensors header length. "
                f"{_use_another(path.parent)}")
    length = struct.unpack("<Q", head[:8])[0]
    return (f"{path} is not a complete safetensors file: its header length field says {length} bytes, but the file "
            f"holds {size - 8} after it (truncated, or not a safetensors file at all). {_use_another(path.parent)}")


def _check_safetensors(path: Path) -> None:
    """Refuse, with a message saying why, a file that is missing, truncated or not safetensors
    at all, before the safetensors reader sees it (its own errors name neither file nor cause)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the checkpoint is incomplete. {_use_another(path.parent)}") from None
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > size - 8:
            raise ValueError(_not_safetensors(path, head, size))
        header = handle.read(length)
    try:
        entries = json.loads(header)
        end = max((int(entry["data_offsets"][1]) for key, entry in entries.items() if key != "__metadata__"),
                  default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ValueError(f"{path} has a damaged safetensors header (not the JSON table of its tensors). "
                         f"{_use_another(path.parent)}") from None
    stored = size - 8 - length
    if stored < end:
        raise ValueError(f"{path} is truncated: its header describes {end} bytes of tensor data but the file holds "
                         f"{stored}. {_use_another(path.parent)}")


def load_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of one ``.safetensors`` file, on the CPU; a damaged file is a ``ValueError``
    naming it. Never unpickles: safetensors holds raw tensor bytes and a JSON header."""
    path = Path(path)
    _check_safetensors(path)
    from safetensors import SafetensorError

    try:
        return _safetensors().load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{path} could not be read as safetensors ({error}). {_use_another(path.parent)}") from None


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint folder (or the latest one under a run / checkpoints folder)."""
    path = resolve_checkpoint(path)
    trainer = read_trainer_state(path, required=("step", "optimizer"))
    return Checkpoint(path=path, model=load_tensors(path / "model.safetensors"),
                      ema=load_tensors(path / "ema.safetensors"),
                      optimizer=load_tensors(path / "optimizer.safetensors"), trainer=trainer)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint inside a run or checkpoints folder."""
    path = Path(path)
    if (path / TRAINER_FILE).exists():
        return path
    for root in (path, path / "checkpoints"):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    if _FOLDER.match(path.name) and path.is_dir():
        raise ValueError(f"{path} is an incomplete checkpoint folder (it lacks {', '.join(missing_files(path))}). "
                         f"{_use_another(path)}")
    raise ValueError(f"no checkpoint at {path}: expected a step_<n> folder with trainer.json, or a run folder "
                     f"holding checkpoints/")


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
    trainer = read_trainer_state(path, required=("step",))
    return path, load_tensors(path / "model.safetensors"), load_tensors(path / "ema.safetensors"), trainer
