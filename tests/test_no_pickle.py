"""Nothing the library reads is unpickled: a file whose pickle would run code is refused, the code
never runs, and the message never advises unpickling (``weights_only=False``, ``allow_pickle=True``).

Every test plants a pickle whose ``__reduce__`` would write a marker file, hands it to one load
path (Inception weights at the default location and at a given path, .npz archives, a checkpoint,
a latent cache, a domain classifier, a VAE folder, CIFAR-10 batches), and checks the refusal and
that the marker was never written. The first test shows the payload does write it when unpickled.
"""

import builtins
import importlib.util
import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from meanflow.data.arrays import load_array_dataset
from meanflow.data.memory import load_npz_data

ADVICE = ("weights_only=False", "allow_pickle=True", "allow_pickle=`", "trust the file", "pickle.load(")


class WritesMarker:
    """Unpickling this runs ``open(marker, "w").write(...)`` through ``builtins.exec``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('the pickle ran')",))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a pickled payload ran"


def assert_refused_without_advice(raised):
    message = str(raised.value)
    assert not any(advice in message for advice in ADVICE), message
    return message


def dump(path: Path, payload, protocol=pickle.DEFAULT_PROTOCOL) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(payload, handle, protocol=protocol)
    return path


def test_the_payload_runs_when_unpickled(tmp_path):
    target = tmp_path / "ran"
    pickle.loads(pickle.dumps(WritesMarker(target)))
    assert target.read_text() == "the pickle ran"


# ------------------------------------------------------------------------------------------------
# Inception weights: the default location (torch hub's cache) and --inception-weights PATH

def _has_torch_fidelity():
    return importlib.util.find_spec("torch_fidelity") is not None


def malicious_weights(marker: Path, path: Path, kind: str) -> Path:
    """A weights file that would run the payload: torch.save of a dict holding it (zip format or
    the legacy format), or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        torch.save({"fc.weight": torch.zeros(1008, 2048), "fc.bias": WritesMarker(marker)}, path)
    elif kind == "legacy":
        torch.save({"fc.bias": WritesMarker(marker)}, path, _use_new_zipfile_serialization=False)
    else:
        dump(path, WritesMarker(marker))
    return path


@pytest.fixture
def inception(tmp_path, monkeypatch):
    """meanflow.eval.inception with the default location under ``tmp_path``, no download, and a
    record of every torch.load (torch-fidelity's included) and of torch-fidelity's own loader."""
    if not _has_torch_fidelity():
        pytest.skip("torch-fidelity is optional: pip install --no-deps torch-fidelity")
    from meanflow.eval import inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    assert inception.default_weights_path().is_relative_to(tmp_path)

    def no_download(url, destination):
        raise AssertionError("the file is there: nothing may be downloaded")

    monkeypatch.setattr(inception, "_download_weights", no_download)
    loads, load = [], torch.load

    def recording(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)

    def library_loader(*args, **kwargs):
        raise AssertionError("torch-fidelity was left to load weights itself")

    monkeypatch.setattr(inception.inception_module(), "load_state_dict_from_url", library_loader)
    inception.loads = loads
    return inception


@pytest.mark.parametrize("kind", ["zip", "legacy", "bare pickle"])
@pytest.mark.parametrize("where", ["default location", "given path"])
def test_inception_weights_that_would_run_code_are_refused(inception, marker, tmp_path, where, kind):
    if where == "default location":
        malicious_weights(marker, inception.default_weights_path(), kind)
        arguments = {}
    else:
        arguments = {"weights_path": malicious_weights(marker, tmp_path / "given" / "weights.pth", kind)}
    with pytest.raises(ValueError, match="would need unpickling, which meanflow refuses") as raised:
        inception.InceptionFeatureExtractor(**arguments)
    message = assert_refused_without_advice(raised)
    assert "weights_only" not in message
    if kind != "bare pickle":
        assert "asks for the Python object exec" in message  # names what the file asks for
    assert inception.loads == [True]  # one load, the safe one; torch-fidelity opened nothing


def test_the_untrained_network_reads_and_downloads_nothing(inception):
    network = inception.untrained_inception_network()
    assert inception.loads == [] and not network.training
    assert len(network.state_dict()) == 566  # 94 conv + 94 x 5 batch-norm tensors + fc weight and bias


# ------------------------------------------------------------------------------------------------
# .npz / .npy archives: object arrays and bare pickles

def object_array(marker):
    return np.array([WritesMarker(marker), 1], dtype=object)


def test_npz_training_data_with_object_arrays_or_pickles_is_refused(marker, tmp_path):
    np.savez(tmp_path / "objects.npz", x=object_array(marker))
    dump(tmp_path / "pickle.npz", {"x": WritesMarker(marker)})
    with pytest.raises(ValueError, match="store numeric arrays only") as raised:
        load_npz_data(tmp_path / "objects.npz", class_conditional=False)
    assert_refused_without_advice(raised)
    with pytest.raises(ValueError, match="pickled data is never loaded") as raised:
        load_npz_data(tmp_path / "pickle.npz", class_conditional=False)
    assert_refused_without_advice(raised)


def test_array_data_sets_with_object_arrays_or_pickles_are_refused(marker, tmp_path):
    np.savez(tmp_path / "objects.npz", x_train=object_array(marker), y_train=np.zeros(2, dtype=np.int64))
    dump(tmp_path / "pickle.npz", {"x_train": WritesMarker(marker)})
    with pytest.raises(ValueError) as raised:
        load_array_dataset("mnist", path=tmp_path / "objects.npz")
    assert_refused_without_advice(raised)
    with pytest.raises(ValueError, match="pickled data is never loaded") as raised:
        load_array_dataset("mnist", path=tmp_path / "pickle.npz")
    assert_refused_without_advice(raised)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # numpy's advice not chained


def test_sample_files_with_object_arrays_or_pickles_are_refused(marker, tmp_path):
    from meanflow.sample_files import read_sample_file

    np.savez(tmp_path / "objects.npz", arr_0=object_array(marker))
    dump(tmp_path / "pickle.npz", WritesMarker(marker))
    for name in ("objects.npz", "pickle.npz"):
        with pytest.raises(ValueError, match="pickled data") as raised:
            read_sample_file(tmp_path / name)
        assert_refused_without_advice(raised)


def test_statistics_and_reference_batches_with_object_arrays_or_pickles_are_refused(marker, tmp_path):
    pytest.importorskip("scipy")
    from meanflow.eval.frechet import load_statistics
    from meanflow.eval.references import reference_features

    np.savez(tmp_path / "objects.npz", mu=object_array(marker), sigma=np.eye(2))
    dump(tmp_path / "pickle.npz", {"mu": WritesMarker(marker)})
    with pytest.raises(ValueError) as raised:
        load_statistics(tmp_path / "objects.npz")
    assert_refused_without_advice(raised)
    with pytest.raises(ValueError, match="pickled data is never loaded") as raised:
        load_statistics(tmp_path / "pickle.npz")
    assert_refused_without_advice(raised)
    # An ADM-style reference batch whose images are objects (precision / recall reads arr_0).
    np.savez(tmp_path / "reference.npz", mu=np.zeros(2), sigma=np.eye(2), arr_0=object_array(marker))
    with pytest.raises(ValueError) as raised:
        reference_features(tmp_path / "reference.npz", extractor=None, count=2)
    assert_refused_without_advice(raised)


# ------------------------------------------------------------------------------------------------
# A checkpoint, a domain classifier and a VAE folder whose weight files are pickles

def test_a_checkpoint_whose_weights_are_pickles_is_refused(marker, tmp_path):
    pytest.importorskip("safetensors")
    from meanflow.checkpoint import load_checkpoint, load_weights

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    trainer = {"step": 1, "optimizer": {"param_groups": [], "scalars": {}}}
    (folder / "trainer.json").write_text(json.dumps(trainer))
    for kind in ("zip", "legacy", "bare pickle"):
        for part in ("model", "ema", "optimizer"):
            malicious_weights(marker, folder / f"{part}.safetensors", kind)
        for load in (load_weights, load_checkpoint):
            with pytest.raises(ValueError) as raised:
                load(folder)
            assert "model.safetensors" in assert_refused_without_advice(raised)  # the weights were reached


def test_a_domain_classifier_whose_weights_are_a_pickle_is_refused(marker, tmp_path):
    pytest.importorskip("safetensors")
    from meanflow.eval.classifier import (
        ClassifierConfig,
        DomainClassifier,
        load_classifier,
        save_classifier,
    )

    folder = save_classifier(DomainClassifier(ClassifierConfig(input_size=8, width=4, feature_dim=8)), tmp_path / "c")
    weights = next(Path(folder).glob("*.safetensors"))
    torch.save({"weight": WritesMarker(marker)}, weights)
    with pytest.raises(Exception) as raised:  # safetensors' own SafetensorError: the header is no JSON table
        load_classifier(folder)
    assert_refused_without_advice(raised)


def test_a_vae_folder_whose_weights_are_a_pickle_is_refused(marker, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from meanflow.vae import VAEUnavailableError, clear_vae_cache, load_vae

    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=False)  # diffusion_pytorch_model.bin, torch.save
    (weights,) = (tmp_path / "vae").glob("diffusion_pytorch_model.*")
    torch.save({"encoder.conv_in.weight": WritesMarker(marker)}, weights)
    clear_vae_cache()
    try:
        with pytest.raises(VAEUnavailableError) as raised:
            load_vae(tmp_path / "vae")
    finally:
        clear_vae_cache()
    assert_refused_without_advice(raised)


# ------------------------------------------------------------------------------------------------
# The latent cache

def write_latent_cache(folder: Path, moments, labels) -> Path:
    from meanflow.data.latent_format import (
        CACHE_FORMAT,
        CACHE_VERSION,
        MANIFEST_NAME,
        shard_file_names,
    )
    from meanflow.vae import SD_VAE_SCALE_FACTOR

    folder.mkdir(parents=True)
    manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "complete": True, "num_shards": 1,
                "num_images": 2, "scale_factor": SD_VAE_SCALE_FACTOR, "class_names": ["a", "b"],
                "latent_shape": [4, 2, 2], "flip": False, "moments": ["mean", "std"],
                "shards": [{"index": 0, "start": 0, "count": 2}]}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    moments_name, labels_name = shard_file_names(0)
    for name, content in ((moments_name, moments), (labels_name, labels)):
        if isinstance(content, np.ndarray):
            np.save(folder / name, content, allow_pickle=True)
        else:
            dump(folder / name, content)
    return folder


def test_a_latent_cache_holding_pickles_is_refused(marker, tmp_path):
    from meanflow.data.latent_dataset import LatentDataset

    good_moments = np.zeros((2, 2, 4, 2, 2), dtype=np.float32)
    good_labels = np.zeros(2, dtype=np.int64)
    LatentDataset(write_latent_cache(tmp_path / "good", good_moments, good_labels))  # the layout is right
    cases = {
        "pickled moments": (WritesMarker(marker), good_labels, "pickled data is never loaded"),
        "object moments": (object_array(marker), good_labels, "not a numeric .npy array"),
        "pickled labels": (good_moments, WritesMarker(marker), "pickled data is never loaded"),
        "object labels": (good_moments, object_array(marker), "pickled data is never loaded"),
    }
    for name, (moments, labels, message) in cases.items():
        with pytest.raises(ValueError, match=message) as raised:
            LatentDataset(write_latent_cache(tmp_path / name.replace(" ", "_"), moments, labels))
        assert_refused_without_advice(raised)


# ------------------------------------------------------------------------------------------------
# CIFAR-10 python batches: the restricted unpickler admits numpy arrays and plain containers only

def cifar_folder(tmp_path: Path, batch, protocol=2) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    for file in [f"data_batch_{i}" for i in range(1, 6)]:
        dump(folder / file, batch, protocol=protocol)
    return tmp_path


class Calls:
    """Pickles as a call of ``function(*arguments)`` (what a tampered batch can ask for)."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return (self.function, self.arguments)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches_that_would_run_code_are_refused(marker, tmp_path, protocol):
    batch = {b"extra": WritesMarker(marker), b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}
    with pytest.raises(ValueError, match=r"refusing (__builtin__|builtins)\.exec") as raised:
        load_array_dataset("cifar10", path=cifar_folder(tmp_path, batch, protocol))
    assert_refused_without_advice(raised)


@pytest.mark.parametrize("function, arguments", [
    (os.system, ("echo ran",)),
    (subprocess.call, (["true"],)),
    (builtins.eval, ("1",)),
    (builtins.getattr, ("text", "upper")),
    (builtins.__import__, ("os",)),
    (np.load, ("x.npy",)),
    (pickle.loads, (b"",)),
    (np.frombuffer, (b"\0",)),
], ids=lambda value: getattr(value, "__name__", None) if callable(value) else "")
def test_cifar_batches_refuse_every_callable_but_numpy_array_reconstruction(tmp_path, function, arguments):
    batch = {b"data": Calls(function, *arguments), b"labels": []}
    with pytest.raises(ValueError, match="refusing") as raised:
        load_array_dataset("cifar10", path=cifar_folder(tmp_path, batch))
    assert_refused_without_advice(raised)


def test_cifar_batches_of_arrays_lists_and_bytes_still_load(tmp_path):
    pixels = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    batch = {b"batch_label": b"training batch", b"data": pixels, b"labels": [3, 7],
             b"filenames": [b"a.png", b"b.png"]}
    images, labels = load_array_dataset("cifar10", path=cifar_folder(tmp_path, batch))
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == [3, 7] * 5
    assert torch.equal(images[0].reshape(-1), torch.from_numpy(pixels[0]))  # channel-major rows


def test_a_cifar_download_is_read_by_the_restricted_unpickler_never_by_torchvision(marker, tmp_path, monkeypatch):
    """torchvision cannot be installed beside this torch build, so a stand-in with its public
    names plays it: the download helper writes the batches (one with a payload), and the
    dataset class, whose loader unpickles without restriction, must never be built."""
    import sys
    import types

    batch = {b"extra": WritesMarker(marker), b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}

    class CIFAR10:
        url, filename, tgz_md5 = "https://example.invalid/cifar-10-python.tar.gz", "cifar-10-python.tar.gz", "0"

        def __init__(self, *args, **kwargs):
            raise AssertionError("torchvision's CIFAR10 (plain pickle.load) must not be used")

    def download_and_extract_archive(url, root, filename=None, md5=None):
        assert (url, filename, md5) == (CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)
        cifar_folder(Path(root), batch)

    datasets = types.ModuleType("torchvision.datasets")
    datasets.CIFAR10 = CIFAR10
    utils = types.ModuleType("torchvision.datasets.utils")
    utils.download_and_extract_archive = download_and_extract_archive
    datasets.utils = utils
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    monkeypatch.setitem(sys.modules, "torchvision.datasets.utils", utils)
    with pytest.raises(ValueError, match="refusing") as raised:
        load_array_dataset("cifar10", download_root=tmp_path)
    assert_refused_without_advice(raised)
