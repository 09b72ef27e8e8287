"""What several ``meanflow`` commands share: the run configuration from the command line,
argument types, and the one-line report of a mistake of the user's."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config module is imported only when a command runs
    from ..config import Config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--preset``, ``--config`` and ``--set``: the ways to name a run configuration."""
    parser.add_argument("--preset", help="a preset name (see `meanflow presets`)")
    parser.add_argument("--config", help="a JSON config file (as written to <run>/config.json)")
    parser.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override one field (repeatable)")


def config_from_args(args: argparse.Namespace) -> "Config":
    """The configuration named by ``--preset`` or ``--config``, with ``--set`` (and ``--steps``) applied."""
    from ..config import Config
    from ..presets import preset

    if bool(args.preset) == bool(args.config):
        raise ValueError("give exactly one of --preset NAME or --config FILE")
    config = preset(args.preset) if args.preset else Config.load(args.config)
    overrides = list(args.set or [])
    if getattr(args, "steps", None) is not None:
        overrides.append(f"training.steps={args.steps}")
    return config.with_overrides(overrides) if overrides else config


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of samples, steps, images per batch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command (``args.run``) and return its exit code.

    A mistake of the user's -- a bad value, a missing optional package, a path that is absent,
    a folder where a file was expected, a file that may not be read or written -- prints one
    ``meanflow <command>: error: ...`` line and returns 2; Ctrl-C returns 130; a closed pipe on
    stdout returns 1 silently. Anything else is a bug and keeps its traceback.
    """
    try:
        return args.run(args)
    except KeyboardInterrupt:
        _print_error(args.command, "interrupted")
        return 130
    except BrokenPipeError:  # the reader of stdout left (``meanflow presets | head``): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush is silent
        except (OSError, ValueError):  # stdout is no file (captured): nothing will be flushed to a pipe
            pass
        return 1
    except ImportError as error:
        if (error.name or "").partition(".")[0] == "meanflow":  # our own import is broken: a bug
            raise
        _print_error(args.command, _describe(error))  # an optional package is missing
        return 2
    except (ValueError, FileNotFoundError) as error:
        _print_error(args.command, _describe(error))
        return 2
    except OSError as error:
        if error.filename is None:  # not about a path the user gave (a device error, a bug)
            raise
        _print_error(args.command, _describe(error))
        return 2


def _describe(error: BaseException) -> str:
    """``path: reason`` for an operating-system error about a path, else the error's own message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        paths = str(error.filename) + ("" if error.filename2 is None else f" -> {error.filename2}")
        return f"{paths}: {error.strerror}"
    return str(error) or type(error).__name__


def _print_error(command: str, message: str) -> None:
    print(f"meanflow {command}: error: {message}", file=sys.stderr)


__all__ = ["add_config_arguments", "config_from_args", "positive_int", "run_command"]
