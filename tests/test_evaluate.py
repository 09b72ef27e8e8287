"""Checkpoint evaluation end to end with the domain metric on a tiny digits run."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("safetensors")
pytest.importorskip("sklearn")

from meanflow.eval.classifier import (  # noqa: E402
    DomainFeatureExtractor,
    save_classifier,
    train_domain_classifier,
)
from meanflow.eval.evaluate import EvalSettings, evaluate_checkpoint  # noqa: E402
from meanflow.eval.frechet import FeatureStatistics, save_statistics  # noqa: E402
from meanflow.eval.protocol import (  # noqa: E402
    SamplePlan,
    SamplerSetting,
    sample_labels,
    stream_sample_statistics,
)
from meanflow.eval.references import (  # noqa: E402
    ReferenceSpec,
    load_reference_images,
    parse_reference,
    reference_features,
)
from meanflow.eval.reports import DOMAIN_NOTE  # noqa: E402
from meanflow.inference import load_model  # noqa: E402
from meanflow.noise import sample_noise  # noqa: E402
from meanflow.presets import preset  # noqa: E402
from meanflow.train import train  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = preset("digits").with_overrides([
        "training.steps=20", "training.batch_size=32", "training.log_every=10", "training.checkpoint_every=20",
        "model.options.hidden_size=32", "model.options.depth=2", "model.options.num_heads=2",
        "training.grid_samples=10", "training.grid_steps=[1]", "training.ema_decays=[0.9, 0.99]",
    ])
    folder = tmp_path_factory.mktemp("digits_run")
    train(config, folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    images, labels = load_reference_images(ReferenceSpec("digits", "all"))
    model = train_domain_classifier(images, labels, steps=60, batch_size=64, seed=0)
    return save_classifier(model, tmp_path_factory.mktemp("classifier") / "digits", info={"dataset": "digits"})


def evaluate(run, classifier, cache, **overrides):
    settings = dict(num_samples=50, steps=(1, 2), metric="domain", reference="digits",
                    classifier_path=classifier, batch_size=50, seed=3, cache_dir=cache, progress=False)
    settings.update(overrides)
    extractor = settings.pop("feature_extractor", None)
    return evaluate_checkpoint(run, EvalSettings(**settings), feature_extractor=extractor)


def test_report_records_every_setting_and_the_scores(run, classifier, tmp_path):
    report = evaluate(run, classifier, tmp_path / "cache", save_samples=tmp_path / "samples", intermediate=0.4)
    json.dumps(report)  # JSON-able as it stands
    for key in ("checkpoint", "step", "weights", "metric", "feature_extractor", "classifier", "reference",
                "num_samples", "seed", "label_mode", "steps", "intermediate", "ode", "guidance_scale",
                "batch_size", "world_size", "scores", "note", "created", "meanflow_version"):
        assert key in report, key
    assert report["step"] == 20 and report["weights"] == "ema_0.9" and report["metric"] == "domain"
    assert report["num_samples"] == 50 and report["seed"] == 3 and report["label_mode"] == "balanced"
    assert report["steps"] == [1, 2] and report["note"] == DOMAIN_NOTE
    assert report["feature_extractor"].startswith("domain-classifier-")
    reference = report["reference"]
    assert reference["source"] == "digits:all" and reference["num_images"] == 1797 and reference["resolution"] == 8
    assert reference["key"] == f"digits-all-8px-uint8-{report['feature_extractor']}"
    assert (tmp_path / "cache" / f"{reference['key']}.npz").is_file()
    assert [entry["steps"] for entry in report["scores"]] == [1, 2]
    assert [entry["nfe"] for entry in report["scores"]] == [1, 2]
    assert [entry["intermediate"] for entry in report["scores"]] == [None, 0.4]
    for entry in report["scores"]:
        assert entry["fid"] > 0 and np.isfinite(entry["fid"]) and 0.0 <= entry["accuracy"] <= 1.0
    with np.load(tmp_path / "samples" / "samples_steps2_t0.4.npz") as saved:  # ADM's sample format
        assert saved["arr_0"].shape == (50, 8, 8, 1) and saved["arr_0"].dtype == np.uint8
        assert saved["arr_1"].tolist() == [i % 10 for i in range(50)]
    assert report["scores"][1]["samples_file"].endswith("samples_steps2_t0.4.npz")
    assert (tmp_path / "samples" / "samples_steps2_t0.4.png").stat().st_size > 100
    assert not list((tmp_path / "samples").glob("*.npy")) and not list((tmp_path / "samples").glob("*.tmp"))


def test_scores_do_not_depend_on_the_batch_size_and_reuse_the_cache(run, classifier, tmp_path):
    small = evaluate(run, classifier, tmp_path, batch_size=7)
    large = evaluate(run, classifier, tmp_path, batch_size=50)
    for a, b in zip(small["scores"], large["scores"], strict=True):
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-6, abs=1e-8)
        assert a["accuracy"] == b["accuracy"]
    assert len(list(tmp_path.glob("*.npz"))) == 1  # computed once, then read back


def test_streaming_in_batches_of_7_equals_batches_of_50_and_shards_merge(run, classifier):
    from meanflow.eval.classifier import load_classifier

    loaded = load_model(run)
    extractor = DomainFeatureExtractor(load_classifier(classifier))
    labels = sample_labels(50, loaded.num_classes, "balanced", seed=0)

    def stream(batch_size, rank=0, world_size=1):
        plan = SamplePlan(50, loaded.sample_shape, labels, loaded.num_classes, seed=0, batch_size=batch_size,
                          rank=rank, world_size=world_size)
        return stream_sample_statistics(loaded.model, SamplerSetting(loaded.sampler, 1), plan, loaded.encoder,
                                        extractor).features

    whole, streamed = stream(50), stream(7)
    assert whole.count == streamed.count == 50
    np.testing.assert_allclose(streamed.mean(), whole.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed.covariance(), whole.covariance(), rtol=1e-4, atol=1e-5)
    shards = FeatureStatistics(whole.dim)
    for rank in range(3):
        shards.merge(stream(7, rank, 3))
    assert shards.count == 50
    np.testing.assert_allclose(shards.covariance(), whole.covariance(), rtol=1e-4, atol=1e-5)


def test_noise_and_labels_depend_only_on_the_sample_index():
    noise = sample_noise(4, torch.arange(10), (1, 8, 8))
    torch.testing.assert_close(sample_noise(4, torch.arange(3, 6), (1, 8, 8)), noise[3:6], rtol=0, atol=0)
    assert not torch.equal(sample_noise(5, torch.arange(3), (1, 8, 8)), noise[:3])
    assert sample_labels(12, 10, "balanced", 0).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    random = sample_labels(1000, 10, "random", 0)
    assert torch.equal(random, sample_labels(1000, 10, "random", 0)) and len(set(random.tolist())) == 10
    assert sample_labels(5, None, "balanced", 0) is None


def test_a_statistics_file_can_be_the_reference(run, classifier, tmp_path):
    report = evaluate(run, classifier, tmp_path / "cache", steps=(1,))
    cached = tmp_path / "cache" / f"{report['reference']['key']}.npz"
    from_file = evaluate(run, classifier, tmp_path / "unused", steps=(1,), reference=str(cached))
    assert from_file["scores"][0]["fid"] == pytest.approx(report["scores"][0]["fid"], rel=1e-12)
    save_statistics(tmp_path / "wrong_dim.npz", np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="dimension 4"):
        evaluate(run, classifier, tmp_path, steps=(1,), reference=str(tmp_path / "wrong_dim.npz"))


def test_bad_settings_are_refused(run, classifier, tmp_path):
    with pytest.raises(ValueError, match="metric must be one of"):
        evaluate(run, classifier, tmp_path, metric="kid")
    with pytest.raises(ValueError, match="label_mode must be one of"):
        evaluate(run, classifier, tmp_path, label_mode="sorted")
    with pytest.raises(ValueError, match="needs a trained classifier"):
        evaluate(run, None, tmp_path)
    with pytest.raises(ValueError, match="torch.distributed"):
        evaluate(run, classifier, tmp_path, rank=0, world_size=2)
    with pytest.raises(ValueError, match="splits"):
        parse_reference("mnist:validation")
    with pytest.raises(ValueError, match="unknown reference"):
        parse_reference("cifar100")
    assert parse_reference("digits:train") == ReferenceSpec("digits", "all")
    assert parse_reference("fashion_mnist") == ReferenceSpec("fashion-mnist", "train")
    assert parse_reference("cifar10:test", resolution=32) == ReferenceSpec("cifar10", "test", 32)
    assert isinstance(parse_reference("VIRTUAL_imagenet256_labeled.npz"), type(tmp_path))


def test_array_data_set_references_are_read_like_training_data(shared_data):
    import os

    path = os.path.join(shared_data, "mnist.npz")
    images, labels = load_reference_images(ReferenceSpec("mnist", "test"), path)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8 and labels[:3].tolist() == [7, 2, 1]
    resized, _ = load_reference_images(ReferenceSpec("mnist", "test", resolution=32), path)
    assert resized.shape == (10000, 1, 32, 32) and resized.dtype == torch.uint8
    digits, _ = load_reference_images(ReferenceSpec("digits", "all", resolution=16))
    assert digits.shape == (1797, 1, 16, 16) and int(digits.max()) == 255 and int(digits.min()) == 0


def test_command_line_sweep_trains_a_classifier_and_writes_a_table_json_and_plot(run, tmp_path, capsys):
    import argparse

    from meanflow.cli.eval import add_parser as add_eval_parser

    parser = argparse.ArgumentParser(prog="meanflow")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([
        "eval", "--checkpoint", str(run), "--metric", "domain", "--classifier", str(tmp_path / "classifier"),
        "--train-classifier", "--classifier-steps", "20", "--num-samples", "30", "--steps", "1", "2",
        "--sweep", "--intermediate", "0.3", "0.6", "--batch-size", "16", "--cache-dir", str(tmp_path / "cache"),
        "--json", str(tmp_path / "sweep.json"), "--no-progress",
    ])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "NOT comparable with Inception FID" in out and "domain FID" in out
    payload = json.loads((tmp_path / "sweep.json").read_text())
    rows = payload["table"]
    # Every EMA by default; per weights: 1 and 2 uniform steps, then 2 steps at each intermediate time.
    assert [(row["weights"], row["steps"], row["intermediate"]) for row in rows] == [
        (weights, steps, middle) for weights in ("ema_0.9", "ema_0.99")
        for steps, middle in ((1, None), (2, None), (2, 0.3), (2, 0.6))]
    assert len(payload["reports"]) == 6 and all("accuracy" in row for row in rows)
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert (tmp_path / "classifier" / "classifier.json").is_file()


def test_command_line_refuses_several_weights_without_sweep(run, tmp_path):
    import argparse

    from meanflow.cli.eval import add_parser as add_eval_parser

    parser = argparse.ArgumentParser(prog="meanflow")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "--checkpoint", str(run), "--weights", "ema_0.9", "raw", "--metric", "domain"])
    with pytest.raises(ValueError, match="need --sweep"):
        args.run(args)


class ProjectionFeatures:
    """A stand-in feature network (fixed random projections): exercises the Inception path cheaply."""

    name, dim, num_logits = "projection-test", 16, 5

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.features = torch.randn(64, 16, generator=generator)
        self.logits = torch.randn(64, 5, generator=generator)

    def features_and_logits(self, images):
        x = images.float().reshape(len(images), -1) / 255.0  # (B, 64) for 1 x 8 x 8
        return x @ self.features, x @ self.logits


def test_inception_metric_path_reports_the_inception_score(run, tmp_path):
    save_statistics(tmp_path / "reference.npz", np.zeros(16), np.eye(16), info={"feature_extractor": "projection-test"})
    settings = EvalSettings(num_samples=40, steps=(1,), metric="inception", reference=str(tmp_path / "reference.npz"),
                            seed=0, progress=False, batch_size=40)
    extractor = ProjectionFeatures()
    report = evaluate_checkpoint(run, settings, feature_extractor=extractor)
    entry = report["scores"][0]
    assert report["feature_extractor"] == "projection-test" and "note" not in report
    assert entry["inception_score_mean"] >= 1.0 and entry["inception_score_std"] >= 0.0 and "accuracy" not in entry
    streamed = evaluate_checkpoint(run, settings.replace(batch_size=6), feature_extractor=extractor)["scores"][0]
    assert streamed["inception_score_mean"] == pytest.approx(entry["inception_score_mean"], rel=1e-6)
    assert streamed["fid"] == pytest.approx(entry["fid"], rel=1e-6)
    save_statistics(tmp_path / "other.npz", np.zeros(16), np.eye(16), info={"feature_extractor": "another-network"})
    with pytest.raises(ValueError, match="holds statistics of another-network"):
        evaluate_checkpoint(run, settings.replace(reference=str(tmp_path / "other.npz")), feature_extractor=extractor)


def test_precision_recall_option_reports_both_and_does_not_depend_on_the_batch_size(run, classifier, tmp_path):
    report = evaluate(run, classifier, tmp_path, num_samples=60, precision_recall_samples=40, batch_size=7)
    assert report["precision_recall"] == {"samples": 40, "k": 3}
    assert report["reference"]["precision_recall_images"] == 40
    whole = evaluate(run, classifier, tmp_path, num_samples=60, precision_recall_samples=40, batch_size=60)
    for a, b in zip(report["scores"], whole["scores"], strict=True):
        assert 0.0 <= a["precision"] <= 1.0 and 0.0 <= a["recall"] <= 1.0
        # The same 40 samples either way; a point on a ball's boundary may flip by rounding.
        assert abs(a["precision"] - b["precision"]) <= 1 / 40 and abs(a["recall"] - b["recall"]) <= 1 / 40
    with pytest.raises(ValueError, match="k < M <= num_samples"):
        evaluate(run, classifier, tmp_path, num_samples=30, precision_recall_samples=40)


def test_precision_recall_of_real_images_against_themselves_and_against_noise(classifier):
    """Reference features from the data set (seeded subset) and from an ADM-style batch (arr_0)."""
    from meanflow.eval.classifier import load_classifier
    from meanflow.eval.inception import precision_recall

    extractor = DomainFeatureExtractor(load_classifier(classifier))
    real = reference_features(ReferenceSpec("digits", "all"), extractor, 300, seed=0)
    again = reference_features(ReferenceSpec("digits", "all"), extractor, 300, seed=0)
    other = reference_features(ReferenceSpec("digits", "all"), extractor, 300, seed=1)
    torch.testing.assert_close(real, again)
    assert real.shape == (300, extractor.dim) and not torch.equal(real, other)
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    held_out = precision_recall(real, other)
    noise_images = torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noise = extractor.features_and_logits(noise_images)[0]
    against_noise = precision_recall(real, noise)
    assert held_out["precision"] > 0.8 and held_out["recall"] > 0.8
    assert against_noise["precision"] < held_out["precision"] - 0.3


def test_precision_recall_needs_reference_images(run, classifier, tmp_path):
    from meanflow.eval.classifier import load_classifier

    extractor = DomainFeatureExtractor(load_classifier(classifier))
    images, _ = load_reference_images(ReferenceSpec("digits", "all"))
    batch = tmp_path / "adm_batch.npz"
    np.savez(batch, arr_0=images[:50].permute(0, 2, 3, 1).numpy(), mu=np.zeros(4), sigma=np.eye(4))
    from_batch = reference_features(batch, extractor, 20)
    torch.testing.assert_close(from_batch, extractor.features_and_logits(images[:20])[0].float().cpu())
    save_statistics(tmp_path / "stats_only.npz", np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="needs reference images"):
        reference_features(tmp_path / "stats_only.npz", extractor, 20)


def test_settings_are_keyword_only_and_validated_at_construction(classifier):
    with pytest.raises(TypeError):
        EvalSettings(50)  # keyword-only: a positional 25th argument can never land in the wrong field
    for bad, message in [(dict(num_samples=1), "num_samples must be an integer >= 2"),
                         (dict(num_samples=True), "num_samples must be an integer >= 2"),
                         (dict(steps=(1, 0)), "steps must hold positive step counts"),
                         (dict(steps=()), "steps must hold positive step counts"),
                         (dict(batch_size=0), "batch_size must be a positive integer"),
                         (dict(seed=-1), "seed must be an integer >= 0"),
                         (dict(intermediate=1.0), "intermediate must be a finite number in \\(0, 1\\)"),
                         (dict(ode="rk4"), "ode must be one of 'euler', 'heun'"),
                         (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
                         (dict(precision_recall_samples=60), "k < M <= num_samples"),
                         (dict(metric="domain", classifier_path=None), "needs a trained classifier")]:
        with pytest.raises(ValueError, match=message):
            EvalSettings(**{"num_samples": 50, "metric": "domain", "classifier_path": classifier, **bad})
    settings = EvalSettings(num_samples=50, metric="domain", classifier_path=classifier, steps=[2, 1], ode="heun")
    assert settings.steps == (2, 1) and settings.ode.value == "heun" and settings.device == torch.device("cpu")
    with pytest.raises(ValueError, match="num_samples must be"):
        settings.replace(num_samples=0)  # a changed copy is validated again


def test_a_vae_cannot_decode_pixels(run, classifier, tmp_path):
    with pytest.raises(ValueError, match="decodes latents, but this run's samples are pixels"):
        evaluate(run, classifier, tmp_path, vae="stabilityai/sd-vae-ft-mse")
