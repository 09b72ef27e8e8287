"""Inception-v3 features for FID and IS with the standard TF-FID weights, and IS / precision-recall.

The numbers papers report (FID-50K, IS) come from one specific network: the Inception-v3 graph
of 2015-12-05 that TensorFlow's FID code uses, converted to PyTorch. Any other Inception (e.g.
an ImageNet-trained torchvision model) gives different, incomparable scores. We therefore take
the network, its TensorFlow-compatible bilinear resize to 299 x 299 and its input scaling from
``torch-fidelity`` instead of re-implementing them.

Why torch-fidelity and not pytorch-fid: both ship these weights, but pytorch-fid builds its
network out of torchvision's Inception blocks, so it cannot run without torchvision, and
torchvision pins one torch version (installing it can replace torch). torch-fidelity defines
the whole network in one module, ``torch_fidelity.feature_extractor_inceptionv3``, that imports
only torch. Its package ``__init__`` imports torchvision-based extractors too, so we import that
module alone (see :func:`inception_module`) and never need torchvision. Install it with

    pip install --no-deps torch-fidelity

(``--no-deps`` keeps pip from pulling torchvision and with it another torch).

Weights: ``weights-inception-2015-12-05-6726825d.pth`` is read from torch hub's cache
(``$TORCH_HOME/hub/checkpoints``, downloaded there on first use) or from a path given as
``weights_path=`` here, ``--inception-weights`` on the command line. torch-fidelity loads weights
with an unrestricted ``torch.load``, which runs whatever code a pickle names, so it is never left
to open the file: its network is built without weights (:func:`untrained_inception_network`) and
the file is read here with ``weights_only=True``, checked against the network's names and shapes
and loaded strictly (:func:`inception_network`).

:func:`inception_score` is a pure function of logits; :func:`precision_recall` (from
:mod:`meanflow.eval.distances`) of features.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import warnings
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Optional, Union

import torch
from torch import Tensor

from ..fingerprints import state_fingerprint
from ..pixels import to_uint8
from .distances import ArrayLike, precision_recall  # noqa: F401  (precision_recall re-exported)

INCEPTION_FEATURE_DIM = 2048
INCEPTION_NUM_LOGITS = 1008  # the TF graph's 1000 ImageNet classes plus 8 unused ones
# The file torch-fidelity downloads; pytorch-fid's copy of the same weights is named
# pt_inception-2015-12-05-6726825d.pth.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
_LIBRARY_MODULE = "torch_fidelity.feature_extractor_inceptionv3"
# torch-fidelity's feature names: pool features, and logits without the bias (what IS uses).
_FEATURES, _LOGITS = "2048", "logits_unbiased"
# Batch-norm counters: in the network's state dict, not in the official file (see check_weights).
_OPTIONAL_SUFFIX = ".num_batches_tracked"


class InceptionWeightsUnavailable(FileNotFoundError):
    """The TF-FID Inception weights could neither be found locally nor downloaded."""


def default_weights_path() -> Path:
    """Where the weights are read from when no path is given: torch hub's checkpoint cache,
    ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` (the file torch-fidelity
    would download there)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_module() -> ModuleType:
    """torch-fidelity's Inception-v3 module, imported without the package's torchvision users.

    When ``torch_fidelity`` is already imported (torchvision present) the module is imported
    normally. Otherwise the package is registered without running its ``__init__`` while the
    module and its three small helpers load, then unregistered again, so a later
    ``import torch_fidelity`` behaves as it would have.
    """
    if "torch_fidelity" in sys.modules:
        return importlib.import_module(_LIBRARY_MODULE)
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            "Inception FID needs torch-fidelity (the standard TF-FID Inception-v3 in PyTorch): "
            "pip install --no-deps torch-fidelity   (--no-deps: it must not pull torchvision)"
        )
    package = importlib.util.module_from_spec(spec)  # created, not executed
    sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module(_LIBRARY_MODULE)
    finally:
        if sys.modules.get("torch_fidelity") is package:
            del sys.modules["torch_fidelity"]


def untrained_inception_network() -> torch.nn.Module:
    """torch-fidelity's Inception-v3 with freshly initialised layers, built without reading or
    downloading any file; its ``state_dict()`` names every tensor the weights file must hold.

    The library's constructor has no switch for this: it builds every layer, then takes a state
    dict from ``load_state_dict_from_url`` (or from ``torch.load(path, weights_only=False)`` when
    given a path) and loads it, and both of those unpickle without restriction. So the
    constructor's own code runs here with that one name, in a private copy of its globals, bound
    to a function that hands back the new layers' own state: loading it changes nothing, nothing
    is opened, and the library module itself is left as it was (other users of it are not
    affected). The real weights are loaded afterwards by :func:`inception_network`.
    """
    module = inception_module()
    network_class = module.FeatureExtractorInceptionV3
    constructor = network_class.__init__
    if "load_state_dict_from_url" not in constructor.__code__.co_names:
        raise RuntimeError(f"this torch-fidelity version ({module.__file__}) builds its Inception-v3 in a way "
                           "meanflow does not know, so it cannot be kept from loading weights itself; "
                           "install the torch-fidelity release this meanflow version was tested with")
    network = network_class.__new__(network_class)
    requests = []

    def own_state(*args, **kwargs) -> dict[str, Tensor]:
        requests.append(args)
        return network.state_dict()  # every layer exists by now: the constructor loads last

    private_globals = {**constructor.__globals__, "load_state_dict_from_url": own_state}
    sealed = FunctionType(constructor.__code__, private_globals, constructor.__name__, constructor.__defaults__,
                          constructor.__closure__)
    sealed.__kwdefaults__ = constructor.__kwdefaults__
    sealed(network, "inception-v3-compat", [_FEATURES, _LOGITS])
    if len(requests) != 1:
        raise RuntimeError("torch-fidelity's Inception-v3 did not ask for its weights as expected; refusing to use it")
    return network


def read_weights_file(path: Union[str, Path]) -> dict[str, Tensor]:
    """The state dict in ``path``, read with ``torch.load(weights_only=True)``: tensors and plain
    containers only, so no code in the file can run. Keys and shapes are not checked here.

    Raises:
        InceptionWeightsUnavailable: there is no file at ``path``.
        ValueError: the file is not a dict of tensors saved by ``torch.save`` (reading it would
            need unpickling Python objects, which is refused).
    """
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsUnavailable(
            f"no Inception weights file at {path} (expected a copy of {INCEPTION_WEIGHTS_FILE}, the TF-FID "
            f"Inception-v3 weights); point at a local copy with --inception-weights PATH "
            f"(Python: InceptionFeatureExtractor(weights_path=PATH)), or copy it to {default_weights_path()}"
        )
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # unreadable (permissions, I/O): the system's own message says why
    except Exception as error:  # noqa: BLE001 -- whatever the refusal, torch's advice is not relayed
        raise ValueError(_not_plain_tensors_message(path, error)) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (a dict of tensors "
                         f"as in {INCEPTION_WEIGHTS_FILE})")
    odd = [key for key, value in state.items() if not isinstance(key, str) or not isinstance(value, Tensor)]
    if odd:
        raise ValueError(f"{path} is not a state dict of tensors: {len(odd)} entries are not a name and a "
                         f"tensor, e.g. {odd[0]!r}: {type(state[odd[0]]).__name__}")
    return state


def _not_plain_tensors_message(path: Path, error: Exception) -> str:
    # torch names a refused global as "GLOBAL module.name"; its message also advises turning the
    # check off, which is exactly what must not be done with a file of unknown origin.
    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"it asks for the Python object {named.group(1)}" if named else "it is no torch.save file of tensors"
    return (f"{path} is not a plain state dict of tensors ({what}): reading it would need unpickling, which "
            "meanflow refuses because unpickling can run any code the file contains. Use the official "
            f"{INCEPTION_WEIGHTS_FILE}, a dict of tensors, or re-save trusted weights as one "
            "(torch.save(dict_of_tensors, path)).")


def check_weights(state: dict[str, Tensor], expected: dict[str, Tensor], source: Union[str, Path]) -> None:
    """Refuse a state dict whose names, shapes or kinds (floating / integer) differ from the network's.

    The official file, a plain dict written by torch-fidelity's converter, holds the convolution,
    batch-norm and fc tensors but no ``num_batches_tracked`` counters: those (unused in eval mode)
    may be absent and are then taken from the network.
    """
    required = {key for key in expected if not key.endswith(_OPTIONAL_SUFFIX)}
    missing = sorted(required - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    different = [f"{key}: file {tuple(state[key].shape)} {state[key].dtype}, network {tuple(expected[key].shape)} "
                 f"{expected[key].dtype}" for key in sorted(state.keys() & expected.keys())
                 if state[key].shape != expected[key].shape
                 or state[key].is_floating_point() != expected[key].is_floating_point()]
    if missing or unexpected or different:
        problems = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                    f"{len(unexpected)} not in the network (e.g. {unexpected[:3]})" if unexpected else "",
                    f"{len(different)} of another shape or kind ({'; '.join(different[:3])})" if different else ""]
        raise ValueError(f"{source} does not hold the TF-FID Inception-v3 weights of torch-fidelity's network "
                         f"({INCEPTION_WEIGHTS_FILE}): tensors " + ", ".join(p for p in problems if p))


def inception_network(path: Union[str, Path]) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 (float32, eval mode, on the CPU) with the weights file at ``path``.

    The one way weights reach the network, whether the file is the default one or given: read
    with ``weights_only=True`` (:func:`read_weights_file`), checked against the names and shapes of
    the network's own state dict (:func:`check_weights`), then ``load_state_dict(strict=True)``
    into a network that was built without reading anything (:func:`untrained_inception_network`).
    """
    state = read_weights_file(path)  # first: a bad file fails before the 24M-parameter network is built
    network = untrained_inception_network()
    expected = network.state_dict()
    check_weights(state, expected, path)
    counters = {key: value for key, value in expected.items() if key.endswith(_OPTIONAL_SUFFIX)}
    network.load_state_dict({**counters, **state}, strict=True)
    return network


def _download_weights(url: str, destination: Path) -> None:
    """Fetch the weights file into ``destination`` (written atomically by torch hub); only bytes
    are written here, the file is read afterwards like any other by :func:`read_weights_file`."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(destination), progress=False)


def images_to_uint8_rgb(images: ArrayLike) -> Tensor:
    """Bring images to what the TF-FID network takes: (B, 3, H, W) uint8.

    Args:
        images: (B, C, H, W) or (B, H, W) with C in {1, 3}; uint8 in 0..255, or floating point
            in [-1, 1] (the model's range), mapped by :func:`meanflow.pixels.to_uint8` (what saving the
            image as a PNG would store). Grey images are repeated to 3 channels.
    """
    images = torch.as_tensor(images)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, C, H, W) or (B, H, W) with C in {{1, 3}}, got {tuple(images.shape)}")
    if images.dtype.is_floating_point:
        if bool(torch.isnan(images).any()):
            raise ValueError("images contain NaN")
        images = to_uint8(images)
    elif images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255) or floating point in [-1, 1], got {images.dtype}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


class InceptionFeatureExtractor:
    """2048-d pool features (and 1008 IS logits) of the TF-FID Inception-v3, via torch-fidelity.

    Images of any size are resized to 299 x 299 by the library (TensorFlow-1.x-compatible
    bilinear) and scaled to [-1, 1] as in the TF graph; see :func:`images_to_uint8_rgb` for the
    accepted inputs. The network runs in float32, ``batch_size`` images at a time. The weights are
    read by :func:`inception_network` (``weights_only=True``, names and shapes checked); the library
    never opens the file itself.

    Args:
        weights_path: a local copy of the weights (``weights-inception-2015-12-05-6726825d.pth``);
            None reads :func:`default_weights_path` (torch hub's cache), downloading the file
            there first when it is missing.
        device: where the network runs.
        batch_size: images per forward pass (memory only; features do not depend on it).

    Raises:
        ImportError: torch-fidelity is not installed.
        InceptionWeightsUnavailable: no file at ``weights_path``, or none in the cache and the
            download failed (offline).
        ValueError: the file is not a plain state dict of tensors, or not one of this network.
    """

    dim = INCEPTION_FEATURE_DIM
    num_logits = INCEPTION_NUM_LOGITS

    def __init__(self, weights_path: Optional[Union[str, Path]] = None,
                 device: Union[str, torch.device] = "cpu", batch_size: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        module = inception_module()  # fails first when torch-fidelity is missing
        self.device = torch.device(device)
        self.batch_size = batch_size
        if weights_path is None:
            weights_path = default_weights_path()
            if not weights_path.is_file():
                _fetch_into_cache(getattr(module, "URL_INCEPTION_V3", None), weights_path)
        self.weights_path = Path(weights_path)
        self.network = inception_network(self.weights_path).to(self.device).eval()
        self._fingerprint: Optional[str] = None

    @property
    def name(self) -> str:
        """Identifies the network and its weights (cache keys of reference statistics use it)."""
        return f"inception-v3-tf2015-{self.fingerprint[:12]}"

    @property
    def fingerprint(self) -> str:
        """sha256 of the loaded weights (in parameter order), whichever file they came from."""
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.network.state_dict())
        return self._fingerprint

    @torch.no_grad()
    def features_and_logits(self, images: ArrayLike) -> tuple[Tensor, Tensor]:
        """(B, 2048) pool features and (B, 1008) logits (no bias, as the IS code uses), float32 on the
        extractor's device."""
        images = images_to_uint8_rgb(images)
        features, logits = [], []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start:start + self.batch_size].to(self.device)
            pooled, unbiased = self.network(batch)
            features.append(pooled)
            logits.append(unbiased)
        return torch.cat(features), torch.cat(logits)

    def __call__(self, images: ArrayLike) -> Tensor:
        """(B, 2048) pool features, float32."""
        return self.features_and_logits(images)[0]


def _fetch_into_cache(url: Optional[str], destination: Path) -> None:
    """Download the weights to ``destination``, or say how to provide them offline."""
    offline = (f"Offline, copy {INCEPTION_WEIGHTS_FILE} into {destination.parent}, or point at a local copy with "
               "--inception-weights PATH (Python: InceptionFeatureExtractor(weights_path=PATH)).")
    if not url:
        raise InceptionWeightsUnavailable(f"no TF-FID Inception-v3 weights at {destination}. {offline}")
    try:
        _download_weights(url, destination)
    except OSError as error:  # URLError, socket and HTTP errors are all OSErrors
        raise InceptionWeightsUnavailable(
            f"could not get the TF-FID Inception-v3 weights {INCEPTION_WEIGHTS_FILE}: there is no copy at "
            f"{destination} and downloading it from {url} failed ({error}). {offline}"
        ) from error


class InceptionScoreStatistics:
    """Streams the Inception Score: per split, the sum of p(y|x) and of sum_y p log p.

    Split ``s`` holds the samples with global index in ``[s N / S, (s + 1) N / S)`` (integer
    division, the split rule of the original IS code), so batches may arrive in any order and
    from several processes (``all_reduce``). With ``p_y`` the mean of p(y|x) over a split of
    ``n`` samples, its KL term is ``(1/n) sum_x sum_y p log p - sum_y p_y log p_y``.

    Args:
        num_samples: N, the total over all processes.
        num_classes: K.
        splits: S.
    """

    def __init__(self, num_samples: int, num_classes: int, splits: int = 10,
                 device: Union[str, torch.device] = "cpu"):
        if splits < 1 or num_samples < splits:
            raise ValueError(f"need 1 <= splits <= num_samples, got splits={splits}, num_samples={num_samples}")
        self.num_samples, self.num_classes, self.splits = num_samples, num_classes, splits
        self.boundaries = torch.tensor([s * num_samples // splits for s in range(splits + 1)], device=device)
        self.probability_sums = torch.zeros(splits, num_classes, dtype=torch.float64, device=device)  # (S, K)
        self.negative_entropy_sums = torch.zeros(splits, dtype=torch.float64, device=device)  # (S,)
        self.counts = torch.zeros(splits, dtype=torch.float64, device=device)  # (S,)

    def update(self, logits: ArrayLike, indices: ArrayLike) -> "InceptionScoreStatistics":
        """Add logits (B, K) of the samples with global indices (B,). Returns ``self``."""
        device = self.counts.device
        logits = torch.as_tensor(logits).to(device=device, dtype=torch.float64)
        indices = torch.as_tensor(indices).to(device=device, dtype=torch.long)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes or indices.shape != (logits.shape[0],):
            raise ValueError(f"expected logits (B, {self.num_classes}) and indices (B,), got "
                             f"{tuple(logits.shape)} and {tuple(indices.shape)}")
        if bool(((indices < 0) | (indices >= self.num_samples)).any()):
            raise ValueError(f"sample indices must lie in [0, {self.num_samples})")
        log_p = torch.log_softmax(logits, dim=1)  # (B, K)
        p = log_p.exp()
        split = torch.searchsorted(self.boundaries, indices, right=True) - 1  # (B,)
        self.probability_sums.index_add_(0, split, p)
        self.negative_entropy_sums.index_add_(0, split, torch.xlogy(p, p).sum(dim=1))
        self.counts.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        return self

    def all_reduce(self, group=None) -> "InceptionScoreStatistics":
        """Sum over the processes of ``torch.distributed`` (no-op when it is not initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for tensor in (self.probability_sums, self.negative_entropy_sums, self.counts):
                dist.all_reduce(tensor, group=group)
        return self

    def score(self) -> tuple[float, float]:
        """(mean, standard deviation) over the splits of ``exp(KL(p(y|x) || p(y)))``."""
        if bool((self.counts < 1).any()):
            raise ValueError("some splits received no samples")
        p_y = self.probability_sums / self.counts[:, None]  # (S, K)
        kl = self.negative_entropy_sums / self.counts - torch.xlogy(p_y, p_y).sum(dim=1)  # (S,)
        scores = kl.exp().cpu().numpy()
        return float(scores.mean()), float(scores.std())


def inception_score(logits: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """The Inception Score of logits (N, K): mean and std over ``splits`` of ``exp(E_x KL(p(y|x) || p(y)))``.

    It is 1 when every prediction is the same distribution and K when predictions are
    confident one-hots spread evenly over the K classes within each split.
    """
    logits = torch.as_tensor(logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got {tuple(logits.shape)}")
    statistics = InceptionScoreStatistics(logits.shape[0], logits.shape[1], splits)
    return statistics.update(logits, torch.arange(logits.shape[0])).score()


__all__ = [
    "INCEPTION_FEATURE_DIM",
    "INCEPTION_NUM_LOGITS",
    "INCEPTION_WEIGHTS_FILE",
    "InceptionFeatureExtractor",
    "InceptionScoreStatistics",
    "InceptionWeightsUnavailable",
    "check_weights",
    "default_weights_path",
    "images_to_uint8_rgb",
    "inception_module",
    "inception_network",
    "inception_score",
    "precision_recall",
    "read_weights_file",
    "untrained_inception_network",
]
