"""``meanflow eval`` end to end on every kind of run: pixels (digits, domain metric), flow matching
(its own Euler sampler), 2-D points (distribution distances), the reference-statistics cache
without the data set, and the one noise scheme shared with ``meanflow sample`` and the API.

Every run is trained for real (a few steps of a tiny network); every score goes through
``meanflow.cli.main``.
"""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("safetensors")
pytest.importorskip("sklearn")

from meanflow.cli import main  # noqa: E402
from meanflow.eval.classifier import (  # noqa: E402
    DomainFeatureExtractor,
    load_classifier,
    save_classifier,
    train_domain_classifier,  # noqa: E402
)
from meanflow.eval.frechet import frechet_distance, save_statistics  # noqa: E402
from meanflow.eval.references import (  # noqa: E402
    NATIVE_RESOLUTIONS,
    ReferenceSpec,
    load_reference_images,
)
from meanflow.inference import balanced_labels, generate, load_model  # noqa: E402
from meanflow.presets import preset  # noqa: E402
from meanflow.sample_files import image_rows, read_sample_file  # noqa: E402
from meanflow.train import train  # noqa: E402

TINY_DIT = ["model.options.hidden_size=32", "model.options.depth=2", "model.options.num_heads=2"]
SHORT = ["training.steps=20", "training.batch_size=32", "training.checkpoint_every=20", "training.grid_samples=10",
         "training.grid_steps=[1]", "training.ema_decays=[0.9]"]


def train_run(folder, name, overrides):
    train(preset(name).with_overrides(overrides), folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("digits"), "digits", SHORT + TINY_DIT)


@pytest.fixture(scope="module")
def flow_matching_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("flow_matching"), "digits",
                     SHORT + TINY_DIT + ["objective.method=flow_matching"])


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("toy"), "toy-checkerboard",
                     ["training.steps=60", "training.batch_size=128", "training.checkpoint_every=60",
                      "training.grid_steps=[1]", "training.grid_samples=200", "training.ema_decays=[0.9]",
                      "model.options.hidden_size=64", "model.options.depth=2"])


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    images, labels = load_reference_images(ReferenceSpec("digits", "all"))
    model = train_domain_classifier(images, labels, steps=60, batch_size=64, seed=0)
    return save_classifier(model, tmp_path_factory.mktemp("classifier") / "digits", info={"dataset": "digits"})


def eval_report(tmp_path, *argv):
    """Run ``meanflow eval ... --json`` and return the report."""
    report = tmp_path / f"report_{len(list(tmp_path.glob('report_*.json')))}.json"
    assert main(["eval", *map(str, argv), "--json", str(report), "--no-progress", "--device", "cpu"]) == 0
    return json.loads(report.read_text())


def domain_eval(tmp_path, run, classifier, *argv):
    return eval_report(tmp_path, "--checkpoint", run, "--metric", "domain", "--classifier", classifier,
                       "--cache-dir", tmp_path / "cache", "--num-samples", 40, "--batch-size", 16, *argv)


# ------------------------------------------------------------------------------------------------
# Image runs, and the run's own sampler
# ------------------------------------------------------------------------------------------------


def test_an_image_run_is_scored_with_its_own_average_velocity_sampler(digits_run, classifier, tmp_path, capsys):
    report = domain_eval(tmp_path, digits_run, classifier, "--steps", 1, 2, "--intermediate", 0.4)
    assert report["metric"] == "domain" and report["encoder"] == {"name": "pixels", "sample_shape": [1, 8, 8]}
    assert report["sampler"] == {"name": "average_velocity", "source": "run record"} and report["ode"] is None
    assert report["reference"]["source"] == "digits:all" and report["reference"]["resolution"] == 8
    assert [(e["steps"], e["nfe"], e["sampler"]) for e in report["scores"]] == [(1, 1, "steps1"), (2, 2, "steps2_t0.4")]
    assert all(np.isfinite(e["fid"]) and 0 <= e["accuracy"] <= 1 for e in report["scores"])
    out = capsys.readouterr().out
    assert "steps2_t0.4" in out and "domain FID" in out and "average_velocity (run record)" in out


def test_a_flow_matching_run_uses_its_euler_sampler_and_reports_the_true_nfe(flow_matching_run, classifier,
                                                                             tmp_path):
    own = domain_eval(tmp_path, flow_matching_run, classifier, "--steps", 2, 4, "--guidance-scale", 2,
                      "--save-samples", tmp_path / "samples")
    assert own["sampler"] == {"name": "velocity_ode", "method": "euler", "source": "run record"}
    assert own["ode"] == "euler"
    # Euler: one evaluation a step, doubled by inference-time guidance.
    assert [(e["steps"], e["nfe"], e["sampler"]) for e in own["scores"]] == [(2, 4, "euler2"), (4, 8, "euler4")]
    assert (tmp_path / "samples" / "samples_euler4.npz").is_file()
    heun = domain_eval(tmp_path, flow_matching_run, classifier, "--steps", 2, 4, "--ode", "heun")
    assert heun["sampler"] == {"name": "velocity_ode", "method": "heun", "source": "--ode"}
    assert [(e["nfe"], e["sampler"]) for e in heun["scores"]] == [(3, "heun2"), (7, "heun4")]  # 2k - 1
    assert heun["scores"][0]["fid"] != own["scores"][0]["fid"]


def test_a_flow_matching_run_refuses_a_middle_time(flow_matching_run, classifier, tmp_path, capsys):
    argv = ["eval", "--checkpoint", str(flow_matching_run), "--metric", "domain", "--classifier", str(classifier),
            "--cache-dir", str(tmp_path), "--num-samples", "20", "--steps", "2", "--intermediate", "0.3",
            "--no-progress"]
    assert main(argv) == 2
    assert "intermediate time applies to the average-velocity sampler only" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The one noise scheme: eval --save-samples == meanflow sample == generate + encoder.quantize
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2])
def test_saved_eval_samples_equal_meanflow_sample_and_the_python_api_byte_for_byte(digits_run, classifier,
                                                                                   tmp_path, steps):
    seed, count, batch = 7, 30, 16
    report = domain_eval(tmp_path, digits_run, classifier, "--steps", steps, "--seed", seed,
                         "--num-samples", count, "--save-samples", tmp_path / "eval")
    evaluated, eval_labels = read_sample_file(report["scores"][0]["samples_file"])
    assert main(["sample", "--checkpoint", str(digits_run), "--num-samples", str(count), "--steps", str(steps),
                 "--seed", str(seed), "--batch-size", str(batch), "--output", str(tmp_path / "sampled.npz"),
                 "--no-progress"]) == 0
    sampled, sample_labels = read_sample_file(tmp_path / "sampled.npz")
    assert evaluated.dtype == np.uint8 and evaluated.shape == (count, 8, 8, 1)
    assert evaluated.tobytes() == sampled.tobytes() and np.array_equal(eval_labels, sample_labels)

    loaded = load_model(digits_run)
    labels = balanced_labels(count, loaded.num_classes)
    samples = generate(loaded.model, count, loaded.sample_shape, steps, labels, seed=seed, batch_size=batch,
                       num_classes=loaded.num_classes, sampler=loaded.sampler)
    assert image_rows(loaded.encoder.quantize(samples)).tobytes() == evaluated.tobytes()
    assert eval_labels.tolist() == labels.tolist()


# ------------------------------------------------------------------------------------------------
# The reference-statistics cache never needs the data set
# ------------------------------------------------------------------------------------------------


def test_cached_reference_statistics_are_used_without_loading_the_data_set(digits_run, classifier, tmp_path,
                                                                           capsys):
    extractor = DomainFeatureExtractor(load_classifier(classifier))
    spec = ReferenceSpec("mnist", "test", resolution=8)  # digits runs generate 8 x 8 images
    assert spec.key(extractor.name) == f"mnist-test-8px-uint8-{extractor.name}"
    assert ReferenceSpec("mnist", "test").side == NATIVE_RESOLUTIONS["mnist"] == 28
    generator = np.random.default_rng(0)
    mu, basis = generator.normal(size=extractor.dim), generator.normal(size=(extractor.dim, extractor.dim))
    sigma = basis @ basis.T / extractor.dim
    save_statistics(tmp_path / "cache" / f"{spec.key(extractor.name)}.npz", mu, sigma,
                    info={"feature_extractor": extractor.name, "num_images": 10000, "resolution": 8})
    bogus = tmp_path / "no_such_folder" / "mnist.npz"

    report = domain_eval(tmp_path, digits_run, classifier, "--steps", 1, "--reference", "mnist:test",
                         "--data-path", bogus, "--save-samples", tmp_path / "samples")
    assert report["reference"]["cached"] and report["reference"]["num_images"] == 10000
    assert report["reference"]["key"] == spec.key(extractor.name)
    # The score is the distance to the cached Gaussian: recompute it from the saved samples.
    images, _ = read_sample_file(report["scores"][0]["samples_file"])
    features = extractor.features_and_logits(torch.from_numpy(images).permute(0, 3, 1, 2))[0].double().numpy()
    expected = frechet_distance(features.mean(0), np.cov(features, rowvar=False), mu, sigma)
    assert report["scores"][0]["fid"] == pytest.approx(expected, rel=1e-6)

    capsys.readouterr()
    shutil.rmtree(tmp_path / "cache")  # a miss must read the data set, and the bogus path fails
    argv = ["eval", "--checkpoint", str(digits_run), "--metric", "domain", "--classifier", str(classifier),
            "--cache-dir", str(tmp_path / "cache"), "--num-samples", "20", "--steps", "1", "--reference",
            "mnist:test", "--data-path", str(bogus), "--no-progress"]
    assert main(argv) == 2
    assert "no_such_folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 2-D points: distribution distances instead of FID
# ------------------------------------------------------------------------------------------------


def test_a_points_run_reports_distances_to_its_toy_distribution(toy_run, tmp_path, capsys):
    from meanflow.eval.distances import (
        energy_distance,
        precision_recall,
        sliced_wasserstein,
    )
    from meanflow.toys import sample_toy

    report = eval_report(tmp_path, "--checkpoint", toy_run, "--num-samples", 600, "--steps", 1, 2, "--seed", 4,
                         "--batch-size", 250, "--save-samples", tmp_path / "samples")
    assert report["metric"] == "distances" and report["feature_extractor"] is None
    assert report["encoder"]["name"] == "points" and report["reference"]["source"] == "toy:checkerboard"
    assert report["precision_recall"] == {"samples": 600, "k": 3}
    assert [(e["steps"], e["nfe"]) for e in report["scores"]] == [(1, 1), (2, 2)]
    out = capsys.readouterr().out
    assert "energy distance" in out and "sliced W2" in out

    # The numbers are the distances between generate()'s points (the one noise scheme) and
    # sample_toy's, seeded by the evaluation's seed.
    loaded = load_model(toy_run)
    real = sample_toy("checkerboard", 600, torch.Generator().manual_seed(4))
    for entry in report["scores"]:
        points = generate(loaded.model, 600, (2,), entry["steps"], seed=4, batch_size=250, sampler=loaded.sampler)
        assert entry["energy_distance"] == pytest.approx(energy_distance(points, real), rel=1e-6, abs=1e-9)
        w2 = sliced_wasserstein(points, real, 256, torch.Generator().manual_seed(4))
        assert entry["sliced_wasserstein"] == pytest.approx(w2, rel=1e-6)
        assert {k: entry[k] for k in ("precision", "recall")} == precision_recall(real, points, k=3)
        saved, labels = read_sample_file(entry["samples_file"])
        assert labels is None and saved.dtype == np.float32 and np.array_equal(saved, points.numpy())
    assert (tmp_path / "samples" / "samples_steps1.png").stat().st_size > 1000


def test_a_points_run_without_a_toy_reference_gets_a_clear_error(toy_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    for record_file in run.glob("checkpoints/*/run.json"):  # a points run whose record names no distribution
        record = json.loads(record_file.read_text())
        record["encoder"]["reference"] = None
        record_file.write_text(json.dumps(record))
    argv = ["eval", "--checkpoint", str(run), "--num-samples", "50", "--steps", "1", "--no-progress"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "names no toy distribution" in error and "--reference" in error and "checkerboard" in error
    report = eval_report(tmp_path, "--checkpoint", run, "--num-samples", 50, "--steps", 1, "--reference", "rings")
    assert report["reference"]["source"] == "toy:rings" and np.isfinite(report["scores"][0]["energy_distance"])
