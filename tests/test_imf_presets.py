"""Improved MeanFlow presets: the official ImageNet recipes, per-channel latents, and CPU runs that train."""

import json

import pytest
import torch

from meanflow.config import Config, DataConfig
from meanflow.models import build_model
from meanflow.presets import preset
from meanflow.samplers import ImfSampler

STEPS_PER_EPOCH = 1_281_167 // 1024  # the last incomplete batch is dropped (input_pipeline.py l. 132)

IMAGENET_IMF = {
    # name: (imfDiT preset, parameters with the v head, depth, hidden, heads, omega, interval, FID)
    "imagenet256-imf-b2": ("iMF-B/2", 145_596_960, 12, 768, 12, 8.0, (0.40, 0.65), "3.39"),
    "imagenet256-imf-m2": ("iMF-M/2", 230_570_016, 24, 768, 12, 10.5, (0.40, 0.60), "2.27"),
    "imagenet256-imf-l2": ("iMF-L/2", 509_752_352, 32, 1024, 16, 10.5, (0.40, 0.60), "1.86"),
    "imagenet256-imf-xl2": ("iMF-XL/2", 711_113_760, 48, 1024, 16, 8.0, (0.42, 0.62), "1.72"),
}


def count(config):
    with torch.device("meta"):
        model = build_model(config.model.architecture, config.model.options)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(IMAGENET_IMF))
def test_imagenet_imf_presets_carry_the_official_recipe(name):
    size, params, depth, hidden, heads, omega, (t_min, t_max), fid = IMAGENET_IMF[name]
    config = preset(name)
    options = config.model.options
    assert config.model.architecture == "imf_dit" and options["auxiliary_head"] is True
    assert (options["depth"], options["hidden_size"], options["num_heads"], options["patch_size"]) == (depth, hidden,
                                                                                                        heads, 2)
    assert (options["input_size"], options["in_channels"], options["num_classes"], options["aux_head_depth"]) == (
        32, 4, 1000, 8)
    assert count(config) == params  # training layout; the released files hold the rest (docs/imf.md)

    o, opt, tr = config.objective.settings, config.optim, config.training
    assert config.objective.method == "imf"
    assert (o.mu, o.sigma, o.fraction_r_neq_t, o.s_max, o.beta) == (-0.4, 1.0, 0.5, 7.0, 1.0)
    assert (o.t_min_low, o.t_min_high, o.t_max_low, o.t_max_high) == (0.0, 0.5, 0.5, 1.0)
    assert (o.class_dropout, o.p, o.c, o.auxiliary_weight) == (0.1, 1.0, 0.01, 1.0)
    assert (opt.lr, opt.betas, opt.weight_decay, opt.decay) == (1e-4, (0.9, 0.95), 0.0, "constant")
    assert opt.warmup_steps == 10 * STEPS_PER_EPOCH == 12_510
    assert (tr.batch_size, tr.ema_decays, tr.precision) == (1024, (0.9999,), "fp32")
    assert tr.steps == 640 * STEPS_PER_EPOCH == 800_640

    data = config.data
    assert (data.name, data.horizontal_flip, data.class_conditional) == ("latents", True, True)
    assert data.latent_normalisation == "imf_channels"
    # The authors' 1-NFE sampling setting is the run's sampler default.
    from meanflow.objectives import build_objective

    sampler = build_objective("imf", config.objective.settings, 1000).sampler
    assert sampler == ImfSampler(omega, (t_min, t_max)) and f"omega {omega:g}" in config.note
    assert config.note.count("Paper:") == 1 and f"1-NFE FID {fid}" in config.note and size in config.note


def test_the_imf_presets_resolve_and_round_trip_through_json():
    for name in [*IMAGENET_IMF, "imf-digits", "imf-mnist", "toy-checkerboard-imf"]:
        config = preset(name)
        data = json.loads(json.dumps(config.to_dict()))
        assert Config.from_dict(data).to_dict() == config.to_dict()
    assert Config.from_dict(preset("imagenet256-imf-b2").to_dict()).data.latent_normalisation == "imf_channels"


def test_latent_normalisation_is_validated():
    assert DataConfig().latent_normalisation == "sd_scale"
    with pytest.raises(ValueError, match="latent_normalisation must be one of"):
        DataConfig(name="latents", latent_normalisation="imf")
    with pytest.raises(ValueError, match="applies to data.name='latents' only"):
        DataConfig(name="digits", latent_normalisation="imf_channels")
    assert DataConfig(name="latents", latent_normalisation="imf_channels").latent_normalisation == "imf_channels"


# ------------------------------------------------------------------------------------------------
# CPU presets: a few real steps through the training loop, then the iMF sampler from the run
# ------------------------------------------------------------------------------------------------


def tiny(config: Config, steps: int = 3, batch_size: int = 8) -> Config:
    """The preset with a budget of a few steps (the rest of the recipe untouched)."""
    data = config.to_dict()
    data["training"].update(steps=steps, batch_size=batch_size, log_every=1, checkpoint_every=steps, grid_samples=4,
                            sample_every=0)
    data["optim"]["warmup_steps"] = 1
    return Config.from_dict(data)


@pytest.mark.parametrize("name, shape", [("imf-digits", (1, 8, 8)), ("imf-mnist", (1, 28, 28)),
                                         ("toy-checkerboard-imf", (2,))])
def test_cpu_imf_presets_train_a_few_steps_and_load_with_the_imf_sampler(name, shape, tmp_path):
    from meanflow.inference import load_model
    from meanflow.train import train

    config = preset(name)
    assert config.objective.method == "imf"
    if name != "toy-checkerboard-imf":
        assert config.model.architecture == "imf_dit" and config.model.options["num_classes"] == 10
        assert config.data.class_conditional and config.training.steps >= 1500
    # mnist would be downloaded: the same preset on 28x28 in-memory images (the run records 'memory').
    data = labels = None
    if name == "imf-mnist":
        generator = torch.Generator().manual_seed(0)
        data = torch.rand(32, *shape, generator=generator) * 2 - 1
        labels = torch.arange(32) % 10
    result = train(tiny(config), tmp_path / name, progress=False, data=data, labels=labels)
    assert result is not None

    loaded = load_model(tmp_path / name, weights="raw")
    assert isinstance(loaded.sampler, ImfSampler) and loaded.step == 3
    assert loaded.record.method == "imf" and tuple(loaded.record.sample_shape) == shape
    # One-step samples at the authors' kind of setting: finite, the shape of a sample.
    sampler = loaded.sampler.with_guidance(omega=2.0, interval=(0.2, 0.8))
    noise = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    classes = torch.arange(4) if loaded.record.num_classes else None
    with torch.no_grad():
        samples = sampler(loaded.model, noise, classes, num_steps=1)
    assert samples.shape == noise.shape and torch.isfinite(samples).all()


# ------------------------------------------------------------------------------------------------
# Latents normalised per channel (the tiny random-weight VAE and cache of tests/test_latents.py)
# ------------------------------------------------------------------------------------------------


def test_imf_channels_draws_raw_minus_mean_over_std_and_the_encoder_decodes_it_back(tmp_path):
    pytest.importorskip("diffusers")
    from test_latents import encode, tiny_vae, write_image_folder

    from meanflow.data import build_source
    from meanflow.data.latent_source import IMF_LATENT_MEAN, IMF_LATENT_STD, LatentBatches
    from meanflow.encoders import encoder_from_dict
    from meanflow.vae import SD_VAE_SCALE_FACTOR, decode_latents

    vae = tiny_vae()
    vae_folder = tmp_path / "vae"
    vae.save_pretrained(vae_folder)
    cache = encode(write_image_folder(tmp_path / "images"), tmp_path / "cache", vae)

    # The same positions draw the same rows, flips and posterior noise; only the normalisation differs.
    scaled = LatentBatches(cache, batch_size=5, seed=3, normalisation="sd_scale")
    normalised = LatentBatches(cache, batch_size=5, seed=3, normalisation="imf_channels")
    mean = torch.tensor(IMF_LATENT_MEAN).view(1, 4, 1, 1)
    std = torch.tensor(IMF_LATENT_STD).view(1, 4, 1, 1)
    for _ in range(3):
        (z_sd, labels_sd), (z, labels) = scaled.next_batch(), normalised.next_batch()
        raw = z_sd / SD_VAE_SCALE_FACTOR  # (5, 4, 16, 16): mean + std * eps of the cached posterior
        torch.testing.assert_close(z, (raw - mean) / std, rtol=1e-5, atol=1e-6)
        assert torch.equal(labels, labels_sd) and not torch.allclose(z, z_sd)
    # Per-channel statistics are the official ones (vae_util.py): std about 4-5 in raw units.
    assert IMF_LATENT_MEAN[0] == 0.86488 and IMF_LATENT_STD[1] == 5.31922414

    # build_source applies it and records it in the encoder, which then decodes the draw correctly.
    config = DataConfig(name="latents", path=str(cache), vae=str(vae_folder), latent_normalisation="imf_channels")
    source, info = build_source(config, batch_size=4, seed=0)
    assert (info.encoder.latent_mean, info.encoder.latent_std) == (IMF_LATENT_MEAN, IMF_LATENT_STD)
    assert encoder_from_dict(json.loads(json.dumps(info.encoder.to_dict()))) == info.encoder
    z, _ = source.next_batch()
    plain_source, plain_info = build_source(DataConfig(name="latents", path=str(cache), vae=str(vae_folder)),
                                            batch_size=4, seed=0)
    z_sd, _ = plain_source.next_batch()
    assert plain_info.encoder.latent_mean is None
    torch.testing.assert_close(z, (z_sd / SD_VAE_SCALE_FACTOR - mean) / std, rtol=1e-5, atol=1e-6)
    pictures = info.encoder.decode(z)
    assert pictures.shape == (4, 3, 32, 32)
    torch.testing.assert_close(pictures, decode_latents(vae, z_sd), rtol=0, atol=1e-4)
    torch.testing.assert_close(plain_info.encoder.decode(z_sd), decode_latents(vae, z_sd), rtol=0, atol=1e-6)
