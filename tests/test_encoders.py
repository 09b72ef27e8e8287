"""Encoders: the two latent normalisations, round trips through the run record, grids."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from meanflow.encoders import LatentEncoder, PixelEncoder, PointEncoder, encoder_from_dict  # noqa: E402
from meanflow.vae import SD_VAE_SCALE_FACTOR, clear_vae_cache  # noqa: E402

IMF_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)  # the official iMF latent statistics
IMF_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    from test_latents import tiny_vae

    folder = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(folder)
    return str(folder)


def test_per_channel_normalised_latents_decode_like_their_scale_factor_form(vae_folder):
    clear_vae_cache()
    plain = LatentEncoder((4, 16, 16), vae=vae_folder, downsampling=2)
    normalised = LatentEncoder((4, 16, 16), vae=vae_folder, downsampling=2, latent_mean=IMF_MEAN, latent_std=IMF_STD)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    raw = z * torch.tensor(IMF_STD).view(1, -1, 1, 1) + torch.tensor(IMF_MEAN).view(1, -1, 1, 1)  # the VAE's own z
    torch.testing.assert_close(normalised.decode(z), plain.decode(raw * SD_VAE_SCALE_FACTOR), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(normalised.decode(z), plain.decode(z))


def test_encoders_round_trip_through_their_records():
    for encoder in (PixelEncoder((1, 8, 8)), PointEncoder((2,), reference="checkerboard"),
                    LatentEncoder((4, 32, 32), vae="stabilityai/sd-vae-ft-mse"),
                    LatentEncoder((4, 32, 32), vae="v", latent_mean=IMF_MEAN, latent_std=IMF_STD)):
        assert encoder_from_dict(encoder.to_dict()) == encoder


@pytest.mark.parametrize("options, message", [
    (dict(latent_mean=IMF_MEAN), "given together"),
    (dict(latent_mean=IMF_MEAN[:3], latent_std=IMF_STD[:3]), "one number per latent channel"),
    (dict(latent_mean=IMF_MEAN, latent_std=(1.0, 0.0, 1.0, 1.0)), "latent_std must be > 0"),
])
def test_a_bad_normalisation_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        LatentEncoder((4, 32, 32), vae="v", **options)
