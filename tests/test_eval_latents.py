"""``meanflow eval`` on a latent run: a real (tiny, random-weight) diffusers AutoencoderKL, a latent
cache written by the encoder, a DiT trained for a few steps on it, and the run's encoder decoding
the samples with that VAE before they are quantised and scored.

The tiny VAE has two levels, so 32 x 32 images become 4 x 16 x 16 latents: its decoded images
are 2x the latent side, which the evaluation must take from the decoder, not from a hard-coded 8x.
"""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL.Image")
pytest.importorskip("diffusers")
pytest.importorskip("scipy")
pytest.importorskip("safetensors")

from test_latents import tiny_vae, write_image_folder  # noqa: E402

from meanflow.cli import main  # noqa: E402
from meanflow.data.latent_writer import encode_image_folder  # noqa: E402
from meanflow.eval.classifier import (  # noqa: E402
    DomainFeatureExtractor,
    load_classifier,
    save_classifier,
    train_domain_classifier,
)
from meanflow.eval.frechet import FeatureStatistics, save_statistics  # noqa: E402
from meanflow.inference import balanced_labels, generate, load_model  # noqa: E402
from meanflow.presets import preset  # noqa: E402
from meanflow.sample_files import image_rows, read_sample_file  # noqa: E402
from meanflow.train import train  # noqa: E402

NUM_SAMPLES = 12


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_run")
    vae = tiny_vae()
    vae.save_pretrained(root / "vae")
    cache = encode_image_folder(write_image_folder(root / "images"), root / "cache", vae, resolution=32,
                                batch_size=4, shard_size=6, progress=False)
    config = preset("digits").with_overrides([
        "data.name=latents", f"data.path={cache}", f"data.vae={root / 'vae'}",
        "model.options.input_size=16", "model.options.in_channels=4", "model.options.patch_size=4",
        "model.options.hidden_size=32", "model.options.depth=1", "model.options.num_heads=2",
        "model.options.num_classes=2", "training.steps=4", "training.batch_size=4", "training.checkpoint_every=4",
        "training.grid_samples=4", "training.grid_steps=[1]", "training.ema_decays=[0.9]"])
    train(config, root / "run", progress=False)
    return root


@pytest.fixture(scope="module")
def scorer(latent_run):
    """A domain classifier for 3 x 32 x 32 images and the statistics of 200 random images in its features."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(200) % 2
    classifier = save_classifier(train_domain_classifier(images, labels, steps=5, batch_size=32, seed=0),
                                 latent_run / "classifier")
    extractor = DomainFeatureExtractor(load_classifier(classifier))
    statistics = FeatureStatistics(extractor.dim).update(extractor.features_and_logits(images)[0])
    reference = save_statistics(latent_run / "reference.npz", *statistics.mean_and_covariance(),
                                info={"feature_extractor": extractor.name, "num_images": 200})
    return classifier, reference


def evaluate(latent_run, scorer, tmp_path, *argv):
    classifier, reference = scorer
    report = tmp_path / "report.json"
    assert main(["eval", "--checkpoint", str(latent_run / "run"), "--metric", "domain", "--classifier",
                 str(classifier), "--reference", str(reference), "--num-samples", str(NUM_SAMPLES),
                 "--batch-size", str(NUM_SAMPLES), "--seed", "2", "--json", str(report), "--no-progress",
                 "--device", "cpu", *map(str, argv)]) == 0
    return json.loads(report.read_text())


def test_a_latent_run_is_decoded_by_its_vae_scored_and_saved_as_meanflow_sample_saves_it(latent_run, scorer,
                                                                                          tmp_path):
    report = evaluate(latent_run, scorer, tmp_path, "--steps", 1, 2, "--save-samples", tmp_path / "samples")
    assert report["encoder"]["name"] == "latents" and report["vae"] == str(latent_run / "vae")
    assert report["sampler"] == {"name": "average_velocity", "source": "run record"}
    assert [(e["steps"], e["nfe"]) for e in report["scores"]] == [(1, 1), (2, 2)]
    assert all(np.isfinite(e["fid"]) and 0.0 <= e["accuracy"] <= 1.0 for e in report["scores"])

    saved, labels = read_sample_file(report["scores"][1]["samples_file"])
    assert saved.shape == (NUM_SAMPLES, 32, 32, 3) and saved.dtype == np.uint8  # decoded: 2x the 16 x 16 latents
    assert labels.tolist() == [i % 2 for i in range(NUM_SAMPLES)]
    loaded = load_model(latent_run / "run")
    latents = generate(loaded.model, NUM_SAMPLES, loaded.sample_shape, 2, balanced_labels(NUM_SAMPLES, 2), seed=2,
                       batch_size=NUM_SAMPLES, num_classes=2, sampler=loaded.sampler)
    assert image_rows(loaded.encoder.quantize(latents)).tobytes() == saved.tobytes()
    assert main(["sample", "--checkpoint", str(latent_run / "run"), "--num-samples", str(NUM_SAMPLES), "--steps", "2",
                 "--seed", "2", "--batch-size", str(NUM_SAMPLES), "--output", str(tmp_path / "sampled.npz"),
                 "--no-progress"]) == 0
    assert read_sample_file(tmp_path / "sampled.npz")[0].tobytes() == saved.tobytes()


def test_another_vae_decodes_the_same_latents_into_other_images(latent_run, scorer, tmp_path):
    other = tiny_vae()
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.5)
    other.save_pretrained(tmp_path / "other_vae")
    own = evaluate(latent_run, scorer, tmp_path, "--steps", 1, "--save-samples", tmp_path / "own")
    changed = evaluate(latent_run, scorer, tmp_path, "--steps", 1, "--vae", tmp_path / "other_vae",
                       "--save-samples", tmp_path / "other")
    assert changed["vae"] == str(tmp_path / "other_vae") and changed["encoder"]["vae"] == changed["vae"]
    first, second = (read_sample_file(report["scores"][0]["samples_file"])[0] for report in (own, changed))
    assert first.shape == second.shape and not np.array_equal(first, second)
    assert changed["scores"][0]["fid"] != own["scores"][0]["fid"]
