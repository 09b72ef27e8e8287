"""The SD-VAE latent cache: encoding, resuming, posterior sampling (read ahead), decoding, loading the VAE.

Every test runs a real diffusers AutoencoderKL, built from a tiny configuration with random
weights (the real ft-mse weights cannot be downloaded here): 2 levels, so 32 x 32 images become
4 x 16 x 16 latents.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")
diffusers = pytest.importorskip("diffusers")

from meanflow.cli.encode import add_parser as add_encode_parser  # noqa: E402
from meanflow.data.folders import center_crop_adm  # noqa: E402
from meanflow.data.latent_dataset import LatentDataset  # noqa: E402
from meanflow.data.latent_source import LatentBatches  # noqa: E402
from meanflow.data.latent_writer import encode_image_folder  # noqa: E402
from meanflow.data.transforms import pil_to_tensor, to_model_range  # noqa: E402
from meanflow.vae import (  # noqa: E402
    DEFAULT_VAE,
    SD_VAE_SCALE_FACTOR,
    VAEUnavailableError,
    clear_vae_cache,
    decode_latents,
    load_vae,
)

RESOLUTION = 32
LATENT_SHAPE = (4, 16, 16)
NUM_IMAGES = 10
SHARD_SIZE = 4  # three shards: 4 + 4 + 2 images
BATCH_SIZE = 3  # batches of 3 do not line up with shards of 4


def tiny_vae():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )
    return vae.eval().requires_grad_(False)


def write_image_folder(root):
    """10 random RGB PNGs of assorted sizes (so the centre crop matters) in classes 'cat' and 'dog'."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for index in range(NUM_IMAGES // 2):
            height, width = 36 + 7 * index, 40 + 3 * label
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{index}.png")
    return root


def encode(images, output, vae, **options):
    settings = dict(resolution=RESOLUTION, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, progress=False)
    return encode_image_folder(images, output, vae, **dict(settings, **options))


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, images, vae):
    return encode(images, tmp_path_factory.mktemp("cache") / "latents", vae)


def rewrite_moments(cache_dir, target, edit):
    """Copy a cache and change its stored moments in place: ``edit(moments, global_start)``."""
    shutil.copytree(cache_dir, target)
    for entry in json.loads((target / "manifest.json").read_text())["shards"]:
        moments = np.load(target / f"shard_{entry['index']:05d}.moments.npy", mmap_mode="r+")
        edit(moments, entry["start"])
        moments.flush()
        del moments
    return target


def index_identified(moments, start):
    """Mean of image i := 100 i (flipped: 100 i + 50), std := 1: a drawn latent names its image."""
    ids = np.arange(start, start + len(moments), dtype=np.float32)[:, None, None, None]
    moments[:, 0] = 100 * ids
    moments[:, 2] = 100 * ids + 50
    moments[:, 1] = moments[:, 3] = 1.0


def marked(moments, start):
    """Keep the real moments but one element: mean 1000 i (flipped 1000 i + 500) with std 0."""
    ids = np.arange(start, start + len(moments), dtype=np.float32)
    moments[:, 0, 0, 0, 0] = 1000 * ids
    moments[:, 2, 0, 0, 0] = 1000 * ids + 500
    moments[:, 1, 0, 0, 0] = moments[:, 3, 0, 0, 0] = 0.0


def identify(z):
    """(image ids (B,), flipped (B,)) of latents drawn from a cache edited by ``marked``."""
    code = (z[:, 0, 0, 0] / SD_VAE_SCALE_FACTOR).round().long()
    return code // 1000, code % 1000 == 500


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------


def test_the_cache_stores_the_posterior_mean_and_std_of_each_image_and_its_flip(cache, images, vae):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] == NUM_IMAGES
    assert [(s["index"], s["start"], s["count"]) for s in manifest["shards"]] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]
    assert manifest["scale_factor"] == 0.18215 and manifest["flip"] and manifest["resolution"] == RESOLUTION
    assert manifest["moments"] == ["mean", "std", "flip_mean", "flip_std"]
    assert manifest["latent_shape"] == list(LATENT_SHAPE) and manifest["class_names"] == ["cat", "dog"]
    assert len(manifest["fingerprint"]) == 64 and manifest["skipped"] == []
    raw = np.load(cache / "shard_00002.moments.npy", mmap_mode="r")
    assert isinstance(raw, np.memmap) and raw.shape == (2, 4, *LATENT_SHAPE) and raw.dtype == np.float32

    dataset = LatentDataset(cache)
    assert len(dataset) == NUM_IMAGES and dataset.latent_shape == LATENT_SHAPE and dataset.has_flips
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.labels.dtype == torch.int64 and dataset.labels.tolist() == [0] * 5 + [1] * 5

    # The reference: the ADM centre crop of each file, in [-1, 1], through vae.encode directly.
    files = sorted(images.glob("*/*.png"))
    pixels = []
    for file in files:
        with Image.open(file) as image:
            pixels.append(pil_to_tensor(center_crop_adm(image, RESOLUTION)))
    x = to_model_range(torch.stack(pixels))  # (10, 3, 32, 32)
    with torch.no_grad():
        direct = vae.encode(x).latent_dist
        mirrored = vae.encode(x.flip(-1)).latent_dist
    stored = torch.stack([dataset[i][0] for i in range(NUM_IMAGES)])  # (10, 4, 4, 16, 16)
    for slot, expected in enumerate((direct.mean, direct.std, mirrored.mean, mirrored.std)):
        torch.testing.assert_close(stored[:, slot], expected, atol=1e-5, rtol=0)
    assert (direct.std - direct.mean).abs().max() > 0.1  # the slots hold different things


def test_an_interrupted_encode_resumes_and_equals_a_clean_one(tmp_path, images, vae, cache):
    output = tmp_path / "latents"
    batches_seen = []

    def count_or_stop(module, inputs, result):
        batches_seen.append(inputs[0].shape[0] // 2)  # images per call (each passes with its flip)
        if stop_after is not None and len(batches_seen) == stop_after:
            raise KeyboardInterrupt  # a kill in the middle of shard 1

    stop_after = 4  # batches [0 1 2] [3] -> shard 0 written; [4 5 6] encoded; [7] interrupted
    hook = vae.encoder.register_forward_hook(count_or_stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            encode(images, output, vae)
        manifest = json.loads((output / "manifest.json").read_text())
        assert [s["index"] for s in manifest["shards"]] == [0] and not manifest["complete"]
        with pytest.raises(ValueError, match="unfinished"):
            LatentDataset(output)
        (output / ".shard_00001.moments.npy.stale.tmp").write_bytes(b"half a file")  # as a kill leaves

        stop_after, batches_seen[:] = None, []
        encode(images, output, vae)
        assert sum(batches_seen) == 6  # images 4..9 only: shard 0 was kept
        assert not list(output.glob(".*.tmp"))
        assert_same_cache(output, cache)

        # A finished shard that went missing on disk is redone, and only it.
        (output / "shard_00002.moments.npy").unlink()
        batches_seen[:] = []
        encode(images, output, vae)
        assert sum(batches_seen) == 2
        assert_same_cache(output, cache)

        batches_seen[:] = []
        encode(images, output, vae)  # a finished cache: nothing to do
        assert batches_seen == []
    finally:
        hook.remove()

    with pytest.raises(ValueError, match="flip"):
        encode(images, output, vae, flip=False)  # other settings never mix into an existing cache
    other = tiny_vae()
    with torch.no_grad():
        other.encoder.conv_in.bias.add_(1.0)
    with pytest.raises(ValueError, match="vae_sha256"):
        encode(images, output, other)


def assert_same_cache(left, right):
    left_manifest = json.loads((left / "manifest.json").read_text())
    right_manifest = json.loads((right / "manifest.json").read_text())
    assert left_manifest == right_manifest
    for entry in right_manifest["shards"]:
        for kind in ("moments", "labels"):
            name = f"shard_{entry['index']:05d}.{kind}.npy"
            assert np.array_equal(np.load(left / name), np.load(right / name)), name


# ------------------------------------------------------------------------------------------------
# Drawing latents
# ------------------------------------------------------------------------------------------------


def test_batches_draw_mean_plus_std_times_noise_scaled_by_0_18215(cache, tmp_path):
    assert SD_VAE_SCALE_FACTOR == 0.18215  # not 0.18125 (spec section 8)

    # With std = 0 a draw is exactly mean * 0.18215, the flipped image's mean about half the time.
    def zero_std(moments, start):
        index_identified(moments, start)
        moments[:, 1] = moments[:, 3] = 0.0

    deterministic = rewrite_moments(cache, tmp_path / "zero_std", zero_std)
    source = LatentBatches(deterministic, batch_size=5, seed=3)
    flips = 0
    for _ in range(8):
        z, labels = source.next_batch()
        assert z.shape == (5, *LATENT_SHAPE) and z.dtype == torch.float32 and labels.dtype == torch.int64
        identity = (z[:, 0, 0, 0] / SD_VAE_SCALE_FACTOR).round()  # 100 i, or 100 i + 50 when flipped
        image, flipped = (identity // 100).long(), identity % 100 == 50
        mean = (100 * image + 50 * flipped).to(torch.float32)[:, None, None, None]
        assert torch.equal(z, (mean * SD_VAE_SCALE_FACTOR).expand_as(z))
        assert torch.equal(labels, (image >= 5).long())
        flips += int(flipped.sum())
    assert 10 <= flips <= 30  # 40 coin flips

    # The real moments (one marker element aside): eps = (z / s - mean) / std is standard normal,
    # with the moments of the orientation that was drawn.
    real = torch.stack([sample for sample, _ in LatentDataset(cache)])  # (10, 4, C, h, w)
    source = LatentBatches(rewrite_moments(cache, tmp_path / "marked", marked), batch_size=NUM_IMAGES, seed=1)
    eps, flips = [], 0
    for _ in range(200):
        z, _ = source.next_batch()
        image, flipped = identify(z)
        assert sorted(image.tolist()) == list(range(NUM_IMAGES))  # an epoch is a permutation
        slot = 2 * flipped.long()
        mean, std = real[image, slot], real[image, slot + 1]  # (10, C, h, w) each
        eps.append(((z / SD_VAE_SCALE_FACTOR - mean) / std).flatten(1)[:, 1:])  # the marker left out
        flips += int(flipped.sum())
    eps = torch.cat(eps)
    assert abs(float(eps.mean())) < 0.01 and abs(float(eps.std()) - 1.0) < 0.01
    assert 900 <= flips <= 1100  # 2000 coin flips


def test_each_draw_is_a_fresh_posterior_sample_and_resume_is_bit_identical(cache, tmp_path):
    real = torch.stack([sample for sample, _ in LatentDataset(cache)])  # (10, 4, C, h, w)
    source = LatentBatches(rewrite_moments(cache, tmp_path / "marked", marked), batch_size=NUM_IMAGES, flip=False)
    noise = []
    for _ in range(2):  # two epochs: every image twice
        z, _ = source.next_batch()
        image, _ = identify(z)
        eps = (z / SD_VAE_SCALE_FACTOR - real[image, 0]) / real[image, 1]  # (10, C, h, w)
        noise.append(eps[image.argsort()].flatten(1)[:, 1:])  # by image, the marker left out
    assert not torch.equal(noise[0], noise[1])
    assert 1.0 < float((noise[0] - noise[1]).abs().mean()) < 1.25  # E|e1 - e2| = 2 / sqrt(pi) = 1.128

    # Resume: 3 batches (crossing an epoch boundary at 2), save, rebuild, and continue identically.
    run = LatentBatches(cache, batch_size=4, seed=7)
    for _ in range(3):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))
    resumed = LatentBatches(cache, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    for _ in range(5):
        (z, labels), (z_resumed, labels_resumed) = run.next_batch(), resumed.next_batch()
        assert torch.equal(z, z_resumed) and torch.equal(labels, labels_resumed)

    # Ranks take their rows of one global batch: two ranks of 2 draw what one process of 4 draws.
    single = LatentBatches(cache, batch_size=4, seed=7)
    ranks = [LatentBatches(cache, batch_size=2, seed=7, rank=rank, world_size=2) for rank in range(2)]
    for _ in range(4):
        z, labels = single.next_batch()
        parts = [rank.next_batch() for rank in ranks]
        assert torch.equal(z, torch.cat([part[0] for part in parts]))
        assert torch.equal(labels, torch.cat([part[1] for part in parts]))


def bits(z):
    """The float32 bit patterns of z: equal only if z is bitwise equal."""
    return z.contiguous().view(torch.int32)


def reader_threads(source):
    """Record the thread of every cache read of ``source``; returns the list it fills."""
    threads = []
    read = source.dataset.moments

    def recording(indices, flipped=None):
        threads.append(threading.current_thread())
        return read(indices, flipped)

    source.dataset.moments = recording
    return threads


@pytest.mark.parametrize("options", [dict(batch_size=3, seed=5),
                                     dict(batch_size=2, seed=5, rank=1, world_size=2, class_conditional=False)])
def test_reading_ahead_draws_bitwise_the_batches_and_states_of_synchronous_reads(cache, options):
    synchronous = LatentBatches(cache, prefetch=False, **options)
    ahead = LatentBatches(cache, prefetch=True, **options)
    threads = reader_threads(ahead)
    for _ in range(11):  # 3 or 2 batches per epoch of 10 images: several epoch boundaries
        (z, labels), (z_ahead, labels_ahead) = synchronous.next_batch(), ahead.next_batch()
        assert torch.equal(bits(z), bits(z_ahead))
        assert (labels is None and labels_ahead is None) or torch.equal(labels, labels_ahead)
        assert ahead.state_dict() == synchronous.state_dict()
    ahead.close()  # waits for the 12th batch, read ahead
    assert not any(thread.is_alive() for thread in threads[1:])  # no reader outlives close()
    # The first batch is read by the caller, every later one by a daemon thread started one batch earlier.
    assert threads[0] is threading.current_thread() and len(threads) == 12
    assert all(thread is not threading.current_thread() and thread.daemon for thread in threads[1:])


def test_resuming_or_rewinding_a_reading_ahead_source_drops_the_batch_read_for_the_old_position(cache):
    uninterrupted = LatentBatches(cache, batch_size=3, seed=2, prefetch=False)
    expected = [uninterrupted.next_batch()[0] for _ in range(8)]

    run = LatentBatches(cache, batch_size=3, seed=2)
    for _ in range(4):  # across the epoch boundary after 3 batches
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # saved with the 5th batch already read ahead
    resumed = LatentBatches(cache, batch_size=3, seed=2)
    resumed.next_batch()  # a read-ahead for the wrong position, to be dropped
    resumed.load_state_dict(state)
    for step in range(4, 8):
        assert torch.equal(bits(resumed.next_batch()[0]), bits(expected[step]))

    run.load_state_dict({"epoch": 0, "offset": 3})  # back to the 2nd batch while the 5th is read ahead
    for step in range(1, 8):
        assert torch.equal(bits(run.next_batch()[0]), bits(expected[step]))


def test_an_error_in_the_reader_thread_is_raised_by_next_batch_and_the_batch_is_not_lost(cache):
    reference = LatentBatches(cache, batch_size=3, seed=0, prefetch=False)
    source = LatentBatches(cache, batch_size=3, seed=0)
    read, threads = source.dataset.moments, []

    def failing_once(indices, flipped=None):
        threads.append(threading.current_thread())
        if len(threads) == 2:
            raise OSError("the disk went away")
        return read(indices, flipped)

    source.dataset.moments = failing_once
    assert torch.equal(source.next_batch()[0], reference.next_batch()[0])
    with pytest.raises(OSError, match="the disk went away"):
        source.next_batch()  # read ahead, in another thread, raised in this one
    assert threads[1] is not threading.current_thread()
    assert source.state_dict() == {"epoch": 0, "offset": 3}  # the failed batch is still the next one
    assert torch.equal(source.next_batch()[0], reference.next_batch()[0])


READ_AHEAD_AT_EXIT = """
import sys, time
import meanflow.data.latent_source as latent_source
latent_source._EXIT_WAIT_SECONDS = 1.0
source = latent_source.LatentBatches(sys.argv[1], batch_size=3)
read, calls = source.dataset.moments, []
def maybe_stuck(indices, flipped=None):
    calls.append(1)
    if sys.argv[2] == "stuck" and len(calls) > 1:
        time.sleep(3600)  # a read that never ends
    return read(indices, flipped)
source.dataset.moments = maybe_stuck
source.next_batch()  # returns with the next batch being read ahead
print("returned", flush=True)
"""


@pytest.mark.parametrize("reader", ["in-flight", "stuck"])
def test_a_read_ahead_at_exit_neither_hangs_nor_aborts_the_interpreter(cache, reader):
    # Without the wait at exit, a daemon thread stopped inside torch aborts the finished process (SIGABRT).
    finished = subprocess.run([sys.executable, "-c", READ_AHEAD_AT_EXIT, str(cache), reader], capture_output=True,
                              text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert finished.returncode == 0 and finished.stdout == "returned\n", finished.stderr
    assert "terminate" not in finished.stderr


def test_decode_divides_by_the_scale_factor_and_returns_images_in_range(cache, vae):
    z, _ = LatentBatches(cache, batch_size=6, seed=0).next_batch()
    decoded = decode_latents(vae, z, batch_size=4)
    assert decoded.shape == (6, 3, RESOLUTION, RESOLUTION) and decoded.dtype == torch.float32
    assert torch.isfinite(decoded).all() and decoded.min() >= -1 and decoded.max() <= 1
    with torch.no_grad():
        expected = vae.decode(z / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# Loading the VAE; the command
# ------------------------------------------------------------------------------------------------


def test_offline_load_names_the_weights_and_a_saved_folder_loads_back(tmp_path, monkeypatch, vae):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    with pytest.raises(VAEUnavailableError) as caught:
        load_vae(DEFAULT_VAE)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)  # the CLI reports it as a usage error
    for needed in ("stabilityai/sd-vae-ft-mse", "--vae", "data.vae", "HF_HUB_OFFLINE", "config.json",
                   "diffusion_pytorch_model.safetensors"):
        assert needed in message, needed
    with pytest.raises(VAEUnavailableError, match="does not exist"):
        load_vae(str(tmp_path / "no_such_vae"))

    vae.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_vae(tmp_path / "vae")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    original = vae.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    assert all(torch.equal(tensor, original[key]) for key, tensor in loaded.state_dict().items())


@pytest.fixture
def vae_reads(monkeypatch):
    """The names load_vae passes to AutoencoderKL.from_pretrained, with an empty VAE cache around the test."""
    clear_vae_cache()
    reads = []
    from_pretrained = diffusers.AutoencoderKL.from_pretrained

    def counting(name, **options):
        reads.append(name)
        return from_pretrained(name, **options)

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", counting)
    yield reads
    clear_vae_cache()


def test_a_vae_is_read_from_disk_once_per_folder_device_and_dtype(tmp_path, monkeypatch, vae, vae_reads):
    folder = tmp_path / "vae"
    vae.save_pretrained(folder)
    first = load_vae(folder)
    assert load_vae(folder) is first and load_vae(str(folder), device=torch.device("cpu")) is first
    monkeypatch.chdir(tmp_path)
    assert load_vae("./vae", "cpu", torch.float32) is first  # another spelling of the same folder
    assert len(vae_reads) == 1

    double = load_vae(folder, dtype=torch.float64)  # another dtype is another module
    assert double is not first and next(double.parameters()).dtype == torch.float64
    assert load_vae(folder, dtype=torch.float64) is double and len(vae_reads) == 2

    # Weights saved again into the folder are read again. The modification times are moved on
    # explicitly: a file system may keep them too coarsely to tell two quick saves apart.
    other = tiny_vae()
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(1.0)
    other.save_pretrained(folder)
    for file in folder.iterdir():
        stat = file.stat()
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    reloaded = load_vae(folder)
    assert reloaded is not first and len(vae_reads) == 3
    assert torch.equal(reloaded.decoder.conv_out.bias, other.decoder.conv_out.bias)

    clear_vae_cache()
    assert load_vae(folder) is not reloaded and len(vae_reads) == 4
    with pytest.raises(VAEUnavailableError):
        load_vae(tmp_path / "no_such_vae")
    assert load_vae(vae) is vae and len(vae_reads) == 4  # a module is used as it is, never cached


def test_the_encode_command_writes_a_float16_cache_without_flips(tmp_path, images, vae, cache, capsys):
    vae.save_pretrained(tmp_path / "vae")
    shutil.copytree(images, tmp_path / "images")
    (tmp_path / "images" / "cat" / "broken.png").write_bytes(b"not a png")
    parser = argparse.ArgumentParser(prog="meanflow")
    add_encode_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["encode", "--images", str(tmp_path / "images"), "--output", str(tmp_path / "half"),
                              "--vae", str(tmp_path / "vae"), "--resolution", "32", "--no-flip",
                              "--dtype", "float16", "--shard-size", "8", "--skip-corrupt", "--no-progress"])
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "10 in 2 classes (1 unreadable files skipped)" in printed and "4x16x16 float16" in printed

    half = LatentDataset(tmp_path / "half")
    assert not half.has_flips and half.manifest["vae"] == str(tmp_path / "vae")
    assert half.manifest["skipped"] == ["cat/broken.png"]
    full = LatentDataset(cache)
    for i in range(NUM_IMAGES):
        torch.testing.assert_close(half[i][0], full[i][0][:2], atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="--no-flip"):
        LatentBatches(tmp_path / "half", batch_size=2, flip=True)
    z, labels = LatentBatches(tmp_path / "half", batch_size=2, flip=False).next_batch()
    assert z.dtype == torch.float32 and z.shape == (2, *LATENT_SHAPE)


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


def test_images_to_latents_to_a_training_step_to_one_step_samples_to_images(tmp_path, vae):
    from meanflow.models.dit import DiT, DiTConfig
    from meanflow.objectives import MeanFlow, TrainingGuidance
    from meanflow.sampling import sample

    root = write_image_folder(tmp_path / "images")
    cache_dir = encode_image_folder(root, tmp_path / "cache", vae, resolution=RESOLUTION, batch_size=4,
                                    shard_size=6, progress=False)
    source = LatentBatches(cache_dir, batch_size=4, seed=0)
    z, labels = source.next_batch()
    assert z.shape == (4, *LATENT_SHAPE)

    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=LATENT_SHAPE[1], in_channels=4, patch_size=2, hidden_size=32, depth=1,
                          num_heads=2, num_classes=2))
    objective = MeanFlow(num_classes=2, guidance=TrainingGuidance(omega=1.0, kappa=0.5))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    output = objective.loss(model, z, labels, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))

    noise = torch.randn(4, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    generated = sample(model.eval(), noise, labels, num_steps=1)  # (4, 4, 16, 16) latents
    assert generated.shape == noise.shape and not torch.equal(generated, noise)  # the step moved the model
    pictures = decode_latents(vae, generated)
    assert pictures.shape == (4, 3, RESOLUTION, RESOLUTION)
    assert torch.isfinite(pictures).all() and pictures.abs().max() <= 1
