"""``meanflow sample`` on every kind of run: pixels, VAE latents, flow matching and 2-D points.

Each run is trained for a few real steps; the command reads the run record to pick the sampler,
decode latents and draw the grid.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from meanflow.cli import main
from meanflow.encoders import MIN_GRID_PIXELS
from meanflow.inference import balanced_labels, generate, load_model
from meanflow.presets import preset
from meanflow.sample_files import read_sample_file
from meanflow.sampling import sample_ode
from meanflow.train import train

TINY_DIGITS = ["training.steps=4", "training.batch_size=32", "training.checkpoint_every=4", "training.log_every=2",
               "training.grid_steps=[1]", "training.grid_samples=20", "model.options.hidden_size=16",
               "model.options.depth=1", "model.options.num_heads=2", "model.options.frequency_size=16"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "digits"
    train(preset("digits").with_overrides(TINY_DIGITS), folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def flow_matching_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "flow_matching"
    train(preset("digits").with_overrides(TINY_DIGITS + ["objective.method=flow_matching"]), folder, progress=False)
    return folder


def sample_command(*args: str) -> str:
    assert main(["sample", "--no-progress", *args]) == 0


def test_an_image_run_writes_the_sample_file_and_an_upscaled_grid_named_by_its_settings(digits_run, capsys):
    sample_command("--checkpoint", str(digits_run), "--num-samples", "20", "--steps", "2", "--intermediate", "0.3")
    out = capsys.readouterr().out
    path = digits_run / "samples" / "ema_0.99_step4_steps2_t0.3_seed0.npz"
    assert "average_velocity sampler, 2 steps = 2 NFE" in out and str(path) in out
    images, labels = read_sample_file(path)
    assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8 and labels.tolist() == list(range(10)) * 2
    grid = Image.open(path.with_suffix(".png"))
    assert grid.width >= MIN_GRID_PIXELS  # 8x8 digits are upscaled, not a 102-pixel thumbnail

    sample_command("--checkpoint", str(digits_run), "--num-samples", "20", "--steps", "2", "--weights", "raw",
                   "--guidance-scale", "2")
    assert "2 steps = 4 NFE" in capsys.readouterr().out  # inference-time CFG doubles the evaluations
    second = digits_run / "samples" / "raw_step4_steps2_cfg2_seed0.npz"
    assert second.exists() and path.exists()  # a second call does not overwrite the first


def test_the_same_seed_gives_the_same_images_from_the_command_and_the_python_api(digits_run, tmp_path):
    output = tmp_path / "a.npz"
    sample_command("--checkpoint", str(digits_run), "--num-samples", "7", "--batch-size", "3", "--seed", "5",
                   "--output", str(output))
    images, _ = read_sample_file(output)
    loaded = load_model(digits_run)
    samples = generate(loaded.model, 7, loaded.sample_shape, 1, balanced_labels(7, 10), seed=5, batch_size=4,
                       num_classes=10, sampler=loaded.sampler)
    assert np.array_equal(images, loaded.encoder.quantize(samples).permute(0, 2, 3, 1).numpy())


def test_a_flow_matching_run_is_sampled_by_its_own_ode(flow_matching_run, capsys, tmp_path):
    output = tmp_path / "fm.npz"
    sample_command("--checkpoint", str(flow_matching_run), "--num-samples", "10", "--steps", "3",
                   "--output", str(output))
    assert "velocity_ode sampler, 3 steps = 3 NFE" in capsys.readouterr().out
    loaded = load_model(flow_matching_run)
    from meanflow.noise import sample_noise

    expected = sample_ode(loaded.model, sample_noise(0, range(10), loaded.sample_shape), torch.arange(10),
                          num_steps=3, method="euler")
    images, _ = read_sample_file(output)
    assert np.array_equal(images, loaded.encoder.quantize(expected).permute(0, 2, 3, 1).numpy())
    sample_command("--checkpoint", str(flow_matching_run), "--num-samples", "10", "--steps", "3", "--ode", "heun",
                   "--output", str(tmp_path / "heun.npz"))
    assert "3 steps = 5 NFE" in capsys.readouterr().out  # Heun: two evaluations a step, one on the last


def test_a_points_run_writes_its_samples_and_a_scatter_plot(tmp_path, capsys):
    config = preset("toy-checkerboard").with_overrides([
        "training.steps=3", "training.batch_size=32", "training.checkpoint_every=3", "training.grid_steps=[1]",
        "training.grid_samples=16", "model.options.hidden_size=16", "model.options.depth=2"])
    train(config, tmp_path / "toy", progress=False)
    sample_command("--checkpoint", str(tmp_path / "toy"), "--num-samples", "50")
    points, labels = read_sample_file(tmp_path / "toy" / "samples" / "ema_0.999_step3_steps1_seed0.npz")
    assert points.shape == (50, 2) and points.dtype == np.float32 and labels is None
    assert (tmp_path / "toy" / "samples" / "ema_0.999_step3_steps1_seed0.png").stat().st_size > 0


def test_a_latent_run_is_decoded_by_its_vae(tmp_path, capsys):
    from test_latents import RESOLUTION, tiny_vae, write_image_folder

    from meanflow.data.latent_writer import encode_image_folder
    from meanflow.vae import clear_vae_cache

    vae_folder = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_folder)
    cache = encode_image_folder(write_image_folder(tmp_path / "images"), tmp_path / "cache", str(vae_folder),
                                resolution=RESOLUTION, batch_size=4, shard_size=6, progress=False)
    config = preset("digits").with_overrides([
        "data.name=latents", f"data.path={cache}", "model.options.input_size=16", "model.options.in_channels=4",
        "model.options.num_classes=2", *TINY_DIGITS[:5], "training.grid_samples=4", "training.batch_size=4",
        "model.options.hidden_size=16", "model.options.depth=1", "model.options.num_heads=2"])
    clear_vae_cache()
    result = train(config, tmp_path / "latent", progress=False)
    assert result.grids and Image.open(result.grids[0]).width >= MIN_GRID_PIXELS  # decoded, then drawn
    record = json.loads((result.checkpoint / "run.json").read_text())
    assert record["encoder"] == {"name": "latents", "sample_shape": [4, 16, 16], "vae": str(vae_folder),
                                 "downsampling": 2, "image_channels": 3}
    sample_command("--checkpoint", str(tmp_path / "latent"), "--num-samples", "4", "--output",
                   str(tmp_path / "latent.npz"))
    images, labels = read_sample_file(tmp_path / "latent.npz")
    assert images.shape == (4, RESOLUTION, RESOLUTION, 3) and labels.tolist() == [0, 1, 0, 1]
    import shutil

    moved = tmp_path / "vae_moved"
    shutil.move(str(vae_folder), moved)  # the VAE the record names is gone: --vae points at its new place
    sample_command("--checkpoint", str(tmp_path / "latent"), "--num-samples", "4", "--vae", str(moved),
                   "--output", str(tmp_path / "moved.npz"))
    assert np.array_equal(read_sample_file(tmp_path / "moved.npz")[0], images)


def test_loading_for_sampling_reads_no_optimizer_state_and_checks_the_format(digits_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digits_run, copy)
    step = next((copy / "checkpoints").iterdir())
    (step / "optimizer.safetensors").write_bytes(b"not read")  # sampling must never open it
    assert load_model(copy).step == 4
    record = json.loads((step / "run.json").read_text())
    (step / "run.json").write_text(json.dumps(dict(record, format_version=99)))
    with pytest.raises(ValueError, match="format version 99; this version of meanflow reads versions"):
        load_model(copy)


def test_the_training_grids_of_small_images_are_upscaled_to_a_readable_size(digits_run):
    grids = sorted((digits_run / "samples").glob("step*_nfe1.png"))
    assert grids, "the run writes a grid at its end"
    with Image.open(grids[-1]) as grid:
        assert grid.width >= MIN_GRID_PIXELS  # 20 8x8 digits upscaled by nearest neighbour, not 52 pixels wide
    pixels = np.asarray(Image.open(grids[-1]))
    factor = ((pixels.shape[1] - 2) // 10 - 2) // 8  # 10 per row (a class per column), 2-pixel padding
    first = pixels[2:2 + 8 * factor, 2:2 + 8 * factor]  # the first digit, upscaled
    assert factor > 1 and (first == first[::factor, ::factor].repeat(factor, 0).repeat(factor, 1)).all()


def test_long_sampling_shows_progress(digits_run, capsys, tmp_path):
    assert main(["sample", "--checkpoint", str(digits_run), "--num-samples", "6", "--batch-size", "2",
                 "--output", str(tmp_path / "p.npz")]) == 0
    assert "3/3" in capsys.readouterr().err  # one update per batch


def test_a_vae_for_a_run_without_latents_is_refused(digits_run, capsys):
    assert main(["sample", "--checkpoint", str(digits_run), "--vae", "somewhere"]) == 2
    assert "decodes latents, but this run's samples are pixels" in capsys.readouterr().err
