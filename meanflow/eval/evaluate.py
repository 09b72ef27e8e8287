"""Evaluating a checkpoint by the standard protocol: FID of N generated samples against reference
statistics, streamed batch by batch and sharded across processes.

The protocol (as in the paper's FID-50K): generate ``num_samples`` images from the chosen
weights (an EMA copy by default) with k sampling steps, convert them to uint8 exactly as saving
them as PNG files would, extract features, fit a Gaussian, and compare it with the Gaussian of
the reference images (:func:`meanflow.eval.frechet.frechet_distance`).

- Metric ``inception``: TF-FID Inception-v3 features (:mod:`meanflow.eval.inception`) and the
  Inception Score. Comparable with published numbers when the reference statistics are the
  published ones (e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``).
- Metric ``domain``: the features of a classifier trained by this project on the data set
  (:mod:`meanflow.eval.classifier`), plus the classification accuracy of class-conditional
  samples. **Not comparable with Inception FID**, only with runs scored by the same classifier.

Streaming: images are generated, featurised and folded into a
:class:`~meanflow.eval.frechet.FeatureStatistics` one batch at a time; no image set is ever
held whole. The noise of sample ``i`` comes from its own generator seeded by
``[seed, i]`` (:func:`sample_noise`) and its label is a function of ``i``, so the samples, and
hence the scores up to float64 rounding, do not depend on the batch size or on the number of
processes. (This is why the
samplers are called directly rather than through :func:`meanflow.inference.generate`, whose
noise is drawn per batch.) Process ``rank`` of ``world_size`` takes the contiguous slice
``[rank N / W, (rank + 1) N / W)``; with ``torch.distributed`` initialised the statistics are
summed across processes before the distance is computed. Latent models are decoded by their
VAE (``data.vae``) batch by batch before featurising.

Reference statistics of a data set are cached as ``<cache>/<key>.npz`` (ADM's format), the key
naming the data set, split, resolution, preprocessing and feature extractor (its weights'
fingerprint), so a different network or preprocessing never reuses stale statistics. The cache
is ``~/.cache/meanflow/stats`` unless ``cache_dir`` or ``$MEANFLOW_STATS_CACHE`` says otherwise.
"""

from __future__ import annotations

import datetime
import enum
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..conventions import null_class_id
from .frechet import FeatureStatistics, frechet_distance, load_statistics_with_info, save_statistics
from .inception import InceptionScoreStatistics

PathLike = Union[str, "os.PathLike[str]"]

# Data sets a reference can name (the names of ``data.name``), and their splits. ``digits`` has no
# split: training used all 1797 images.
REFERENCE_DATASETS = {"digits": ("all",), "mnist": ("train", "test"), "fashion-mnist": ("train", "test"),
                      "cifar10": ("train", "test")}
_PREPROCESSING = "uint8"  # images are quantised to 0..255 before features (what a PNG holds)
DOMAIN_NOTE = ("domain FID: Fréchet distance in the feature space of a classifier trained by this project; "
               "NOT comparable with Inception FID or published numbers, only with scores from the same classifier")
INCEPTION_SCORE_SPLITS = 10


class Metric(str, enum.Enum):
    """Which features the Fréchet distance uses."""

    INCEPTION = "inception"
    DOMAIN = "domain"


class LabelMode(str, enum.Enum):
    """Class labels of conditional samples: ``i % C`` (every class equally often) or uniform draws."""

    BALANCED = "balanced"
    RANDOM = "random"


class FeatureExtractor(Protocol):
    """What evaluation needs from a feature network (Inception, domain classifier)."""

    name: str
    dim: int
    num_logits: int

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class ReferenceSpec:
    """Reference images named by data set, split and side length (None: the native size)."""

    dataset: str
    split: str
    resolution: Optional[int] = None

    def key(self, extractor_name: str, native_resolution: int) -> str:
        side = self.resolution or native_resolution
        return f"{self.dataset}-{self.split}-{side}px-{_PREPROCESSING}-{extractor_name}"

    def __str__(self) -> str:
        return f"{self.dataset}:{self.split}"


def parse_reference(text: Union[str, PathLike], resolution: Optional[int] = None) -> Union[ReferenceSpec, Path]:
    """``"mnist:test"`` / ``"cifar10"`` (split ``train``) / ``"digits"`` -> a :class:`ReferenceSpec`;
    a path ending in ``.npz`` -> that statistics file."""
    text = str(text)
    if text.endswith(".npz"):
        return Path(text)
    dataset, _, split = text.partition(":")
    dataset = dataset.strip().lower().replace("_", "-")
    if dataset not in REFERENCE_DATASETS:
        raise ValueError(f"unknown reference {text!r}: give a statistics .npz file or one of "
                         f"{sorted(REFERENCE_DATASETS)} with an optional ':split'")
    splits = REFERENCE_DATASETS[dataset]
    split = split.strip() or ("all" if dataset == "digits" else "train")
    if dataset == "digits" and split == "train":
        split = "all"  # the digits have no split; training used all of them
    if split not in splits:
        raise ValueError(f"data set {dataset!r} has the splits {list(splits)}, not {split!r}")
    return ReferenceSpec(dataset, split, resolution)


def load_reference_images(spec: ReferenceSpec, data_path: Optional[PathLike] = None) -> tuple[Tensor, Tensor]:
    """The reference images as uint8 (N, C, H, W) and their labels (N,), prepared as for training.

    ``digits`` come from scikit-learn (:func:`meanflow.data.digits.load_digits_tensors`, resized
    to ``spec.resolution`` as training does). The array data sets are read by
    :func:`meanflow.data.images.load_array_dataset` from ``data_path`` (a local ``.npz`` or
    torchvision folder, as ``data.path``) or downloaded by torchvision when it is None; with
    ``spec.resolution`` they are resized by :func:`meanflow.data.images.prepare_images`. Resized
    images are quantised back to uint8, as generated samples are.
    """
    if spec.dataset == "digits":
        from ..data.digits import DIGITS_NATIVE_RESOLUTION, load_digits_tensors

        images, labels = load_digits_tensors(spec.resolution or DIGITS_NATIVE_RESOLUTION)
        return quantize_images(images), labels
    from ..data.images import load_array_dataset, prepare_images

    images, labels = load_array_dataset(spec.dataset, data_path, spec.split)  # uint8 (N, C, H, W)
    if spec.resolution is not None and tuple(images.shape[-2:]) != (spec.resolution, spec.resolution):
        images = quantize_images(prepare_images(images, spec.resolution))
    return images, labels


def quantize_images(images: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 0..255 (``round(127.5 (x + 1))`` after clamping), shape kept."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def default_cache_dir() -> Path:
    """``$MEANFLOW_STATS_CACHE`` or ``~/.cache/meanflow/stats``."""
    return Path(os.environ.get("MEANFLOW_STATS_CACHE") or Path.home() / ".cache" / "meanflow" / "stats")


def reference_statistics(
    spec: ReferenceSpec,
    extractor: FeatureExtractor,
    batch_size: int = 250,
    cache_dir: Optional[PathLike] = None,
    data_path: Optional[PathLike] = None,
    rank: int = 0,
    world_size: int = 1,
    device: Union[str, torch.device] = "cpu",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(mu, sigma, info) of a reference data set, from the cache or computed (sharded) and cached.

    ``info`` records the key, the file and the number of images.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    images, _ = load_reference_images(spec, data_path)
    key = spec.key(extractor.name, images.shape[-1])
    path = (cache / f"{key}.npz").absolute()
    if _everyone(path.is_file(), world_size, device):
        mu, sigma, info = load_statistics_with_info(path)
        return mu, sigma, dict(info or {}, key=key, path=str(path), cached=True)
    statistics = FeatureStatistics(extractor.dim, device)
    start, end = _shard(len(images), rank, world_size)
    for first in range(start, end, batch_size):
        features, _ = extractor.features_and_logits(images[first:min(first + batch_size, end)])
        statistics.update(features)
    _reduce(statistics, world_size)
    mu, sigma = statistics.mean_and_covariance()
    info = {"reference": str(spec), "dataset": spec.dataset, "split": spec.split,
            "resolution": int(images.shape[-1]), "preprocessing": _PREPROCESSING,
            "feature_extractor": extractor.name, "num_images": statistics.count}
    if rank == 0:
        save_statistics(path, mu, sigma, info)
    return mu, sigma, dict(info, key=key, path=str(path), cached=False)


def build_feature_extractor(
    metric: Union[Metric, str],
    inception_weights: Optional[PathLike] = None,
    classifier_path: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 250,
) -> FeatureExtractor:
    """The Inception network or the domain classifier, ready to featurise uint8 images."""
    metric = _metric(metric)
    if metric is Metric.INCEPTION:
        from .inception import InceptionFeatureExtractor

        return InceptionFeatureExtractor(inception_weights, device, batch_size=min(batch_size, 100))
    if classifier_path is None:
        raise ValueError("metric 'domain' needs a trained classifier: give classifier_path (--classifier PATH); "
                         "train one with meanflow.eval.classifier or `meanflow eval --train-classifier`")
    from .classifier import DomainFeatureExtractor, load_classifier

    return DomainFeatureExtractor(load_classifier(classifier_path, device), batch_size=batch_size)


def sample_noise(seed: int, indices: Tensor, sample_shape: Sequence[int]) -> Tensor:
    """Noise (B, *sample_shape) float32 where row j depends only on (seed, indices[j]).

    Each sample has its own generator, numpy's PCG64 seeded by the entropy pool ``[seed, i]``.
    (torch's CPU generator keeps only 32 bits of its seed: among 50,000 hashed per-sample seeds
    a repeated one would be likely, and plain ``seed + i`` schemes overlap between seeds.)
    """
    rows = [np.random.default_rng([seed, index]).standard_normal(tuple(sample_shape), dtype=np.float32)
            for index in indices.tolist()]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, *sample_shape))


def sample_labels(num_samples: int, num_classes: Optional[int], mode: Union[LabelMode, str],
                  seed: int) -> Optional[Tensor]:
    """The labels of all ``num_samples`` samples (None when unconditional)."""
    if num_classes is None:
        return None
    mode = _label_mode(mode)
    if mode is LabelMode.BALANCED:
        return torch.arange(num_samples) % num_classes
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (num_samples,), generator=generator)


@dataclass
class SampleStatistics:
    """What streaming one sampler setting gathers on one process."""

    features: FeatureStatistics
    inception_score: Optional[InceptionScoreStatistics]
    correct: int
    labelled: int
    kept_features: list[Tensor] = field(default_factory=list)  # of samples i < keep_first


def stream_sample_statistics(
    model: nn.Module,
    extractor: FeatureExtractor,
    num_samples: int,
    sample_shape: Sequence[int],
    num_steps: int,
    labels: Optional[Tensor],
    num_classes: Optional[int],
    seed: int = 0,
    batch_size: int = 250,
    intermediate: Optional[float] = None,
    ode: Optional[str] = None,
    guidance_scale: float = 1.0,
    device: Union[str, torch.device] = "cpu",
    rank: int = 0,
    world_size: int = 1,
    with_inception_score: bool = False,
    save_to: Optional[Path] = None,
    decode: Optional[Callable[[Tensor], Tensor]] = None,
    progress=None,
    keep_first: int = 0,
) -> SampleStatistics:
    """Generate this process's slice of the samples batch by batch and fold their features in.

    Nothing is reduced across processes here. ``decode`` maps a batch of samples to images in
    [-1, 1] (the VAE decoder of a latent model). ``save_to`` (a ``.npy`` path) receives this
    slice's uint8 images as (n, H, W, C), written batch by batch through a memory map. The
    features of samples with index below ``keep_first`` are also kept whole (on the CPU, in index
    order) for precision / recall.
    """
    from ..sampling import sample, sample_ode

    device = torch.device(device)
    null = null_class_id(num_classes) if num_classes is not None else None
    start, end = _shard(num_samples, rank, world_size)
    statistics = SampleStatistics(FeatureStatistics(extractor.dim, device), None, 0, 0)
    if with_inception_score:
        splits = min(INCEPTION_SCORE_SPLITS, num_samples)
        statistics.inception_score = InceptionScoreStatistics(num_samples, extractor.num_logits, splits, device)
    saved = None
    for first in range(start, end, batch_size):
        indices = torch.arange(first, min(first + batch_size, end))
        noise = sample_noise(seed, indices, sample_shape).to(device)
        batch_labels = None if labels is None else labels[indices].to(device)
        with torch.no_grad():
            if ode is None:
                samples = sample(model, noise, batch_labels, num_steps=num_steps, intermediate=intermediate,
                                 guidance_scale=guidance_scale, null_label=null)
            else:
                samples = sample_ode(model, noise, batch_labels, num_steps=num_steps, method=ode,
                                     guidance_scale=guidance_scale, null_label=null)
            if decode is not None:
                samples = decode(samples)  # latents (B, c, h, w) -> images (B, 3, H, W)
        images = quantize_images(samples)  # (B, C, H, W) uint8: what a saved PNG would hold
        features, logits = extractor.features_and_logits(images)
        statistics.features.update(features)
        if first < keep_first:
            statistics.kept_features.append(features[:keep_first - first].detach().float().cpu())
        if statistics.inception_score is not None:
            statistics.inception_score.update(logits, indices)
        if batch_labels is not None and logits.shape[1] == num_classes:
            statistics.correct += int((logits.argmax(dim=1) == batch_labels.to(logits.device)).sum())
            statistics.labelled += len(indices)
        if save_to is not None and saved is None:  # opened at the first batch, which tells the image shape
            save_to.parent.mkdir(parents=True, exist_ok=True)
            saved = np.lib.format.open_memmap(save_to, mode="w+", dtype=np.uint8,
                                              shape=(end - start, *images.shape[2:], images.shape[1]))
        if saved is not None:
            saved[first - start:first - start + len(indices)] = images.permute(0, 2, 3, 1).cpu().numpy()
        if progress is not None:
            progress.update()
    if saved is not None:
        saved.flush()
        del saved
    return statistics


def evaluate_checkpoint(
    checkpoint: PathLike,
    num_samples: int,
    steps_list: Sequence[int] = (1, 2, 4),
    weights: Optional[str] = None,
    metric: Union[Metric, str] = Metric.INCEPTION,
    reference: Optional[Union[str, PathLike]] = None,
    classifier_path: Optional[PathLike] = None,
    batch_size: int = 250,
    seed: int = 0,
    label_mode: Union[LabelMode, str] = LabelMode.BALANCED,
    intermediate: Optional[float] = None,
    ode: Optional[str] = None,
    save_samples: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    guidance_scale: float = 1.0,
    inception_weights: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    data_path: Optional[PathLike] = None,
    vae: Optional[str] = None,
    feature_extractor: Optional[FeatureExtractor] = None,
    precision_recall_samples: Optional[int] = None,
    precision_recall_k: int = 3,
) -> dict[str, Any]:
    """FID (and IS or class accuracy) of a checkpoint's samples for each number of steps.

    Args:
        checkpoint: a run folder or a ``step_<n>`` folder.
        num_samples: N, the total over all processes (50,000 for FID-50K).
        steps_list: the numbers of sampling steps to score (1 = one-step generation).
        weights: an EMA name (``ema_0.9999``) or ``raw``; default the first EMA.
        metric: ``inception`` (TF-FID Inception-v3) or ``domain`` (a project-trained classifier).
        reference: an ``.npz`` of statistics (ours or ADM's), or a data set ``name[:split]``
            (``digits``, ``mnist:test``, ``fashion-mnist``, ``cifar10:train``...). Default: the
            data set the checkpoint was trained on, training split, at the model's resolution.
        classifier_path: the domain classifier folder (metric ``domain``).
        batch_size: samples generated and featurised at a time (memory only).
        seed: sample ``i``'s noise is seeded by ``[seed, i]``; also seeds random labels.
        label_mode: ``balanced`` (label ``i % C``) or ``random`` (uniform, seeded by ``seed``).
        intermediate: the middle time of 2-step sampling (other step counts ignore it).
        ode: ``euler`` / ``heun`` integrates u(z, t, t) instead; a flow-matching checkpoint
            uses ``euler`` when this is None.
        save_samples: a folder receiving each setting's uint8 samples: ``samples_steps<k>[...].npz``
            in ADM's sample format (``arr_0`` (n, H, W, C) uint8, ``arr_1`` the labels when
            conditional; one file per process under torchrun) and a PNG grid of the first 100.
        device: where the model and the feature network run (``auto``: CUDA when available).
        progress: show a progress bar (on rank 0).
        rank, world_size: this process's share; with ``world_size > 1`` torch.distributed must be
            initialised (statistics are all-reduced).
        guidance_scale: inference-time CFG (doubles the NFE).
        inception_weights: a local copy of the TF-FID Inception weights.
        cache_dir: the reference statistics cache (default :func:`default_cache_dir`).
        data_path: where a reference data set is read from (a local ``.npz`` or torchvision folder,
            as ``data.path``); default the checkpoint's ``data.path`` when the reference is the
            data set it was trained on, else a torchvision download.
        vae: the VAE that decodes a latent model's samples (default the run's ``data.vae``).
        feature_extractor: a ready extractor to reuse across calls (sweeps); overrides the above.
        precision_recall_samples: also report improved precision / recall (Kynkäänniemi et al.)
            between the features of the first M generated samples and M reference images (a
            seeded subset of the data set, or the ``arr_0`` images of an ADM reference batch);
            M = 10,000 is the usual choice. None: not computed.
        precision_recall_k: the neighbour count k of the manifold estimate (3 in the paper).

    Returns:
        A JSON-able report holding every setting needed to reproduce the numbers and, under
        ``scores``, one entry per step count: ``steps``, ``nfe``, ``fid``, ``seconds`` and
        ``inception_score_mean`` / ``_std`` (inception) or ``accuracy`` (domain, conditional),
        and ``precision`` / ``recall`` when asked for.
    """
    from ..inference import load_model

    metric, label_mode = _metric(metric), _label_mode(label_mode)
    steps_list = [int(k) for k in steps_list]
    if not steps_list or min(steps_list) < 1:
        raise ValueError(f"steps_list must hold positive step counts, got {steps_list}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2 (a covariance needs two samples), got {num_samples!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size > 1 and not _distributed_ready():
        raise ValueError("world_size > 1 needs torch.distributed initialised (run under torchrun), so that "
                         "the statistics of all processes can be summed")
    if ode is not None and ode not in ("euler", "heun"):
        raise ValueError(f"ode must be 'euler', 'heun' or None, got {ode!r}")
    if precision_recall_samples is not None and not (precision_recall_k >= 1
                                                     and precision_recall_k < precision_recall_samples <= num_samples):
        raise ValueError(f"precision / recall needs k < M <= num_samples (k={precision_recall_k}, "
                         f"M={precision_recall_samples}, num_samples={num_samples})")

    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    loaded = load_model(checkpoint, weights, device)
    data_config = loaded.config.get("data", {})
    if loaded.kind not in ("image", "latent") or len(loaded.sample_shape) != 3:
        raise ValueError(f"FID evaluation needs an image model, but this checkpoint generates {loaded.kind} of shape "
                         f"{loaded.sample_shape}; for 2-D toys use meanflow.eval.distances")
    decode, vae_name, image_side = None, None, loaded.sample_shape[-1]
    if loaded.kind == "latent":
        from ..data.latents import decode_latents, load_vae

        vae_name = vae or data_config.get("vae")
        decoder = load_vae(vae_name, device=device)

        def decode(latents: Tensor) -> Tensor:
            return decode_latents(decoder, latents, batch_size=min(batch_size, 32))

        image_side = data_config.get("resolution") or 8 * loaded.sample_shape[-1]  # the SD-VAE's 8x
    if ode is None and loaded.config.get("objective", {}).get("method") == "flow_matching":
        ode = "euler"  # a flow-matching network is a velocity field: u(z, r, t) is only trained at r = t
    extractor = feature_extractor or build_feature_extractor(metric, inception_weights, classifier_path, device,
                                                             batch_size)

    # Reference statistics: a file, or a data set (cached).
    if reference is None:
        reference = data_config.get("name", "")
        if reference not in REFERENCE_DATASETS:
            raise ValueError(f"this checkpoint was trained on {reference!r}, which has no built-in reference; "
                             "give reference (--reference) as a statistics .npz or a data set name")
    parsed = parse_reference(reference, resolution=image_side)
    if data_path is None and isinstance(parsed, ReferenceSpec) and parsed.dataset == data_config.get("name"):
        data_path = data_config.get("path")
    if isinstance(parsed, Path):
        mu_ref, sigma_ref, info = load_statistics_with_info(parsed)
        stored_extractor = (info or {}).get("feature_extractor")
        if stored_extractor is not None and stored_extractor != extractor.name:
            raise ValueError(f"{parsed} holds statistics of {stored_extractor}, not of {extractor.name}")
        reference_report = {"source": str(parsed), "statistics": str(parsed.resolve()),
                            "num_images": (info or {}).get("num_images")}
    else:
        mu_ref, sigma_ref, info = reference_statistics(parsed, extractor, batch_size, cache_dir, data_path, rank,
                                                       world_size, device)
        reference_report = {"source": str(parsed), "statistics": info["path"], "key": info["key"],
                            "num_images": info["num_images"], "resolution": info["resolution"]}
    if mu_ref.shape != (extractor.dim,):
        raise ValueError(f"the reference statistics have dimension {mu_ref.shape[0]}, but the {metric.value} "
                         f"features have {extractor.dim}: they come from another feature network")
    real_features = None
    if precision_recall_samples is not None and rank == 0:
        real_features = reference_features(parsed, extractor, precision_recall_samples, seed, batch_size, data_path)
        reference_report["precision_recall_images"] = len(real_features)

    labels = sample_labels(num_samples, loaded.num_classes, label_mode, seed)
    start, end = _shard(num_samples, rank, world_size)
    bar = None
    if progress and rank == 0:
        from ..train.progress import Progress

        bar = Progress(total=len(steps_list) * -(-(end - start) // batch_size), every=10)
    scores = []
    try:
        for num_steps in steps_list:
            started = time.perf_counter()
            step_intermediate = intermediate if num_steps == 2 else None
            save_to = None
            if save_samples is not None:
                suffix = f"_t{step_intermediate:g}" if step_intermediate is not None else ""
                suffix += f"_rank{rank}of{world_size}" if world_size > 1 else ""
                save_to = Path(save_samples) / f"samples_steps{num_steps}{suffix}.npy"
            gathered = stream_sample_statistics(
                loaded.model, extractor, num_samples, loaded.sample_shape, num_steps, labels, loaded.num_classes,
                seed, batch_size, step_intermediate, ode, guidance_scale, device, rank, world_size,
                with_inception_score=metric is Metric.INCEPTION, save_to=save_to, decode=decode, progress=bar,
                keep_first=precision_recall_samples or 0)
            _reduce(gathered.features, world_size)
            fid = frechet_distance(*gathered.features.mean_and_covariance(), mu_ref, sigma_ref)
            entry: dict[str, Any] = {"steps": num_steps, "nfe": _nfe(num_steps, ode, guidance_scale),
                                     "intermediate": step_intermediate, "fid": fid}
            if gathered.inception_score is not None:
                if world_size > 1:
                    gathered.inception_score.all_reduce()
                entry["inception_score_mean"], entry["inception_score_std"] = gathered.inception_score.score()
            if metric is Metric.DOMAIN and labels is not None:
                counts = torch.tensor([gathered.correct, gathered.labelled], dtype=torch.float64, device=device)
                if world_size > 1:
                    torch.distributed.all_reduce(counts)
                if counts[1] > 0:  # 0 when the classifier's classes are not the model's
                    entry["accuracy"] = float(counts[0] / counts[1])
            if precision_recall_samples is not None:
                fake_features = _gather_rows(gathered.kept_features, extractor.dim, world_size)
                if real_features is not None:  # rank 0
                    from .distances import precision_recall

                    entry.update(precision_recall(real_features, fake_features, k=precision_recall_k))
            if save_to is not None:
                shard_labels = None if labels is None else labels[start:end]
                entry["samples_file"], grid = finish_saved_samples(save_to, shard_labels, loaded.num_classes,
                                                                   grid=rank == 0)
                if grid is not None:
                    entry["samples_grid"] = grid
            entry["seconds"] = time.perf_counter() - started
            scores.append(entry)
    finally:
        if bar is not None:
            bar.close()

    from .. import __version__

    report = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "step": loaded.step,
        "weights": loaded.weights,
        "metric": metric.value,
        "feature_extractor": extractor.name,
        "classifier": None if classifier_path is None else str(Path(classifier_path).resolve()),
        "inception_weights": None if inception_weights is None else str(Path(inception_weights).resolve()),
        "vae": vae_name,
        "reference": reference_report,
        "num_samples": num_samples,
        "seed": seed,
        "noise": "sample i: numpy.random.default_rng([seed, i]).standard_normal(shape, dtype=float32)",
        "label_mode": label_mode.value if loaded.num_classes is not None else None,
        "num_classes": loaded.num_classes,
        "steps": steps_list,
        "intermediate": intermediate,
        "ode": ode,
        "guidance_scale": guidance_scale,
        "precision_recall": None if precision_recall_samples is None else {"samples": precision_recall_samples,
                                                                           "k": precision_recall_k},
        "batch_size": batch_size,
        "world_size": world_size,
        "device": str(device),
        "scores": scores,
        "meanflow_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if metric is Metric.DOMAIN:
        report["note"] = DOMAIN_NOTE
    return report


def finish_saved_samples(path: Path, labels: Optional[Tensor], num_classes: Optional[int],
                         grid: bool = True, grid_count: int = 100) -> tuple[str, Optional[str]]:
    """Turn a streamed ``.npy`` of uint8 (n, H, W, C) samples into ADM's ``.npz`` (``arr_0``, plus
    ``arr_1`` labels) beside it, written atomically, and (``grid``) a PNG grid of the first
    ``grid_count``; the ``.npy`` is removed. Returns the two paths (the grid's or None)."""
    from .grids import save_image_grid

    images = np.load(path, mmap_mode="r")
    target = path.with_suffix(".npz")
    partial = target.with_name(target.name + ".tmp")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy().astype(np.int64)
    with open(partial, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, target)
    grid_path = None
    if grid:
        first = torch.from_numpy(np.array(images[:grid_count])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        rows = num_classes if num_classes and len(first) % num_classes == 0 else None
        grid_path = str(save_image_grid(first, path.with_suffix(".png"), nrow=rows))
    del images
    path.unlink()
    return str(target), grid_path


def reference_features(
    reference: Union[ReferenceSpec, Path],
    extractor: FeatureExtractor,
    count: int,
    seed: int = 0,
    batch_size: int = 250,
    data_path: Optional[PathLike] = None,
) -> Tensor:
    """Features (M, D) of M reference images for precision / recall.

    A data set gives a subset of M images chosen by a permutation seeded by ``seed`` (all of
    them when it has fewer); a statistics ``.npz`` must hold the images themselves as ``arr_0``
    (N, H, W, C) uint8, as ADM's reference batches do, of which the first M are used.
    """
    if isinstance(reference, Path):
        with np.load(reference) as data:
            if "arr_0" not in data.files:
                raise ValueError(f"precision / recall needs reference images, but {reference} holds only "
                                 f"{sorted(data.files)}; give a data set as the reference, or an ADM reference "
                                 "batch (which stores its images as arr_0)")
            images = torch.from_numpy(np.ascontiguousarray(data["arr_0"][:count])).permute(0, 3, 1, 2)
    else:
        images, _ = load_reference_images(reference, data_path)
        if len(images) > count:
            images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]]
    features = [extractor.features_and_logits(images[first:first + batch_size])[0].detach().float().cpu()
                for first in range(0, len(images), batch_size)]
    return torch.cat(features)


def _gather_rows(parts: list[Tensor], dim: int, world_size: int) -> Tensor:
    """This process's kept rows, or, under torch.distributed, every process's in rank order."""
    local = torch.cat(parts) if parts else torch.zeros(0, dim)
    if world_size == 1:
        return local
    import torch.distributed as dist

    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, local)  # ranks hold contiguous index slices, so rank order is index order
    return torch.cat(everyone)


def _nfe(num_steps: int, ode: Optional[str], guidance_scale: float) -> int:
    """Network evaluations per sample: Heun spends two per step but one on the last; CFG doubles."""
    evaluations = 2 * num_steps - 1 if ode == "heun" else num_steps
    return evaluations * (2 if guidance_scale != 1.0 else 1)


def _shard(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Process ``rank``'s contiguous slice [start, end) of ``total`` items."""
    return rank * total // world_size, (rank + 1) * total // world_size


def _everyone(flag: bool, world_size: int, device: Union[str, torch.device]) -> bool:
    """True when ``flag`` holds on every process: all must agree to skip a collective computation."""
    if world_size == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def _distributed_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _reduce(statistics: FeatureStatistics, world_size: int) -> None:
    if world_size > 1:
        statistics.all_reduce()


def _metric(value: Union[Metric, str]) -> Metric:
    try:
        return Metric(value)
    except ValueError:
        raise ValueError(f"metric must be one of {[m.value for m in Metric]}, got {value!r}") from None


def _label_mode(value: Union[LabelMode, str]) -> LabelMode:
    try:
        return LabelMode(value)
    except ValueError:
        raise ValueError(f"label_mode must be one of {[m.value for m in LabelMode]}, got {value!r}") from None


__all__ = [
    "DOMAIN_NOTE",
    "FeatureExtractor",
    "LabelMode",
    "Metric",
    "REFERENCE_DATASETS",
    "ReferenceSpec",
    "SampleStatistics",
    "build_feature_extractor",
    "default_cache_dir",
    "evaluate_checkpoint",
    "finish_saved_samples",
    "load_reference_images",
    "parse_reference",
    "quantize_images",
    "reference_features",
    "reference_statistics",
    "sample_labels",
    "sample_noise",
    "stream_sample_statistics",
]
