"""``meanflow convert``: another project's weight file as a run folder that sample and eval use.

    meanflow convert --from imf-torch iMF-B-2.pth --output runs/imf-b2 [--preset iMF-B/2]
    meanflow sample --checkpoint runs/imf-b2 --weights raw --num-samples 64 --device cuda

The file is read without running any code in it (``torch.load(weights_only=True)``) and checked
strictly against the architecture; the layout is read from its shapes unless ``--preset`` names it.
"""

from __future__ import annotations

import argparse

from .common import check_output_folder, positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``convert`` on the ``meanflow`` command's sub-parsers; returns its parser."""
    from ..converters import CONVERTERS

    parser = subparsers.add_parser("convert", help="convert released weights (Improved MeanFlow .pth) to a run folder",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="the weight file, e.g. iMF-B-2.pth")
    parser.add_argument("--from", dest="source_format", required=True, choices=sorted(CONVERTERS),
                        help="the file's format: imf-torch (Lyy-iiis/imeanflow's torch branch)")
    parser.add_argument("--output", required=True, help="the run folder to write (new, empty, or an earlier conversion)")
    parser.add_argument("--preset", help="the layout, iMF-B/2, iMF-M/2, iMF-L/2 or iMF-XL/2 (default: read from the "
                                         "shapes)")
    parser.add_argument("--input-size", type=positive_int, default=32,
                        help="the latent side, not stored in the weights (default 32: ImageNet 256)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert ``args.file`` into ``args.output`` and print what was written; returns 0."""
    from ..converters import converter

    output = check_output_folder(args.output, "--output")
    done = converter(args.source_format)(args.file, output, args.preset, input_size=args.input_size)
    config = done.config
    layout = done.preset or (f"inferred from the shapes (no preset): hidden {config.hidden_size}, depth "
                             f"{config.depth}, {config.num_heads} heads, head depth {config.aux_head_depth}, "
                             f"patch {config.patch_size}, {config.in_channels} channels, {config.num_classes} classes")
    found = "the file's top level" if done.nesting_key is None else f"the key {done.nesting_key!r}"
    print(f"read:        {args.file} ({done.tensors} tensors from {found})")
    print(f"layout:      {layout} (auxiliary_head=false)")
    dropped = "; ".join(f"{count} x {reason}" for reason, count in done.dropped.items()) or "nothing"
    print(f"dropped:     {dropped}")
    print(f"checkpoint:  {done.checkpoint} (weights 'raw', no EMA copies)")
    print(f"sampler:     imf, omega {done.omega:g}, interval [{done.interval[0]:g}, {done.interval[1]:g}] "
          f"(the authors' 1-NFE setting)")
    print(f"sample with: meanflow sample --checkpoint {done.run} --weights raw --num-samples 64 --device cuda")
    return 0


__all__ = ["add_parser", "run"]
