"""A progress bar with loss, it/s and ETA (tqdm when installed, plain lines otherwise)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``update(**metrics)`` once per step; ``close()`` at the end."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, every: int = 100):
        self.total, self.count, self.enabled, self.every = total, initial, enabled, every
        self.started, self.start_count = time.perf_counter(), initial
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")

    def update(self, **metrics: float) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if self.count % 10 == 0 or self.count == self.total:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        elif self.count % self.every == 0 or self.count == self.total:
            rate = (self.count - self.start_count) / max(time.perf_counter() - self.started, 1e-9)
            eta = (self.total - self.count) / max(rate, 1e-9)
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            print(f"step {self.count}/{self.total} {shown} {rate:.1f} it/s eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
