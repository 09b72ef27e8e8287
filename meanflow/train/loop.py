"""The training loop: data -> objective.loss -> backward -> clip -> optimizer -> EMA, with
periodic logs, checkpoints and sample grids. The same code runs as one process or under
``torchrun``; re-running the same command resumes; SIGTERM / SIGINT checkpoint and stop.
"""

from __future__ import annotations

import gc
import math
import random
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer,
    optimizer_tensors,
    save_checkpoint,
)
from ..config import Config
from ..data import DataInfo, build_source
from ..models import build_model
from .distributed import Distributed, gather_full, init_distributed, shard_like, shard_model, shutdown
from .ema import EMA
from .logging import MetricsLog, memory_mib
from .objective_factory import build_objective
from .progress import Progress
from .sample_grids import write_sample_grids


@dataclass
class TrainResult:
    """Where a run left its files, and how it ended."""

    output_dir: Path
    checkpoint: Optional[Path]
    grids: list[Path]
    step: int
    metrics: dict
    skipped_steps: int = 0
    interrupted: bool = False
    extra: dict = field(default_factory=dict)
    is_main: bool = True  # False on torchrun ranks other than 0, which write no files


def check_model_matches_data(config: Config, info: DataInfo) -> None:
    """Refuse a model whose input shape or classes disagree with the data, before training."""
    options = config.model.options
    shape = info.sample_shape
    problems = []
    if "data_dim" in options and (len(shape) != 1 or options["data_dim"] != shape[0]):
        problems.append(f"model.options.data_dim={options['data_dim']} but samples have shape {shape}")
    if "input_size" in options and (len(shape) != 3 or options["input_size"] != shape[-1]):
        problems.append(f"model.options.input_size={options['input_size']} but images have shape {shape}")
    if "in_channels" in options and (len(shape) != 3 or options["in_channels"] != shape[0]):
        problems.append(f"model.options.in_channels={options['in_channels']} but images have shape {shape}")
    if options.get("num_classes") != info.num_classes:
        problems.append(f"model.options.num_classes={options.get('num_classes')} but the data has "
                        f"{info.num_classes if info.num_classes else 'no'} classes (data.class_conditional="
                        f"{config.data.class_conditional})")
    if problems:
        raise ValueError("the model does not fit the data:\n  " + "\n  ".join(problems))


def _rng_state(generator: torch.Generator) -> dict:
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


def _restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(torch.tensor(state["objective"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Everything one training process holds. Use :func:`train`; the class is its machinery."""

    def __init__(self, config: Config, output_dir: Path, progress: bool = True):
        self.config, self.output_dir, self.show_progress = config, Path(output_dir), progress
        settings = config.training
        self.dist: Distributed = init_distributed(settings.device)
        world = self.dist.world_size
        if settings.batch_size % world:
            raise ValueError(f"training.batch_size={settings.batch_size} must be divisible by the number of "
                             f"processes ({world})")
        self.local_batch = settings.batch_size // world
        device = self.dist.device
        if device.type == "cuda" and settings.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        seed = settings.seed + 1_000_003 * self.dist.rank  # per-rank noise, shared data order
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        random.seed(seed)
        self.source, self.info = build_source(config.data, self.local_batch, settings.seed, self.dist.rank, world)
        check_model_matches_data(config, self.info)
        torch.manual_seed(settings.seed)  # identical initial weights on every rank
        self.model = build_model(config.model.architecture, config.model.options).to(device)
        torch.manual_seed(seed)
        self.sharded = self.dist.enabled and settings.parallel == "fsdp"
        if self.sharded:
            shard_model(self.model)  # before the optimizer and EMA, so their state is sharded too
        self.objective = build_objective(config.objective, self.info.num_classes, data_parallel=self.dist.enabled,
                                         sharded=self.sharded)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                           weight_decay=config.optim.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, warmup=config.optim.warmup_steps, total=settings.steps,
                                    decay=config.optim.decay))
        self.ema = EMA(self.model, settings.ema_decays, settings.ema_period)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.network: nn.Module = self.model  # what the gradient forward goes through
        if self.dist.enabled and not self.sharded:
            self.network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if settings.compile:
            self.network = torch.compile(self.network, backend=settings.compile)
        self.step = 0
        self.skipped = 0
        self.consecutive_skips = 0
        self.checkpoints = self.output_dir / "checkpoints"

    # -- state ------------------------------------------------------------------------------
    def resume(self) -> Optional[Path]:
        path = latest_checkpoint(self.checkpoints)
        if path is None:
            return None
        state = load_checkpoint(path)
        current = self.model.state_dict()
        check_compatible({k: v for k, v in current.items()}, state.model)
        self.model.load_state_dict({k: shard_like(state.model[k], v) for k, v in current.items()})
        self.ema.load_state_tensors(state.ema)
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        optimizer_state = {}
        for key, value in state.optimizer.items():
            index = int(key.split("/", 1)[0])
            like = parameters[index]
            optimizer_state[key] = shard_like(value, like) if value.shape == like.shape else value
        load_optimizer(self.optimizer, optimizer_state, state.trainer["optimizer"])
        self.schedule.load_state_dict(state.trainer["schedule"])
        self.source.load_state_dict(state.trainer["data"])
        ranks = state.trainer["rng"]
        if len(ranks) != self.dist.world_size:
            raise ValueError(f"the checkpoint was written by {len(ranks)} processes; resuming with "
                             f"{self.dist.world_size} would not reproduce the run (use the same number)")
        _restore_rng(ranks[self.dist.rank], self.generator)
        self.step = state.step
        self.skipped = int(state.trainer.get("skipped_steps", 0))
        return path

    def save(self) -> Optional[Path]:
        """Write a checkpoint (rank 0) after gathering every rank's RNG state."""
        rng = self.dist.gather_objects(_rng_state(self.generator))
        # Full tensors on every rank's CPU (collectives under FSDP), written by rank 0 alone.
        model_state = {k: gather_full(v) for k, v in self.model.state_dict().items()}
        ema_state = {k: gather_full(v) for k, v in self.ema.state_tensors().items()}
        optimizer_state, optimizer_data = optimizer_tensors(self.optimizer)
        optimizer_state = {k: gather_full(v) for k, v in optimizer_state.items()}
        path = None
        if self.dist.is_main:
            trainer = {
                "config": self.config.to_dict(),
                "model": {"architecture": self.config.model.architecture, "options": self.config.model.options},
                "data_info": {"sample_shape": list(self.info.sample_shape), "num_classes": self.info.num_classes,
                              "kind": self.info.kind},
                "ema_names": list(self.ema.names),
                "schedule": self.schedule.state_dict(),
                "data": self.source.state_dict(),
                "rng": rng,
                "skipped_steps": self.skipped,
                "world_size": self.dist.world_size,
            }
            settings = self.config.training
            path = save_checkpoint(self.checkpoints, self.step, model_state, ema_state,
                                   (optimizer_state, optimizer_data), trainer, keep_last=settings.keep_checkpoints,
                                   milestone_every=settings.milestone_every)
        self.dist.barrier()
        return path

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, autocast) -> Optional[dict[str, float]]:
        """One optimizer step; None if it was skipped for a non-finite loss or gradient."""
        x, labels = self.source.next_batch()
        device = self.dist.device
        x = x.to(device, non_blocking=True)
        labels = None if labels is None else labels.to(device, non_blocking=True)
        with autocast:
            out = self.objective.loss(self.network, x, labels, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        clip = self.config.optim.grad_clip if self.config.optim.grad_clip is not None else math.inf
        # The gradient norm is taken after DDP's all-reduce, so every rank sees the same value and
        # makes the same skip decision.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        finite = bool(torch.isfinite(grad_norm)) and not self.dist.any(not bool(torch.isfinite(out.loss)))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.consecutive_skips += 1
            message = (f"non-finite loss or gradient at step {self.step + 1} (loss {float(out.loss.detach()):.4g}, "
                       f"gradient norm {float(grad_norm):.4g})")
            if self.config.training.on_nonfinite == "stop":
                raise FloatingPointError(message + "; stopping (training.on_nonfinite='stop'). The last "
                                         "checkpoint is intact; lower optim.lr or set optim.grad_clip")
            if self.consecutive_skips >= self.config.training.max_consecutive_skips:
                raise FloatingPointError(message + f"; {self.consecutive_skips} steps in a row were skipped, "
                                         "stopping. The last checkpoint is intact; lower optim.lr or set "
                                         "optim.grad_clip")
            return None
        self.consecutive_skips = 0
        self.optimizer.step()
        self.schedule.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        metrics = {key: float(value) for key, value in out.metrics.items()}
        metrics["grad_norm"] = float(grad_norm)
        return metrics

    def parameters_in_sync(self) -> bool:
        """True if every rank holds the same weights (a cheap checksum all-reduce)."""
        if not self.dist.enabled:
            return True
        if self.sharded:  # each rank holds a different shard by design
            return True
        checksum = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum().reshape(1)
        gathered = self.dist.gather_objects(float(checksum))
        return all(value == gathered[0] for value in gathered)

    # -- the loop ---------------------------------------------------------------------------
    def run(self, max_steps: Optional[int] = None) -> TrainResult:
        settings = self.config.training
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resumed_from = self.resume()
        if self.dist.is_main:
            self.config.save(self.output_dir / "config.json")
        log = MetricsLog(self.output_dir, self.step, enabled=self.dist.is_main, tensorboard=settings.tensorboard)
        last = min(settings.steps, max_steps) if max_steps is not None else settings.steps
        autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")
        bar = Progress(total=last, initial=self.step, enabled=self.show_progress and self.dist.is_main)
        window: dict[str, float] = {}
        count, started, latest = 0, time.perf_counter(), {}
        grids: list[Path] = []
        checkpoint = resumed_from
        saved = resumed_from is not None  # on every rank (only rank 0 gets a path back from save)
        interrupted = False
        self.network.train()
        try:
            with _StopRequest() as stop:
                while self.step < last:
                    metrics = self.train_step(autocast)
                    if metrics is not None:
                        for key, value in metrics.items():
                            window[key] = window.get(key, 0.0) + value
                        count += 1
                        bar.update(loss=metrics["loss"], error=metrics["unweighted_error"])
                    step = self.step
                    if metrics is not None and (step % settings.log_every == 0 or step == last):
                        elapsed = time.perf_counter() - started
                        latest = self.dist.mean_of({key: value / count for key, value in window.items()})
                        latest.update(step=step, lr=self.optimizer.param_groups[0]["lr"],
                                      samples_per_second=count * settings.batch_size / max(elapsed, 1e-9),
                                      skipped_steps=self.skipped, memory_mib=memory_mib(self.dist.device))
                        log.write(latest)
                        window, count, started = {}, 0, time.perf_counter()
                    if metrics is not None and (step % settings.checkpoint_every == 0 or step == last):
                        checkpoint, saved = self.save(), True
                    if metrics is not None and settings.sample_every and step % settings.sample_every == 0 \
                            and step != last:
                        grids += self._grids(log)
                    if self.dist.any(stop.requested):
                        interrupted = True
                        checkpoint, saved = self.save(), True
                        break
            bar.close()
            if not saved:  # nothing left to train and no checkpoint yet
                checkpoint = self.save()
            if not self.parameters_in_sync():
                raise RuntimeError("ranks hold different weights: gradient synchronisation failed")
            if not interrupted:
                grids += self._grids(log)
        finally:
            log.close()
            bar.close()
        return TrainResult(self.output_dir, checkpoint, grids, self.step, latest, self.skipped, interrupted,
                           is_main=self.dist.is_main)

    def _grids(self, log: MetricsLog) -> list[Path]:
        """Sample grids from the first EMA copy; every rank takes part in gathering the weights
        (sharded under FSDP), rank 0 samples from a plain copy of the model."""
        weights = {k: gather_full(v) for k, v in self.ema.shadows[self.ema.names[0]].items()}
        if not self.dist.is_main:
            return []
        model = build_model(self.config.model.architecture, self.config.model.options)
        model.load_state_dict(weights, strict=False)
        model = model.to(self.dist.device).eval()
        paths = write_sample_grids(model, self.config, self.info, self.output_dir / "samples", self.step,
                                   self.dist.device)
        log.images(paths, self.step)
        return paths


def lr_factor(step: int, warmup: int, total: int, decay: str) -> float:
    """The multiplier of the base lr at optimizer step ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then 1 ('constant') or a half cosine from 1 to 0 at ``total`` ('cosine')."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train(config: Config, output_dir: str | Path, progress: bool = True, max_steps: Optional[int] = None) -> TrainResult:
    """Train (or resume) the run described by ``config`` in ``output_dir``.

    If ``output_dir/checkpoints`` holds a checkpoint, training continues from it: weights, EMA,
    optimizer, schedule, step, every rank's RNG state and the data position are restored, so the
    result is bit-identical to an uninterrupted run on the same machine. ``max_steps`` stops
    after that many steps in total (``config.training.steps`` stays the schedule's length).
    Under torchrun every process calls this; rank 0 writes the files.
    """
    trainer = Trainer(config, Path(output_dir), progress)
    try:
        result = trainer.run(max_steps)
    except BaseException:
        shutdown(trainer.dist, together=False)
        raise
    context = trainer.dist
    # The DDP / FSDP wrappers hold gloo work objects; destroyed after their process group (at
    # interpreter exit) they abort the process. Drop them first.
    del trainer
    gc.collect()
    shutdown(context)
    return result


__all__ = ["TrainResult", "Trainer", "train", "check_model_matches_data"]
