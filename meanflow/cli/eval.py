"""``meanflow eval``: score a checkpoint by FID (and IS or class accuracy) for several step counts.

    meanflow eval --checkpoint runs/cifar10 --num-samples 50000 --steps 1 2 --reference cifar10_stats.npz
    meanflow eval --checkpoint runs/digits --metric domain --classifier classifiers/digits \\
        --train-classifier --num-samples 2000 --steps 1 2 4 --json digits_eval.json
    meanflow eval --checkpoint runs/digits --metric domain --classifier classifiers/digits \\
        --sweep --intermediate 0.3 0.5 0.7 --plot sweep.png

The run's own sampler is used (average-velocity steps for MeanFlow, the Euler ODE for flow
matching; ``--ode`` overrides it) and its encoder decodes the samples (latents by the run's VAE).
A run of 2-D points is scored by distances to exact samples of its toy distribution instead of
FID. Under ``torchrun`` every process generates its share of the samples and the statistics are
summed; only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional

from .common import check_output_file, check_output_folder, guidance_interval, positive_int, seed
from .eval_report import plot_sweep, print_summary, table_rows


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on the ``meanflow`` command's sub-parsers; returns its parser."""
    parser = subparsers.add_parser(
        "eval", help="FID / IS / class accuracy of a checkpoint's samples",
        description="Score a checkpoint by the standard protocol: FID of --num-samples generated images against "
                    "reference statistics, for each --steps. The 'domain' metric uses a classifier trained by this "
                    "project; its FID is NOT comparable with Inception FID. Runs of 2-D points are scored by "
                    "energy distance, sliced Wasserstein and precision / recall against their toy distribution.")
    parser.add_argument("--checkpoint", required=True, help="a run folder or a checkpoints/step_<n> folder")
    parser.add_argument("--num-samples", type=positive_int, default=50000,
                        help="samples in total (default 50000: FID-50K)")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[1, 2, 4],
                        help="sampling step counts to score")
    parser.add_argument("--weights", nargs="+", help="EMA name(s) such as ema_0.9999, or raw (default: the first EMA; "
                                                     "with --sweep: every EMA)")
    parser.add_argument("--metric", choices=["inception", "domain"], default="inception")
    parser.add_argument("--reference", help="statistics .npz (ours or ADM's) or a data set: digits, "
                                            "mnist, fashion-mnist or cifar10, with :train or :test "
                                            "(default: the checkpoint's data set, training split); for a run "
                                            "of 2-D points a toy distribution (default: the run's own)")
    parser.add_argument("--classifier", help="domain classifier folder (metric domain)")
    parser.add_argument("--train-classifier", action="store_true",
                        help="train the domain classifier on the reference data set's training split and save it "
                             "to --classifier first (skipped when the folder already holds one)")
    parser.add_argument("--classifier-steps", type=positive_int, default=500,
                        help="training steps of --train-classifier")
    parser.add_argument("--inception-weights", help="local copy of weights-inception-2015-12-05-6726825d.pth "
                                                    "(for machines without internet)")
    parser.add_argument("--batch-size", type=positive_int, default=250, help="samples per batch (memory only)")
    parser.add_argument("--seed", type=seed, default=0, help="sample i starts from noise seeded by (seed, i); >= 0")
    parser.add_argument("--label-mode", choices=["balanced", "random"], default="balanced",
                        help="labels of conditional samples: every class equally often, or uniform draws")
    parser.add_argument("--intermediate", type=float, nargs="+",
                        help="middle time(s) of 2-step sampling (several only with --sweep)")
    parser.add_argument("--omega", type=float, nargs="+",
                        help="iMF runs: guidance scale(s) the network is conditioned on (several only with --sweep; "
                             "default the run's own)")
    parser.add_argument("--interval", type=guidance_interval, nargs="+", metavar="T_MIN,T_MAX",
                        help="iMF runs: guidance interval(s) such as 0.4,0.65 (several only with --sweep)")
    parser.add_argument("--ode", choices=["euler", "heun"],
                        help="integrate u(z, t, t) with this method instead of the run's own sampler (a flow-matching "
                             "run's own is already Euler); the NFE is counted by the sampler (Heun: 2k - 1)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="inference-time CFG (doubles the NFE)")
    parser.add_argument("--precision-recall", type=positive_int, metavar="M",
                        help="also report improved precision / recall (k=3) between the first M samples and M "
                             "reference images (a data set, or an ADM reference batch with its images); e.g. 10000")
    parser.add_argument("--save-samples", help="folder for the samples: ADM-format .npz (arr_0 uint8 N x H x W x C, "
                                               "arr_1 labels) and a PNG grid of the first 100, per setting")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", help="reference statistics cache (default ~/.cache/meanflow/stats)")
    parser.add_argument("--data-path", help="local .npz or torchvision folder of the reference data set (default: "
                                            "the run's data.path when the reference is its data set)")
    parser.add_argument("--vae", help="the VAE decoding a latent model's samples (default: the run's data.vae)")
    parser.add_argument("--json", help="write the report (or, with --sweep, all reports) to this JSON file")
    parser.add_argument("--sweep", action="store_true",
                        help="score every --weights (default: every EMA) x --steps, plus 2-step sampling at each "
                             "--intermediate; print a table and plot the score against the NFE")
    parser.add_argument("--plot", help="the sweep's PNG (default: beside --json, else eval_sweep.png)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``meanflow eval``; returns the exit code."""
    from ..distributed import init_distributed, resolve_device, shutdown

    _check_output_paths(args, int(os.environ.get("RANK", "0")))
    chosen = resolve_device(args.device, "--device")
    if chosen.type == "cuda" and chosen.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        context, device = None, str(chosen)  # one process on the GPU it names
    else:
        context = init_distributed(args.device, setting="--device")  # refuses cuda:N under torchrun
        device = str(context.device)
    rank, world_size = (context.rank, context.world_size) if context is not None else (0, 1)
    try:
        reports = _evaluate(args, device, rank, world_size)
        if rank == 0:
            _write_outputs(args, reports)
    except BaseException:
        if context is not None:
            shutdown(context, together=False)
        raise
    if context is not None:
        shutdown(context)
    return 0


def _check_output_paths(args: argparse.Namespace, rank: int) -> None:
    """The files this process will write can be written: checked before any sample is drawn.
    Every process writes its share of --save-samples; rank 0 alone the report and the plot."""
    if args.save_samples:
        check_output_folder(args.save_samples, "--save-samples")
    if rank != 0:
        return
    if args.json:
        check_output_file(args.json, "--json", "eval.json")
    if args.sweep:
        check_output_file(_plot_path(args), "--plot" if args.plot else "the sweep's plot (--plot)", "eval_sweep.png")


def _plot_path(args: argparse.Namespace) -> Path:
    """--plot, else beside --json, else eval_sweep.png in the working folder."""
    if args.plot:
        return Path(args.plot)
    return Path(args.json).with_suffix(".png") if args.json else Path("eval_sweep.png")


def settings_from_args(args: argparse.Namespace, device: str, rank: int = 0, world_size: int = 1):
    """The :class:`~meanflow.eval.settings.EvalSettings` the options name (before any sweep varies
    the weights, steps, middle time and sample folder)."""
    from ..eval.settings import EvalSettings

    intermediates = list(args.intermediate or [])
    return EvalSettings(
        num_samples=args.num_samples, steps=tuple(args.steps), metric=args.metric, reference=args.reference,
        classifier_path=args.classifier, inception_weights=args.inception_weights, batch_size=args.batch_size,
        seed=args.seed, label_mode=args.label_mode, intermediate=intermediates[0] if intermediates else None,
        ode=args.ode, guidance_scale=args.guidance_scale, omega=(args.omega or [None])[0],
        interval=(args.interval or [None])[0], precision_recall_samples=args.precision_recall,
        save_samples=args.save_samples, cache_dir=args.cache_dir, data_path=args.data_path, vae=args.vae,
        device=device, progress=not args.no_progress, rank=rank, world_size=world_size)


def _evaluate(args: argparse.Namespace, device: str, rank: int, world_size: int) -> list[dict[str, Any]]:
    """One report, or with ``--sweep`` one per weights and per extra middle time."""
    from ..eval.evaluate import evaluate_checkpoint
    from ..eval.features import build_feature_extractor

    weights_list = _weights_to_score(args)
    intermediates = list(args.intermediate or [])
    guidance = [(omega, interval) for omega in (args.omega or [None]) for interval in (args.interval or [None])]
    if not args.sweep and (len(weights_list) > 1 or len(intermediates) > 1 or len(guidance) > 1):
        raise ValueError("several --weights, --intermediate, --omega or --interval values need --sweep")
    base = settings_from_args(args, device, rank, world_size)
    if args.metric == "domain" and args.train_classifier:
        _train_classifier_if_missing(args, rank, world_size)
    extractor = None
    if _samples_are_images(args.checkpoint):  # one feature network for every report of a sweep
        extractor = build_feature_extractor(base.metric, base.inception_weights, base.classifier_path, base.device,
                                            base.batch_size)
    reports = []
    for weights in weights_list:
        if not args.sweep:
            reports.append(evaluate_checkpoint(args.checkpoint, base.replace(weights=weights),
                                               feature_extractor=extractor))
            continue
        folder = _samples_folder(args, weights)
        for omega, interval in guidance:  # an iMF run: scale x interval x steps from one checkpoint
            uniform = base.replace(weights=weights, intermediate=None, save_samples=folder, omega=omega,
                                   interval=interval)
            reports.append(evaluate_checkpoint(args.checkpoint, uniform, feature_extractor=extractor))
            for intermediate in intermediates:
                middle = uniform.replace(steps=(2,), intermediate=intermediate)
                reports.append(evaluate_checkpoint(args.checkpoint, middle, feature_extractor=extractor))
    return reports


def _write_outputs(args: argparse.Namespace, reports: list[dict[str, Any]]) -> None:
    """Print the table; write the JSON and (``--sweep``) the plot. Rank 0 only."""
    rows = table_rows(reports)
    print_summary(reports[0], rows)
    if args.json:
        from ..io import write_text_atomic

        payload: Any = {"reports": reports, "table": rows} if args.sweep else reports[0]
        write_text_atomic(Path(args.json), json.dumps(payload, indent=2) + "\n")
        print(f"report: {args.json}")
    if args.sweep:
        plot = _plot_path(args)
        plot_sweep(rows, plot, reports[0]["metric"])
        print(f"plot: {plot}")


def _run_record(checkpoint: str):
    """The run record of a run or step folder (no weights are read)."""
    from ..checkpoint import resolve_checkpoint
    from ..run_record import RunRecord

    return RunRecord.load(resolve_checkpoint(Path(checkpoint)))


def _samples_are_images(checkpoint: str) -> bool:
    return _run_record(checkpoint).build_encoder().is_image


def _weights_to_score(args: argparse.Namespace) -> list[Optional[str]]:
    if args.weights:
        return list(args.weights)
    if not args.sweep:
        return [None]
    return list(_run_record(args.checkpoint).ema_names) or ["raw"]


def _samples_folder(args: argparse.Namespace, weights: Optional[str]) -> Optional[str]:
    """A sweep keeps each weights' samples apart (file names already tell steps and times)."""
    return None if args.save_samples is None else str(Path(args.save_samples) / (weights or "default"))


def _train_classifier_if_missing(args: argparse.Namespace, rank: int, world_size: int) -> None:
    """Train and save the domain classifier on the reference data set (rank 0; others wait)."""
    import torch

    from ..eval.classifier import (
        CONFIG_FILE,
        classifier_accuracy,
        save_classifier,
        train_domain_classifier,
    )
    from ..eval.references import ReferenceSpec, load_reference_images, parse_reference

    if args.classifier is None:
        raise ValueError("--train-classifier needs --classifier PATH (where to save it)")
    if rank == 0 and not (Path(args.classifier) / CONFIG_FILE).is_file():
        data_config = _run_record(args.checkpoint).config["data"]
        spec = parse_reference(args.reference or data_config["name"])
        if isinstance(spec, Path):
            raise ValueError("--train-classifier needs a data set as --reference (it trains on its images), "
                             "not a statistics file")
        data_path = args.data_path or (data_config.get("path") if spec.dataset == data_config["name"] else None)
        train_split = "all" if spec.dataset == "digits" else "train"
        images, labels = load_reference_images(ReferenceSpec(spec.dataset, train_split), data_path)
        print(f"training a domain classifier on {spec.dataset}:{train_split} ({len(images)} images, "
              f"{args.classifier_steps} steps)", flush=True)
        model = train_domain_classifier(images, labels, steps=args.classifier_steps, seed=args.seed)
        info: dict[str, Any] = {"dataset": spec.dataset, "split": train_split, "steps": args.classifier_steps,
                                "seed": args.seed}
        if spec.dataset != "digits":
            test_images, test_labels = load_reference_images(ReferenceSpec(spec.dataset, "test"), data_path)
            info["test_accuracy"] = classifier_accuracy(model, test_images, test_labels)
            print(f"test accuracy {info['test_accuracy']:.4f}")
        save_classifier(model, args.classifier, info)
        print(f"classifier: {args.classifier}")
    if world_size > 1:
        torch.distributed.barrier()


__all__ = ["add_parser", "run"]
