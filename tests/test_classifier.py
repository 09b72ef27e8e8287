"""The project-trained domain classifier: accuracy, domain FID sanity, save / load."""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("safetensors")

from meanflow.eval.classifier import (  # noqa: E402
    ClassifierConfig,
    DomainClassifier,
    DomainFeatureExtractor,
    classifier_accuracy,
    classifier_info,
    domain_features,
    domain_fid,
    load_classifier,
    save_classifier,
    train_domain_classifier,
)


@pytest.fixture(scope="module")
def mnist():
    from conftest import SHARED_DATA

    path = os.path.join(SHARED_DATA, "mnist.npz")
    if not os.path.isfile(path):
        pytest.skip("../shared/data/mnist.npz is absent (offline data sets for tests are optional)")
    with np.load(path) as data:
        return {key: torch.from_numpy(data[key]) for key in ("x_train", "y_train", "x_test", "y_test")}


@pytest.fixture(scope="module")
def classifier(mnist):
    # 6000 training images, 150 steps of 64: ~96% on the test set, in seconds on a laptop CPU.
    return train_domain_classifier(mnist["x_train"][:6000], mnist["y_train"][:6000], steps=150, batch_size=64, seed=0)


def test_short_training_on_a_subset_classifies_the_test_set(shared_data, classifier, mnist):
    accuracy = classifier_accuracy(classifier, mnist["x_test"][:2000], mnist["y_test"][:2000])
    assert accuracy > 0.9


def test_accuracy_with_shuffled_labels_is_chance(shared_data, classifier, mnist):
    labels = mnist["y_test"][:2000]
    shuffled = labels[torch.randperm(2000, generator=torch.Generator().manual_seed(0))]
    assert 0.05 < classifier_accuracy(classifier, mnist["x_test"][:2000], shuffled) < 0.16


def test_domain_fid_separates_real_from_noise(shared_data, classifier, mnist):
    first, second = mnist["x_test"][:1000], mnist["x_test"][1000:2000]
    noise = torch.rand((1000, 1, 28, 28), generator=torch.Generator().manual_seed(0)) * 2 - 1
    real_vs_real = domain_fid(classifier, first, second)
    real_vs_noise = domain_fid(classifier, first, noise)
    assert real_vs_real >= 0 and real_vs_noise > 20 * real_vs_real
    # Features of uint8 and of the equivalent [-1, 1] floats agree.
    torch.testing.assert_close(domain_features(classifier, first[:8]),
                               domain_features(classifier, first[:8].float() / 127.5 - 1), rtol=1e-5, atol=1e-5)


def test_save_and_load_round_trip(shared_data, classifier, mnist, tmp_path):
    folder = save_classifier(classifier, tmp_path / "mnist_classifier", info={"dataset": "mnist", "steps": 150})
    loaded = load_classifier(folder)
    images = mnist["x_test"][:16]
    torch.testing.assert_close(domain_features(loaded, images), domain_features(classifier, images), rtol=0, atol=0)
    record = classifier_info(folder)
    assert record["config"]["feature_dim"] == 128 and record["info"]["dataset"] == "mnist"
    assert record["fingerprint"] == DomainFeatureExtractor(loaded).fingerprint
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.json", "classifier.safetensors"]


def test_other_sizes_are_resized_and_shapes_are_checked():
    model = DomainClassifier(ClassifierConfig()).eval()
    for side in (8, 32, 64):
        features = domain_features(model, torch.rand(3, 1, side, side) * 2 - 1)
        assert features.shape == (3, 128) and bool(torch.isfinite(features).all())
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        domain_features(model, torch.zeros(2, 3, 28, 28))
    with pytest.raises(FileNotFoundError, match="no domain classifier"):
        load_classifier("/nonexistent/classifier")


def test_training_is_deterministic_given_the_seed():
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 1, 8, 8, generator=generator) * 2 - 1, torch.arange(64) % 3
    first = train_domain_classifier(images, labels, steps=3, batch_size=16, seed=5)
    second = train_domain_classifier(images, labels, steps=3, batch_size=16, seed=5)
    assert first.config.num_classes == 3
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
