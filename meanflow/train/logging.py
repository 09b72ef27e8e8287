"""Run logs: a JSONL file always, TensorBoard when asked for (rank 0 only).

``metrics.jsonl`` is only ever appended to, one whole line per ``os.write`` on a file opened for
appending, so every line is in the file (the OS's page cache) as soon as it is logged; the loop
calls :meth:`MetricsLog.sync` before each checkpoint, so the lines a checkpoint resumes from are
on disk before it is. On resume the file is cut back, never rewritten: lines past the resumed
step and a last line torn by a kill are dropped by truncating the file after the last line kept.
"""

from __future__ import annotations

import json
import os
import resource
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

import torch

METRICS_FILE = "metrics.jsonl"


def memory_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, the process's peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # VmHWM: this process image's peak RSS (ru_maxrss can carry a parent's peak over exec)
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl``; mirrors scalars (and sample
    grids) to TensorBoard under ``tensorboard/`` when enabled. On open, lines past ``resumed_step``
    (left by a run that died after logging but before its next checkpoint) and a torn last line
    are dropped (:func:`cut_back`)."""

    def __init__(self, folder: Path, resumed_step: int, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.descriptor: Optional[int] = None
        self.writer = None
        if not enabled:
            return
        path = Path(folder) / METRICS_FILE
        if path.exists():
            cut_back(path, resumed_step)
        self.descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("training.tensorboard=true needs the 'tensorboard' package: "
                                  "pip install tensorboard") from None
            self.writer = SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, metrics: dict) -> None:
        """Append one line (written to the file before this returns)."""
        if not self.enabled:
            return
        _write_all(self.descriptor, (json.dumps(metrics) + "\n").encode("utf-8"))
        if self.writer is not None:
            step = int(metrics["step"])
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def sync(self) -> None:
        """Make every line written so far durable (called before each checkpoint)."""
        if self.descriptor is not None:
            os.fsync(self.descriptor)
        if self.writer is not None:
            self.writer.flush()

    def images(self, paths, step: int) -> None:
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        for path in paths:
            array = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(f"samples/{Path(path).stem.split('_')[-1]}", array, step, dataformats="HWC")

    def close(self) -> None:
        if self.descriptor is not None:
            os.fsync(self.descriptor)
            os.close(self.descriptor)
            self.descriptor = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _write_all(descriptor: int, data: bytes) -> None:
    while data:
        data = data[os.write(descriptor, data):]


def cut_back(path: Path, resumed_step: int) -> None:
    """Drop the lines of ``path`` past ``resumed_step``, and a torn or damaged tail, by truncating
    the file after the last complete line of a step <= ``resumed_step``. Lines before it are
    never rewritten; only the tail that is dropped is read. Warns when a torn or damaged line
    was dropped (lines past the resumed step are expected after a kill, and go silently)."""
    torn, damaged = 0, 0
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        keep, newline = 0, True
        for offset, line in _lines_from_end(handle, size):
            step = _step_of(line)
            if step is not None and step <= resumed_step:
                keep, newline = offset + len(line), line.endswith(b"\n")
                break
            if not line.endswith(b"\n"):
                torn = len(line)  # only the last line can lack its newline
            elif step is None and line.strip():
                damaged += 1
        if keep < size:
            handle.truncate(keep)
        if not newline:  # a complete object whose newline the kill cut off
            handle.seek(keep)
            handle.write(b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    problems = ([f"a torn last line ({torn} bytes, cut short by a kill while it was written)"] if torn else []) + (
        [f"{damaged} damaged line(s) after the last line of step <= {resumed_step}"] if damaged else [])
    if problems:
        warnings.warn(f"{path}: dropped {' and '.join(problems)}; every complete line up to step {resumed_step} "
                      f"is kept", RuntimeWarning, stacklevel=3)


def _step_of(line: bytes) -> Optional[float]:
    """The step of one complete metrics line (a JSON object; 0 when it names none), else None."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    step = record.get("step", 0) if isinstance(record, dict) else None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def _lines_from_end(handle: BinaryIO, size: int, block: int = 1 << 16) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of each line of the file, the last first, reading backwards in blocks. A
    line's bytes end with its newline (the last line's may not)."""
    position, buffer = size, b""
    while True:
        cut = buffer.rfind(b"\n", 0, max(len(buffer) - 1, 0))  # the previous line's newline
        if cut >= 0:
            yield position + cut + 1, buffer[cut + 1:]
            buffer = buffer[:cut + 1]
        elif position > 0:
            count = min(block, position)
            position -= count
            handle.seek(position)
            buffer = handle.read(count) + buffer
        else:
            if buffer:
                yield 0, buffer
            return
