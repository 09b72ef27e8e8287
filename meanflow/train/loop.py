"""The training loop: data -> objective.loss -> backward -> clip -> optimizer -> EMA, with
periodic logs, checkpoints and sample grids. Re-running the same command resumes.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data import DataInfo, build_source
from ..models import build_model
from ..checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer,
    optimizer_tensors,
    save_checkpoint,
)
from .ema import EMA
from .objective_factory import build_objective
from .progress import Progress
from .sample_grids import write_sample_grids


@dataclass
class TrainResult:
    """Where a run left its files, and its last logged metrics."""

    output_dir: Path
    checkpoint: Path
    grids: list[Path]
    step: int
    metrics: dict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device is 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


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
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": _numpy_state(),
        "python": _python_state(),
        "objective": generator.get_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _numpy_state() -> list:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(position), int(has_gauss), float(cached)]


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(torch.tensor(state["objective"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def train(config: Config, output_dir: str | Path, progress: bool = True, max_steps: Optional[int] = None) -> TrainResult:
    """Train (or resume) the run described by ``config`` in ``output_dir``.

    If ``output_dir/checkpoints`` holds a checkpoint, training continues from it: weights, EMA,
    optimizer, schedule, step, every RNG and the data position are restored, so the result is
    bit-identical to an uninterrupted run on the same machine. ``max_steps`` stops early after
    that many steps in total (for tests and staged runs); ``config.training.steps`` stays the
    schedule's length.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = output_dir / "checkpoints"
    settings = config.training
    device = resolve_device(settings.device)

    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed % (2**32))
    random.seed(settings.seed)
    source, info = build_source(config.data, settings.batch_size, settings.seed)
    check_model_matches_data(config, info)
    model = build_model(config.model.architecture, config.model.options).to(device)
    objective = build_objective(config.objective, info.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                  weight_decay=config.optim.weight_decay)
    warmup = config.optim.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    ema = EMA(model, settings.ema_decays, settings.ema_period)
    generator = torch.Generator(device=device).manual_seed(settings.seed)

    step = 0
    resume_from = latest_checkpoint(checkpoints)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        check_compatible(model.state_dict(), state.model)
        model.load_state_dict(state.model)
        ema.load_state_tensors(state.ema)
        load_optimizer(optimizer, state.optimizer, state.trainer["optimizer"])
        schedule.load_state_dict(state.trainer["schedule"])
        source.load_state_dict(state.trainer["data"])
        _restore_rng(state.trainer["rng"], generator)
        step = state.step
        _truncate_log(output_dir / "metrics.jsonl", step)
    config.save(output_dir / "config.json")

    def save() -> Path:
        trainer = {
            "config": config.to_dict(),
            "model": {"architecture": config.model.architecture, "options": config.model.options},
            "data_info": {"sample_shape": list(info.sample_shape), "num_classes": info.num_classes, "kind": info.kind},
            "ema_names": list(ema.names),
            "schedule": schedule.state_dict(),
            "data": source.state_dict(),
            "rng": _rng_state(generator),
        }
        return save_checkpoint(checkpoints, step, model.state_dict(), ema.state_tensors(), optimizer_tensors(optimizer),
                               trainer, keep_last=settings.keep_checkpoints)

    last_steps = min(settings.steps, max_steps) if max_steps is not None else settings.steps
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")
    bar = Progress(total=last_steps, initial=step, enabled=progress)
    window: dict[str, float] = {}
    window_count, window_start, last_metrics = 0, time.perf_counter(), {}
    grids: list[Path] = []
    checkpoint = resume_from
    model.train()
    with open(output_dir / "metrics.jsonl", "a") as log:
        while step < last_steps:
            x, labels = source.next_batch()
            x = x.to(device, non_blocking=True)
            labels = None if labels is None else labels.to(device, non_blocking=True)
            with autocast:
                out = objective.loss(model, x, labels, generator=generator)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"non-finite loss {float(out.loss)} at step {step + 1}; no checkpoint was "
                                         "written for it (lower optim.lr or set optim.grad_clip)")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            clip = config.optim.grad_clip if config.optim.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            schedule.step()
            step += 1
            ema.update(model, step)

            for key, value in out.metrics.items():
                window[key] = window.get(key, 0.0) + float(value)
            window["grad_norm"] = window.get("grad_norm", 0.0) + float(grad_norm)
            window_count += 1
            bar.update(loss=float(out.metrics["loss"]), error=float(out.metrics["unweighted_error"]))
            if step % settings.log_every == 0 or step == last_steps:
                elapsed = time.perf_counter() - window_start
                last_metrics = {key: value / window_count for key, value in window.items()}
                last_metrics.update(step=step, lr=optimizer.param_groups[0]["lr"],
                                    samples_per_second=window_count * settings.batch_size / max(elapsed, 1e-9))
                log.write(json.dumps(last_metrics) + "\n")
                log.flush()
                window, window_count, window_start = {}, 0, time.perf_counter()
            if step % settings.checkpoint_every == 0 or step == last_steps:
                checkpoint = save()
            if settings.sample_every and step % settings.sample_every == 0 and step != last_steps:
                grids += write_sample_grids(model, ema, config, info, output_dir / "samples", step, device)
    bar.close()
    if checkpoint is None:  # nothing left to train: the run was already complete
        checkpoint = save()
    grids += write_sample_grids(model, ema, config, info, output_dir / "samples", step, device)
    return TrainResult(output_dir, checkpoint, grids, step, last_metrics)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


__all__ = ["TrainResult", "train", "resolve_device", "check_model_matches_data"]
