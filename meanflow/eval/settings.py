"""What one evaluation is asked to do, as one record validated at construction.

:class:`EvalSettings` gathers every choice of ``meanflow eval`` (the command line builds it):
how many samples, which step counts and weights, the metric and its feature network, the
reference, the sampler override, what to save, and this process's share. A bad value fails
here, with the field named, before a model or a data set is loaded.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..distributed import process_group_ready
from ..sampling import OdeMethod
from ..validation import check_integer, check_number, parse_enum
from .features import Metric, PathLike, require_classifier


class LabelMode(str, enum.Enum):
    """Class labels of conditional samples: ``i % C`` (every class equally often) or uniform draws."""

    BALANCED = "balanced"
    RANDOM = "random"


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """The settings of :func:`meanflow.eval.evaluate.evaluate_checkpoint`.

    Args:
        num_samples: N, the total over all processes (50,000 for FID-50K); at least 2.
        steps: the numbers of sampling steps to score (1 = one-step generation).
        weights: an EMA name (``ema_0.9999``) or ``raw``; default the first EMA.
        metric: ``inception`` (TF-FID Inception-v3) or ``domain`` (a project-trained classifier).
            Runs of 2-D points are scored by distribution distances whatever this says.
        reference: an ``.npz`` of statistics (ours or ADM's), or a data set ``name[:split]``
            (``digits``, ``mnist:test``, ``fashion-mnist``, ``cifar10:train``...). Default: the
            data set the checkpoint was trained on, training split, at the generated side length.
            For a points run: a toy distribution name (default: the run's own).
        classifier_path: the domain classifier folder (needed by metric ``domain``).
        inception_weights: a local copy of the TF-FID Inception weights.
        batch_size: samples generated and featurised at a time (memory only).
        seed: sample ``i``'s noise is seeded by ``[seed, i]`` (:mod:`meanflow.noise`); also seeds
            random labels and the reference subset of precision / recall.
        label_mode: ``balanced`` (label ``i % C``) or ``random`` (uniform, seeded by ``seed``).
        intermediate: the middle time of 2-step average-velocity sampling (other step counts
            ignore it), in (0, 1).
        ode: ``euler`` / ``heun`` integrates u(z, t, t) instead of the run's own sampler
            (a flow-matching run's own sampler is already the Euler ODE).
        guidance_scale: inference-time CFG (doubles the NFE).
        omega, interval: the learnt guidance scale and interval ``(t_min, t_max)`` an iMF run's
            network is conditioned on (default: the run's own, from its record); 1 NFE a step.
        precision_recall_samples: M, also report improved precision / recall (Kynkäänniemi et
            al.) between the first M samples and M reference images; None: not computed.
        precision_recall_k: the neighbour count k of the manifold estimate (3 in the paper).
        save_samples: a folder receiving each setting's samples in the one sample format
            (:mod:`meanflow.sample_files`; one file per process under torchrun) and a grid.
        cache_dir: the reference statistics cache (default
            :func:`meanflow.eval.references.default_cache_dir`).
        data_path: where a reference data set is read from (a local ``.npz`` or torchvision
            folder); default the run's ``data.path`` when the reference is its data set.
        vae: the VAE that decodes a latent run's samples (default the run's own).
        device: where the model and the feature network run (``auto``: CUDA when available).
        progress: show a progress bar (on rank 0).
        rank, world_size: this process's share; with ``world_size > 1`` torch.distributed must be
            initialised (statistics are summed across processes).
    """

    num_samples: int
    steps: tuple[int, ...] = (1, 2, 4)
    weights: Optional[str] = None
    metric: Metric = Metric.INCEPTION
    reference: Optional[str] = None
    classifier_path: Optional[PathLike] = None
    inception_weights: Optional[PathLike] = None
    batch_size: int = 250
    seed: int = 0
    label_mode: LabelMode = LabelMode.BALANCED
    intermediate: Optional[float] = None
    ode: Optional[OdeMethod] = None
    guidance_scale: float = 1.0
    omega: Optional[float] = None
    interval: Optional[tuple] = None
    precision_recall_samples: Optional[int] = None
    precision_recall_k: int = 3
    save_samples: Optional[PathLike] = None
    cache_dir: Optional[PathLike] = None
    data_path: Optional[PathLike] = None
    vae: Optional[str] = None
    device: Union[str, torch.device] = "cpu"
    progress: bool = True
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        self._normalise()
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 2:
            raise ValueError(f"num_samples must be an integer >= 2 (a covariance needs two samples), "
                             f"got {self.num_samples!r}")
        if not self.steps or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.steps):
            raise ValueError(f"steps must hold positive step counts, got {list(self.steps)}")
        check_integer("batch_size", self.batch_size, minimum=1)
        check_integer("seed", self.seed, minimum=0)
        check_number("guidance_scale", self.guidance_scale)
        if self.intermediate is not None:
            check_number("intermediate", self.intermediate, 0.0, 1.0, low_open=True, high_open=True)
        if self.omega is not None or self.interval is not None:
            from ..samplers import ImfSampler

            checked = ImfSampler(1.0 if self.omega is None else self.omega,
                                 (0.0, 1.0) if self.interval is None else self.interval)  # validates both
            if self.interval is not None:
                object.__setattr__(self, "interval", checked.interval)
        if self.metric is Metric.DOMAIN:
            require_classifier(self.classifier_path)
        self._check_precision_recall()
        self._check_processes()

    def _normalise(self) -> None:
        """Choices to their Enums, ``auto`` to a device, step counts to a tuple (a frozen record)."""
        set_field = object.__setattr__
        set_field(self, "metric", parse_enum(Metric, self.metric, "metric"))
        set_field(self, "label_mode", parse_enum(LabelMode, self.label_mode, "label_mode"))
        if self.ode is not None:
            set_field(self, "ode", parse_enum(OdeMethod, self.ode, "ode"))
        if self.reference is not None:
            set_field(self, "reference", str(self.reference))
        set_field(self, "steps", tuple(self.steps))
        device = "cuda" if str(self.device) == "auto" and torch.cuda.is_available() else self.device
        set_field(self, "device", torch.device("cpu" if str(device) == "auto" else device))

    def _check_precision_recall(self) -> None:
        check_integer("precision_recall_k", self.precision_recall_k, minimum=1)
        count = self.precision_recall_samples
        if count is not None and not (isinstance(count, int) and self.precision_recall_k < count <= self.num_samples):
            raise ValueError(f"precision / recall needs k < M <= num_samples (k={self.precision_recall_k}, "
                             f"M={count}, num_samples={self.num_samples})")

    def _check_processes(self) -> None:
        check_integer("world_size", self.world_size, minimum=1)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        if self.world_size > 1 and not process_group_ready():
            raise ValueError("world_size > 1 needs torch.distributed initialised (run under torchrun), so that "
                             "the statistics of all processes can be summed")

    def replace(self, **changes) -> "EvalSettings":
        """A copy with some fields changed (validated again), e.g. per weights of a sweep."""
        return dataclasses.replace(self, **changes)


__all__ = ["EvalSettings"]
