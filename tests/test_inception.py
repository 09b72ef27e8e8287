"""The TF-FID Inception-v3 wrapper with random weights, and IS / precision-recall closed forms.

The real weights cannot be downloaded here, so the real architecture (torch-fidelity's network
class) is loaded from a file of random tensors laid out as the official file is (a plain dict of
the conv, batch-norm and fc tensors, no ``num_batches_tracked``): every path but the numbers of
the weights is the one used for real FID. The file is written once per module; few images keep
this file fast. Malicious files (pickles that would run code) are tested in test_no_pickle.py.
"""

import importlib.util
import shutil
import urllib.error

import numpy as np
import pytest

# Not importorskip: ``import torch_fidelity`` itself needs torchvision, which this project never
# installs; meanflow imports torch-fidelity's torch-only Inception module alone.
if importlib.util.find_spec("torch_fidelity") is None:
    pytest.skip("torch-fidelity is optional: pip install --no-deps torch-fidelity", allow_module_level=True)
import torch

pytest.importorskip("scipy")
inception = pytest.importorskip("meanflow.eval.inception")

from meanflow.eval.inception import (  # noqa: E402
    INCEPTION_WEIGHTS_FILE,
    InceptionFeatureExtractor,
    InceptionScoreStatistics,
    InceptionWeightsUnavailable,
    default_weights_path,
    images_to_uint8_rgb,
    inception_score,
    precision_recall,
    untrained_inception_network,
)
from meanflow.fingerprints import state_fingerprint  # noqa: E402


def library():
    try:
        return inception.inception_module()
    except ImportError:
        pytest.skip("torch-fidelity is not installed")


def official_layout():
    """{name: (shape, dtype)} of the official file: the network's state dict without the
    batch-norm counters (torch-fidelity's converter writes conv, batch-norm and fc tensors only)."""
    library()
    return {key: (value.shape, value.dtype) for key, value in untrained_inception_network().state_dict().items()
            if not key.endswith("num_batches_tracked")}


def random_state(seed=0):
    """Random tensors in the official layout.

    He-normal convolutions and identity batch norms keep activations at a sane scale through
    the ~100 layers, so the features are far from zero and differences between inputs show.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, (shape, dtype) in official_layout().items():
        if key.endswith(("running_var", "bn.weight")):
            state[key] = torch.ones(shape, dtype=dtype)
        elif key.endswith(("running_mean", "bn.bias")) or key == "fc.bias":
            state[key] = torch.zeros(shape, dtype=dtype)
        else:  # conv and fc weights
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=generator, dtype=dtype) * (2.0 / fan_in) ** 0.5
    return state


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """The random state dict saved with torch.save of a plain dict, as the official file is."""
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(random_state(), path)
    return path


@pytest.fixture(scope="module")
def extractor(random_weights):
    return InceptionFeatureExtractor(weights_path=random_weights, batch_size=2)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch home: the default weights location is inside ``tmp_path``, and any download
    attempt fails as it would offline (nothing in these tests reaches the network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)  # a set_dir() elsewhere must not win
    assert default_weights_path() == tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE

    def offline(url, destination):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception, "_download_weights", offline)
    return tmp_path / "torch"


def random_images(count, channels=3, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, channels, size, size), generator=generator, dtype=torch.uint8)


def test_the_official_layout_loads_into_a_working_feature_extractor(extractor, random_weights):
    # The random tensors are in the network; the counters the file lacks are the network's zeros.
    stored = torch.load(random_weights, weights_only=True)
    loaded = extractor.network.state_dict()
    assert set(loaded) - set(stored) == {key for key in loaded if key.endswith("num_batches_tracked")}
    assert all(torch.equal(loaded[key].cpu(), value) for key, value in stored.items())
    assert not extractor.network.training
    features = extractor(random_images(2))
    assert features.shape == (2, 2048) and features.dtype == torch.float32


def test_features_do_not_depend_on_input_type_channels_or_batching(extractor):
    # Five image forward passes in all: the network is the real 24M-parameter one.
    rgb, grey = random_images(1, seed=0), random_images(1, channels=1, seed=1)
    together = extractor(torch.cat([rgb, grey.expand(-1, 3, -1, -1)]))  # one batch of two, uint8
    assert together.shape == (2, 2048) and together.dtype == torch.float32
    assert bool(torch.isfinite(together).all()) and float(together.std()) > 1e-3  # not degenerate
    assert float((together[0] - together[1]).abs().max()) > 1e-3  # the comparisons below can fail
    as_float = rgb.float() / 127.5 - 1.0  # exactly representable levels: they round back
    torch.testing.assert_close(extractor(as_float)[0], together[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(extractor(grey)[0], together[1], rtol=1e-4, atol=1e-5)  # 1 channel -> 3
    larger = random_images(1, channels=1, size=64, seed=2)[:, 0]  # (B, H, W) at 64 x 64
    features, logits = extractor.features_and_logits(larger)
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
    assert bool(torch.isfinite(features).all()) and bool(torch.isfinite(logits).all())


def test_extractor_name_identifies_the_weights(extractor, random_weights, tmp_path):
    assert extractor.name.startswith("inception-v3-tf2015-")
    stored = torch.load(random_weights, weights_only=True)
    counters = {key: torch.zeros((), dtype=torch.long) for key in extractor.network.state_dict()
                if key.endswith("num_batches_tracked")}
    assert extractor.fingerprint == state_fingerprint({**stored, **counters})
    # The same weights with the counters stored (a network's own state_dict saved) are the same weights.
    torch.save({**stored, **counters}, tmp_path / "with_counters.pth")
    assert InceptionFeatureExtractor(weights_path=tmp_path / "with_counters.pth").fingerprint == extractor.fingerprint


def test_the_default_location_is_read_by_the_same_safe_path(torch_home, random_weights, monkeypatch):
    calls = []
    load = torch.load

    def recording(*args, **kwargs):  # every torch.load, torch-fidelity's included, passes through here
        calls.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    default_weights_path().parent.mkdir(parents=True)
    shutil.copy(random_weights, default_weights_path())
    extractor = InceptionFeatureExtractor()
    assert extractor.weights_path == default_weights_path() and calls == [True]
    assert extractor.fingerprint == InceptionFeatureExtractor(weights_path=random_weights).fingerprint


def test_a_download_lands_in_the_cache_and_is_read_like_a_local_file(torch_home, random_weights, monkeypatch):
    urls = []

    def download(url, destination):
        urls.append(url)
        shutil.copy(random_weights, destination)

    monkeypatch.setattr(inception, "_download_weights", download)
    destination = default_weights_path()
    destination.parent.mkdir(parents=True)
    extractor = InceptionFeatureExtractor()
    assert urls == [library().URL_INCEPTION_V3] and urls[0].endswith(INCEPTION_WEIGHTS_FILE)
    assert extractor.weights_path == destination and destination.is_file()


def test_offline_failure_names_the_file_the_cache_folder_and_the_option(torch_home):
    library()
    with pytest.raises(InceptionWeightsUnavailable) as raised:
        InceptionFeatureExtractor()
    message = str(raised.value)
    assert INCEPTION_WEIGHTS_FILE in message and "--inception-weights" in message
    assert str(default_weights_path().parent) in message and "no network" in message


def test_missing_or_wrong_weights_files_are_reported(tmp_path):
    library()
    with pytest.raises(FileNotFoundError, match="no Inception weights file") as raised:
        InceptionFeatureExtractor(weights_path=tmp_path / "absent.pth")
    assert "--inception-weights" in str(raised.value) and INCEPTION_WEIGHTS_FILE in str(raised.value)
    state = random_state()
    cases = {
        "list": ([torch.zeros(3)], "holds a list, not a state dict"),
        "numbers": ({"fc.weight": 1.0}, "not a name and a tensor"),
        "few": ({"fc.weight": state["fc.weight"]}, "does not hold the TF-FID Inception-v3 weights"),
        "extra": ({**state, "head.weight": torch.zeros(2)}, r"1 not in the network \(e.g. \['head.weight'\]\)"),
        "shape": ({**state, "fc.bias": torch.zeros(1000)}, r"fc.bias: file \(1000,\)"),
        "kind": ({**state, "fc.bias": torch.zeros(1008, dtype=torch.long)}, "of another shape or kind"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / f"{name}.pth")
        with pytest.raises(ValueError, match=message):
            InceptionFeatureExtractor(weights_path=tmp_path / f"{name}.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="no torch.save file of tensors") as raised:
        InceptionFeatureExtractor(weights_path=tmp_path / "text.pth")
    assert "weights_only" not in str(raised.value)


def test_missing_tensors_are_named(tmp_path):
    state = random_state()
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['Mixed_7c.branch_pool.conv.weight'\]\)"):
        InceptionFeatureExtractor(weights_path=tmp_path / "short.pth")


def test_image_conversion():
    floats = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 6)
    converted = images_to_uint8_rgb(floats)
    assert converted.shape == (1, 3, 1, 6) and converted.dtype == torch.uint8
    assert converted[0, 0, 0].tolist() == [0, 64, 128, 255, 255, 255]
    with pytest.raises(ValueError, match="C in"):
        images_to_uint8_rgb(torch.zeros(1, 2, 4, 4))


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(100, 7), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_number_of_classes():
    labels = torch.arange(1000) % 10  # every split of 100 holds each class 10 times
    logits = 100.0 * torch.nn.functional.one_hot(labels, 10).double()
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-10) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_the_direct_formula_and_streams_in_any_order():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((103, 5)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for s in range(4):
        part = p[s * 103 // 4:(s + 1) * 103 // 4]
        p_y = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(p_y))).sum(1).mean()))
    expected = (np.mean(scores), np.std(scores))
    assert inception_score(logits, splits=4) == pytest.approx(expected, rel=1e-10)
    order = rng.permutation(103)
    streamed = InceptionScoreStatistics(103, 5, splits=4)
    for chunk in np.array_split(order, 9):
        streamed.update(logits[chunk], chunk)
    assert streamed.score() == pytest.approx(expected, rel=1e-10)


def test_precision_recall_of_a_set_with_itself_is_one_and_of_far_sets_is_zero():
    rng = np.random.default_rng(1)
    points = rng.standard_normal((200, 8))
    assert precision_recall(points, points, k=3, chunk_size=64) == {"precision": 1.0, "recall": 1.0}
    far = points + 100.0
    assert precision_recall(points, far, k=3, chunk_size=64) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_of_a_collapsed_generator():
    # All fakes near one real point: precise (inside the real manifold) but no recall.
    rng = np.random.default_rng(2)
    real = rng.standard_normal((300, 2))
    fake = real[:1] + 1e-3 * rng.standard_normal((50, 2))
    scores = precision_recall(real, fake, k=3)
    assert scores["precision"] == 1.0 and scores["recall"] < 0.05
