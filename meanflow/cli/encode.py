"""``meanflow encode``: turn an ImageFolder tree into an SD-VAE latent cache for training.

    meanflow encode --images imagenet/train --output cache/imagenet256 [--vae FOLDER] [--device cuda]

Re-running the same command after an interruption resumes where it stopped. Train on the cache
with ``--set data.name=latents --set data.path=cache/imagenet256``.
"""

from __future__ import annotations

import argparse

from .common import check_output_folder, positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``encode`` on the ``meanflow`` command's sub-parsers; returns its parser."""
    from ..data.latent_format import STORAGE_DTYPES
    from ..vae import DEFAULT_VAE

    parser = subparsers.add_parser("encode", help="encode an ImageFolder tree into an SD-VAE latent cache",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="the ImageFolder root: ROOT/<class_name>/<image files>")
    parser.add_argument("--output", required=True, help="the cache folder (an unfinished one resumes)")
    parser.add_argument("--vae", default=DEFAULT_VAE,
                        help=f"a hub name or a local folder with config.json and diffusion_pytorch_model.safetensors "
                             f"(default {DEFAULT_VAE})")
    parser.add_argument("--resolution", type=positive_int, default=256,
                        help="side of the ADM centre crop (default 256)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE call (default 32)")
    parser.add_argument("--no-flip", action="store_true", help="do not cache the moments of mirrored images")
    parser.add_argument("--shard-size", type=positive_int, default=1024, help="images per shard file (default 1024)")
    parser.add_argument("--skip-corrupt", action="store_true", help="skip unreadable image files instead of failing")
    parser.add_argument("--device", default="cpu", help="where the VAE runs: cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--dtype", choices=STORAGE_DTYPES, default="float32", help="storage of the moments")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Encode ``args.images`` into ``args.output`` and print what the cache holds; returns 0."""
    import json

    from ..data.latent_format import MANIFEST_NAME
    from ..data.latent_writer import encode_image_folder
    from ..distributed import resolve_device

    # Checked before the VAE is read: the device and the output folder here, the images first
    # thing in encode_image_folder.
    device = str(resolve_device(args.device, "--device"))
    check_output_folder(args.output, "--output")
    output = encode_image_folder(
        args.images,
        args.output,
        vae=args.vae,
        resolution=args.resolution,
        batch_size=args.batch_size,
        flip=not args.no_flip,
        shard_size=args.shard_size,
        skip_corrupt=args.skip_corrupt,
        device=device,
        progress=not args.no_progress,
        storage_dtype=args.dtype,
        num_workers=args.workers,
    )
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    channels, height, width = manifest["latent_shape"]
    print(f"cache:       {output}")
    print(f"images:      {manifest['num_images']:,} in {len(manifest['class_names'])} classes "
          f"({len(manifest['skipped'])} unreadable files skipped)")
    print(f"latents:     {channels}x{height}x{width} {manifest['dtype']}, moments {', '.join(manifest['moments'])}")
    print(f"shards:      {len(manifest['shards'])} of {manifest['shard_size']} images")
    print(f"vae:         {manifest['vae']} (scale factor {manifest['scale_factor']})")
    print(f"resolution:  {manifest['resolution']} (ADM centre crop)")
    print(f"train with:  --set data.name=latents --set data.path={output}")
    return 0


__all__ = ["add_parser", "run"]
