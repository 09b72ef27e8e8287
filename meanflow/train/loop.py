"""The training loop: data -> objective.loss -> backward -> clip -> optimizer -> EMA, with
periodic logs, checkpoints and sample grids. The same code runs as one process or under
``torchrun``; re-running the same command resumes; SIGTERM / SIGINT checkpoint and stop.

This module wires the run's parts together (:class:`Trainer`) and runs the loop; one step is
:mod:`.step`, what a checkpoint holds is :mod:`.state`, the lr schedule :mod:`.schedule`, the
stop request :mod:`.signals`, and the metrics of a logging window :mod:`.metrics`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..checkpoint import latest_checkpoint
from ..config import Config, DataConfig
from ..conventions import Batch
from ..data import DataInfo, build_source
from ..data.memory import InMemoryData, as_in_memory_data, memory_source
from ..distributed import Distributed, gather_state, init_distributed, shard_model, shutdown
from ..errors import NonFiniteStepWarning
from ..models import build_model, enable_activation_checkpointing
from .compiled import CompiledStepLoss, compiles_whole_step
from ..objectives import build_objective
from ..progress import Progress
from ..run_record import RUN_FILE, RunRecord, build_record
from .config_changes import apply_optimizer_settings, check_resume
from .ema import EMA
from .logging import MetricsLog, memory_mib
from .metrics import MetricWindow
from .sample_grids import write_sample_grids
from .schedule import build_schedule
from .signals import StopRequest
from .state import TrainingState, restore_state, save_state
from .step import NonFinitePolicy, StepOutcome, TrainStep


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
        problems.append(_classes_problem(config, options.get("num_classes"), info.num_classes))
    if problems:
        raise ValueError("the model does not fit the data:\n  " + "\n  ".join(problems))


def _classes_problem(config: Config, model_classes: Optional[int], data_classes: Optional[int]) -> str:
    """Why the model's classes and the data's disagree, and the setting that fixes it: as ``--set``
    spells it, or for samples passed to ``train()`` (Python only) the model option's Python value."""
    found = f"the data has {data_classes if data_classes else 'no'} classes"
    if config.data.name == "memory":
        return (f"model.options.num_classes={model_classes!r} but {found} (labels= given to train()); "
                f"use model.options.num_classes={data_classes!r}")
    if data_classes is None:
        return (f"model.options.num_classes={json.dumps(model_classes)} but {found} (data.class_conditional is "
                f"{json.dumps(config.data.class_conditional)}); use --set model.options.num_classes=null, or "
                "--set data.class_conditional=true")
    return (f"model.options.num_classes={json.dumps(model_classes)} but {found} (labels 0..{data_classes - 1}); "
            f"use --set model.options.num_classes={data_classes}")


# A skipped non-finite step warns the first time and then every this many skips.
SKIP_WARNING_EVERY = 10


class Trainer:
    """Everything one training process holds. Use :func:`train`; the class is its machinery.

    ``data``: validated in-memory samples (``config.data.name == "memory"``), or None to build
    the data set ``config.data`` names.
    """

    def __init__(self, config: Config, output_dir: Path, progress: bool = True,
                 data: Optional[InMemoryData] = None):
        self.config, self.output_dir, self.show_progress = config, Path(output_dir), progress
        settings = config.training
        self.dist: Distributed = init_distributed(settings.device)
        if settings.batch_size % self.dist.world_size:
            raise ValueError(f"training.batch_size={settings.batch_size} must be divisible by the number of "
                             f"processes ({self.dist.world_size})")
        device = self.dist.device
        if device.type == "cuda" and settings.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed = settings.seed + 1_000_003 * self.dist.rank  # per-rank noise, shared data order
        _seed_everything(seed)
        source, self.info = self._data_source(data, settings.batch_size // self.dist.world_size)
        check_model_matches_data(config, self.info)
        torch.manual_seed(settings.seed)  # identical initial weights on every rank
        model = build_model(config.model.architecture, config.model.options).to(device)
        if settings.activation_checkpointing:
            enable_activation_checkpointing(model, config.model.architecture)
        torch.manual_seed(seed)
        self.sharded = self.dist.enabled and settings.parallel == "fsdp"
        if self.sharded:
            shard_model(model)  # before the optimizer and EMA, so their state is sharded too
        self.objective = build_objective(config.objective.method, config.objective.settings, self.info.num_classes,
                                         model=model, data_parallel=self.dist.enabled, sharded=self.sharded)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                      weight_decay=config.optim.weight_decay)
        schedule = build_schedule(optimizer, config.optim.warmup_steps, settings.steps, config.optim.decay)
        ema = EMA(model, settings.ema_decays, settings.ema_period)
        generator = torch.Generator(device=device).manual_seed(seed)
        self.state = TrainingState(model, ema, optimizer, schedule, source, generator)
        self.network = self._wrap(model)
        self.policy = NonFinitePolicy(settings.on_nonfinite, settings.max_consecutive_skips)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")
        loss = self.objective.loss
        if settings.compile and compiles_whole_step(self.objective, model, self.dist.enabled):
            loss = CompiledStepLoss(self.objective, settings.compile)
        self.take_step = TrainStep(self.network, model, loss, optimizer, schedule, ema, self.policy,
                                   self.dist, config.optim.grad_clip, autocast)
        self.record = build_record(config, self.info.encoder, self.objective, self.info.num_classes, ema.names)
        self.checkpoints = self.output_dir / "checkpoints"
        self.latest: dict[str, Any] = {}  # the last logged metrics
        self.checkpoint: Optional[Path] = None  # the newest checkpoint (rank 0 knows its path)
        self.saved = False  # whether this process wrote (or resumed from) a checkpoint
        self.skipped_here = 0  # non-finite steps this process skipped (the rate of their warnings)

    def _data_source(self, data: Optional[InMemoryData], local_batch: int):
        settings, rank, world = self.config.training, self.dist.rank, self.dist.world_size
        if data is None:
            return build_source(self.config.data, local_batch, settings.seed, rank, world,
                                num_classes=self.config.model.options.get("num_classes"))
        return memory_source(data, self.config.data, local_batch, settings.seed, rank, world,
                             num_classes=self.config.model.options.get("num_classes"))

    def _wrap(self, model: nn.Module) -> nn.Module:
        """What the gradient forward goes through: DDP for replicas, then torch.compile if asked."""
        network = model
        if self.dist.enabled and not self.sharded:
            device = self.dist.device
            network = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if self.config.training.compile and not compiles_whole_step(self.objective, model, self.dist.enabled):
            network = torch.compile(network, backend=self.config.training.compile)
        return network

    @property
    def step(self) -> int:
        return self.state.step

    # -- state ------------------------------------------------------------------------------
    def resume(self) -> Optional[Path]:
        """Continue from the newest checkpoint of this run folder, if there is one."""
        path = latest_checkpoint(self.checkpoints)
        if path is not None:
            changes = check_resume(RunRecord.load(path).config, self.config)
            restore_state(self.state, self.dist, path)
            if changes:  # allowed by training.allow_changed_config: the new settings apply from here
                apply_optimizer_settings(self.state.optimizer, self.state.schedule, self.config.optim)
                if self.dist.is_main:
                    print(f"resuming with changed settings: {'; '.join(changes)}", file=sys.stderr, flush=True)
        return path

    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step (every rank takes part; rank 0 writes)."""
        settings = self.config.training
        return save_state(self.state, self.dist, self.checkpoints, {RUN_FILE: self.record.to_json()},
                          settings.keep_checkpoints, settings.milestone_every)

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, stop: Optional[StopRequest] = None) -> StepOutcome:
        """One optimizer step on the next batch (see :class:`TrainStep`); counts a skipped step."""
        x, labels = self.state.source.next_batch()
        device = self.dist.device
        batch = Batch(x.to(device, non_blocking=True),
                      None if labels is None else labels.to(device, non_blocking=True))
        outcome = self.take_step(batch, self.state.step, self.state.step / self.config.training.steps,
                                 self.state.generator, stop)
        if outcome.taken:
            self.state.step += 1
        else:
            self.state.skipped += 1
            self._warn_skipped(outcome.skipped_because)
        return outcome

    def _warn_skipped(self, reason: Optional[str]) -> None:
        """A :class:`NonFiniteStepWarning` for the first skipped step and every
        :data:`SKIP_WARNING_EVERY`-th after it, from rank 0 (every rank skips the same steps)."""
        self.skipped_here += 1
        if not self.dist.is_main or (self.skipped_here > 1 and self.skipped_here % SKIP_WARNING_EVERY):
            return
        limit = self.config.training.max_consecutive_skips
        warnings.warn(NonFiniteStepWarning(
            f"{reason}: skipped, {self.state.skipped} so far (this warning: the 1st skip, then every "
            f"{SKIP_WARNING_EVERY}th; the run stops after {limit} in a row)"), stacklevel=3)

    def parameters_in_sync(self) -> bool:
        """True if every rank holds the same weights (a cheap checksum all-reduce)."""
        if not self.dist.enabled or self.sharded:  # sharded: each rank holds a different shard by design
            return True
        checksum = torch.stack([p.detach().double().sum() for p in self.state.model.parameters()]).sum()
        gathered = self.dist.gather_objects(float(checksum))
        return all(value == gathered[0] for value in gathered)

    # -- the loop ---------------------------------------------------------------------------
    def run(self, max_steps: Optional[int] = None, stop: Optional[StopRequest] = None) -> TrainResult:
        """Train from the newest checkpoint (if any) to ``training.steps`` (or ``max_steps``).

        ``stop``: an active stop request to read after each step (:func:`train` holds one until
        its last collective); by default the loop holds its own while it steps.
        """
        settings = self.config.training
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint = self.resume()
        self.saved = self.checkpoint is not None
        if self.dist.is_main:
            self.config.save(self.output_dir / "config.json")
        log = MetricsLog(self.output_dir, self.step, enabled=self.dist.is_main, tensorboard=settings.tensorboard)
        last = min(settings.steps, max_steps) if max_steps is not None else settings.steps
        bar = Progress(total=last, initial=self.step, enabled=self.show_progress and self.dist.is_main)
        window, grids, interrupted = MetricWindow(), [], False
        self.network.train()
        try:
            with contextlib.nullcontext(stop) if stop is not None else StopRequest() as request:
                while self.step < last:
                    outcome = self.train_step(request)
                    if outcome.taken:
                        window.add(outcome.metrics)
                        bar.update()
                        grids += self._periodic(window, log, bar, last)
                    if outcome.stop_requested:
                        interrupted = True
                        self._checkpoint_now()
                        break
            if not self.saved:  # nothing left to train and no checkpoint yet
                self._checkpoint_now()
            if not self.parameters_in_sync():
                raise RuntimeError("ranks hold different weights: gradient synchronisation failed")
            if not interrupted:
                grids += self._grids(log)
        finally:
            log.close()
            bar.close()
        return TrainResult(self.output_dir, self.checkpoint, grids, self.step, self.latest, self.state.skipped,
                           interrupted, is_main=self.dist.is_main)

    def _periodic(self, window: MetricWindow, log: MetricsLog, bar: Progress, last: int) -> list[Path]:
        """After a step that was taken: log at ``log_every``, checkpoint at ``checkpoint_every``,
        grids at ``sample_every`` (and log and checkpoint at the last step). Returns the grids."""
        settings, step = self.config.training, self.step
        if step % settings.log_every == 0 or step == last:
            reading = window.read(self.dist)  # the window's one host read
            self.latest = dict(reading.means, step=step, lr=self.state.optimizer.param_groups[0]["lr"],
                               samples_per_second=reading.steps * settings.batch_size / max(reading.seconds, 1e-9),
                               skipped_steps=self.state.skipped, memory_mib=memory_mib(self.dist.device))
            log.write(self.latest)
            bar.show(**{key: self.latest[key] for key in ("loss", "unweighted_error") if key in self.latest})
        if step % settings.checkpoint_every == 0 or step == last:
            log.sync()  # the lines this checkpoint resumes from reach the disk before it does
            self._checkpoint_now()
        if settings.sample_every and step % settings.sample_every == 0 and step != last:
            return self._grids(log)
        return []

    def _checkpoint_now(self) -> None:
        self.checkpoint, self.saved = self.save(), True

    def _grids(self, log: MetricsLog) -> list[Path]:
        """Sample grids from the first EMA copy: every rank takes part in gathering the weights
        (sharded under FSDP), rank 0 alone keeps them and samples from a plain copy of the model."""
        if not self.info.encoder.can_draw:  # e.g. a user's (D,) vectors train without grids
            return []
        ema = self.state.ema
        weights = gather_state(ema.shadows[ema.names[0]], keep=self.dist.is_main)
        if weights is None:
            return []
        model = build_model(self.config.model.architecture, self.config.model.options)
        model.load_state_dict(weights, strict=False)
        model = model.to(self.dist.device).eval()
        settings = self.config.training
        paths = write_sample_grids(model, self.objective.sampler, self.info.encoder, self.info.num_classes,
                                   settings.grid_steps, settings.grid_samples, settings.seed,
                                   self.output_dir / "samples", self.step, self.dist.device)
        log.images(paths, self.step)
        return paths


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def describe_in_memory(config: Config, data: InMemoryData) -> Config:
    """``config`` with its data section saying 'samples passed in memory': ``data.name='memory'``,
    class-conditional exactly when the data carry labels, nothing to read from disk. The
    augmentation setting (``horizontal_flip``) is kept."""
    section = DataConfig(name="memory", class_conditional=data.labels is not None,
                         horizontal_flip=config.data.horizontal_flip, vae=config.data.vae)
    return dataclasses.replace(config, data=section)


def train(config: Config, output_dir: str | Path, progress: bool = True, max_steps: Optional[int] = None,
          data: Any = None, labels: Any = None) -> TrainResult:
    """Train (or resume) the run described by ``config`` in ``output_dir``.

    If ``output_dir/checkpoints`` holds a checkpoint, training continues from it: weights, EMA,
    optimizer, schedule, step, every rank's RNG state and the data position are restored, so the
    result is bit-identical to an uninterrupted run on the same machine. ``max_steps`` stops
    after that many steps in total (``config.training.steps`` stays the schedule's length).
    Under torchrun every process calls this; rank 0 writes the files.

    ``data`` trains on your own samples instead of ``config.data``: a torch Tensor or numpy
    array (N, *sample_shape) of floats, with optional ``labels`` (N,) integers, or a torch
    ``Dataset`` whose items are ``x`` or ``(x, label)``. Any sample shape the model takes works
    ((N, D) points for the MLP, (N, C, H, W) for the DiT / U-Net); labels make the run
    class-conditional. The run's config then records ``data.name='memory'``; to resume, call
    ``train`` again with the same data (other data are refused). See :mod:`meanflow.data.memory`.
    """
    samples = None
    if data is not None:
        samples = as_in_memory_data(data, labels)
        config = describe_in_memory(config, samples)
    elif labels is not None:
        raise ValueError("labels= are the labels of data=; pass the samples as data= too")
    trainer = Trainer(config, Path(output_dir), progress, data=samples)
    context = trainer.dist
    # From the first step to the last collective a signal only asks to stop: a second SIGTERM
    # (torchrun forwards the one it got to processes that may have had their own) never kills a
    # process while it checkpoints or leaves the process group, so every rank exits cleanly.
    with StopRequest() as stop:
        try:
            result = trainer.run(max_steps, stop)
        except BaseException:
            shutdown(context, together=False)
            raise
        # The DDP / FSDP wrappers hold gloo work objects; destroyed after their process group (at
        # interpreter exit) they abort the process. Drop them first.
        del trainer
        gc.collect()
        shutdown(context)
    return result


__all__ = ["TrainResult", "Trainer", "check_model_matches_data", "describe_in_memory", "train"]
