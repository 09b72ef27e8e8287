"""A progress bar with figures, rate and ETA (tqdm when installed, plain lines otherwise).

Training, sampling, encoding and evaluation all count their progress here. The bar only ever
receives host numbers: ``update`` advances it and ``show`` changes the figures it displays, so a
caller that keeps its metrics on the device calls ``show`` when it has read them anyway (the
training loop: at its logging interval) and the bar forces no device synchronisation.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """``update(count)`` as work is done, ``show(**figures)`` now and then, ``close()`` at the end.

    Args:
        total: the amount of work (steps, batches, images).
        initial: the amount already done (a resumed run).
        enabled: False turns every call into a no-op (other ranks, ``--no-progress``).
        every: without tqdm, print a line every this many units.
        unit: what is counted, for the display.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, every: int = 100, unit: str = "step"):
        self.total, self.count, self.enabled, self.every, self.unit = total, initial, enabled, every, unit
        self.started, self.start_count = time.perf_counter(), initial
        self.figures: dict[str, float] = {}
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit=unit)

    def update(self, count: int = 1) -> None:
        """Advance by ``count`` units."""
        previous, self.count = self.count, self.count + count
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(count)
        elif self.count // self.every > previous // self.every or self.count == self.total:
            self._print_line()

    def show(self, **figures: float) -> None:
        """Display these figures (host floats, e.g. the loss of the last logging window) from now on."""
        self.figures = dict(figures)
        if self.enabled and self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in figures.items()}, refresh=False)

    def _print_line(self) -> None:
        rate = (self.count - self.start_count) / max(time.perf_counter() - self.started, 1e-9)
        eta = (self.total - self.count) / max(rate, 1e-9)
        shown = "".join(f" {k}={v:.4g}" for k, v in self.figures.items())
        print(f"{self.unit} {self.count}/{self.total}{shown} {rate:.1f} {self.unit}/s eta {eta:.0f}s",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["Progress"]
