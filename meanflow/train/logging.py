"""Run logs: a JSONL file always, TensorBoard when asked for (rank 0 only)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


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
    grids) to TensorBoard under ``tensorboard/`` when enabled. Lines past ``resumed_step`` (left
    by a run that died after logging but before its next checkpoint) are dropped on open."""

    def __init__(self, folder: Path, resumed_step: int, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.file = None
        self.writer = None
        if not enabled:
            return
        path = Path(folder) / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("training.tensorboard=true needs the 'tensorboard' package: "
                                  "pip install tensorboard") from None
            self.writer = SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = int(metrics["step"])
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def images(self, paths, step: int) -> None:
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        for path in paths:
            array = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(f"samples/{Path(path).stem.split('_')[-1]}", array, step, dataformats="HWC")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
