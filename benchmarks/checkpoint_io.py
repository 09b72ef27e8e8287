"""Checkpoint write / read time and size for each paper preset's model (model + EMA + AdamW).

    python benchmarks/checkpoint_io.py                      # all presets (XL/2 needs ~15 GB RAM)
    python benchmarks/checkpoint_io.py --presets imagenet256-b4 cifar10

The optimizer state is materialised by one AdamW step with zero gradients; one EMA copy.
Writes go through the same atomic path as training (temp folder, fsync, rename). A read is what
resuming does: load the three files and copy the weights into the model; every tensor is touched
(safetensors memory-maps lazily). Before each read the page cache is dropped when the process may
(root on Linux: a cold read from disk); otherwise the read comes from the cache, as the table says.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from meanflow.checkpoint import load_checkpoint, optimizer_tensors, save_checkpoint
from meanflow.models import build_model
from meanflow.presets import preset
from meanflow.train.ema import EMA

DEFAULT = ["imagenet256-b4", "imagenet256-b2", "imagenet256-m2", "imagenet256-l2", "imagenet256-xl2", "cifar10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", default=DEFAULT)
    parser.add_argument("--folder", help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    rows = []
    for name in args.presets:
        config = preset(name)
        model = build_model(config.model.architecture, config.model.options)
        parameters = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        ema = EMA(model, (0.9999,))
        root = Path(tempfile.mkdtemp(dir=args.folder))
        started = time.perf_counter()
        path = save_checkpoint(root, 1, model.state_dict(), ema.state_tensors(), optimizer_tensors(optimizer),
                               {"config": config.to_dict()}, keep_last=1)
        write = time.perf_counter() - started
        size = sum(f.stat().st_size for f in path.iterdir())
        cold = drop_page_cache()
        started = time.perf_counter()
        loaded = load_checkpoint(path)
        model.load_state_dict(loaded.model)
        touched = sum(float(t.float().sum()) for t in (*loaded.ema.values(), *loaded.optimizer.values()))
        read = time.perf_counter() - started
        assert math.isfinite(touched), "non-finite tensors read back"
        del loaded
        shutil.rmtree(root)
        rows.append((name, parameters, size, write, read, cold))
        del model, optimizer, ema
        print(f"{name}: done", flush=True)
    print("\n| preset | parameters | checkpoint size | write (s) | write GiB/s | read (s) | read from |")
    print("|---|---|---|---|---|---|---|")
    for name, parameters, size, write, read, cold in rows:
        print(f"| {name} | {parameters / 1e6:.1f}M | {size / 2**30:.2f} GiB | {write:.1f} | {size / 2**30 / write:.2f} "
              f"| {read:.1f} | {'disk' if cold else 'page cache'} |")


def drop_page_cache() -> bool:
    """Flush and drop the Linux page cache; False when not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
