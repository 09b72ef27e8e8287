"""What several ``meanflow`` commands share: the run configuration from the command line,
argument types, the checks of output paths made before any work starts, and the error layer:
the one- or two-line report of a mistake of the user's, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

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


def _integer_at_least(text: str, minimum: int, not_integer: str, too_small: str) -> int:
    """``int(text)`` if it is at least ``minimum``, else an ArgumentTypeError with the given wording."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {not_integer}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {too_small}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of samples, steps, images per batch)."""
    return _integer_at_least(text, 1, "an integer", ">= 1")


class Parser(argparse.ArgumentParser):
    """An argparse parser whose mistakes print two lines -- where the options are listed, then
    what is wrong -- instead of the whole usage text (a command has dozens of options)."""

    def error(self, message: str):
        self.exit(2, f"usage: {self.prog} ... (`{self.prog} --help` lists the options)\n"
                     f"{self.prog}: error: {message}\n")


def seed(text: str) -> int:
    """An argparse type: a seed, an integer >= 0."""
    return _integer_at_least(text, 0, "an integer >= 0", "an integer >= 0")


# -- output paths, checked before any work starts ---------------------------------------------

def check_output_file(path: str | Path, option: str, example: str) -> Path:
    """``path`` as a file that can be written (created or replaced), or an :class:`OutputPathError`.

    ``option`` names it in the message (``--output``); ``example`` is a file name to suggest
    when a folder is given (``samples.npz``).
    """
    from ..errors import OutputPathError

    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder, but a file is needed; give a file path such as "
                              f"{path / example}")
    _check_can_create(path.parent, path, option)
    return path


def check_output_folder(path: str | Path, option: str) -> Path:
    """``path`` as a folder that exists or can be created, and can be written, or an :class:`OutputPathError`."""
    from ..errors import OutputPathError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path} is a file, but a folder is needed; give a folder path (it is "
                              "created if missing)")
    _check_can_create(path, path, option)
    return path


def _check_can_create(folder: Path, target: Path, option: str) -> None:
    """``folder`` exists and is writable, or can be created under its nearest existing parent."""
    from ..errors import OutputPathError

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{option} {target} cannot be created: {existing} is a file, not a folder")
    reason = _not_writable(existing)
    if reason is not None:
        raise OutputPathError(f"{option} {target} cannot be written: {existing} is not writable ({reason}); "
                              "give a path you can write to")


def _not_writable(folder: Path) -> Optional[str]:
    """None when a file can be created in ``folder``, else the system's reason. Tried, not guessed
    from permission bits (which say nothing of read-only file systems, ACLs or root); the probe
    file has no name on Linux and is gone when closed."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


# -- the error layer -------------------------------------------------------------------------

def debug_requested(args: argparse.Namespace) -> bool:
    """``--debug`` was given or ``MEANFLOW_DEBUG`` is set (1, true, yes, on): show tracebacks."""
    flag = os.environ.get("MEANFLOW_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(getattr(args, "debug", False))


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command (``args.run``) and return its exit code.

    An expected failure prints one ``meanflow <command>: error: ...`` line (what is wrong and
    what is valid) and no traceback: a :class:`~meanflow.errors.MeanflowError` returns its
    ``exit_code`` (1 for a training run stopped by its non-finite policy, else 2); a bad value
    (ValueError), an absent path (FileNotFoundError), a missing optional package, a folder where
    a file was expected or a file that may not be read or written return 2. Ctrl-C returns 130;
    a closed pipe on stdout returns 1 silently. Anything else is a bug and keeps its traceback.
    With ``--debug`` (or ``MEANFLOW_DEBUG=1``) the traceback of an expected failure is printed
    too, above its line. Warnings print as one ``meanflow <command>: warning: ...`` line each.
    """
    debug = debug_requested(args)
    with _one_line_warnings(args.command, enabled=not debug):
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
        except Exception as error:  # sorted below into expected failures and bugs
            code = expected_exit_code(error)
            if code is None:
                raise
            if debug:
                traceback.print_exc()
            if not (getattr(error, "same_on_every_rank", False) and _rank() > 0):
                _print_error(args.command, describe(error))
            return code


def expected_exit_code(error: BaseException) -> Optional[int]:
    """The exit code of an expected failure, or None for a bug (which keeps its traceback)."""
    from ..errors import MeanflowError

    if isinstance(error, MeanflowError):
        return error.exit_code
    if isinstance(error, ImportError):  # an optional package is missing; our own broken import is a bug
        return None if (error.name or "").partition(".")[0] == "meanflow" else 2
    if isinstance(error, (ValueError, FileNotFoundError)):
        return 2
    if isinstance(error, (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return 2  # about a path, even when raised with a message and no file name
    if isinstance(error, OSError) and error.filename is not None:
        return 2
    return None  # not about a path the user gave (a device error), or a bug


# numpy's refusals, which go on to say how to load the pickle anyway.
_NUMPY_PICKLE_REFUSALS = re.compile(r"(Object arrays cannot be loaded|Cannot load file containing pickled data) "
                                    r"when allow_pickle=False")


def describe(error: BaseException) -> str:
    """``path: reason`` for an operating-system error about a path, else the error's own message,
    never relaying numpy's or torch's advice to unpickle a file."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        paths = str(error.filename) + ("" if error.filename2 is None else f" -> {error.filename2}")
        return f"{paths}: {error.strerror}"
    message = str(error) or type(error).__name__
    message = _NUMPY_PICKLE_REFUSALS.sub("the file holds pickled data (Python objects), which is refused", message)
    if "allow_pickle" in message or "weights_only=False" in message:  # torch's long refusal, or another of numpy's
        return ("a file holds pickled data (Python objects), which is refused: meanflow never loads a pickle "
                "(`--debug` shows which file)")
    return message


@contextlib.contextmanager
def _one_line_warnings(command: str, enabled: bool) -> Iterator[None]:
    """While active, each warning prints as ``meanflow <command>: warning: <message>``."""
    if not enabled:
        yield
        return
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"meanflow {command}: warning: {message}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _rank() -> int:
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _print_error(command: str, message: str) -> None:
    rank = _rank()
    where = f"meanflow {command}" + (f" (rank {rank})" if rank else "")
    print(f"{where}: error: {message}", file=sys.stderr, flush=True)


__all__ = ["Parser", "add_config_arguments", "check_output_file", "check_output_folder", "config_from_args",
           "debug_requested", "describe", "expected_exit_code", "positive_int", "run_command", "seed"]


def guidance_interval(text: str) -> tuple[float, float]:
    """argparse type: ``"0.4,0.65"`` -> (0.4, 0.65), the [t_min, t_max] an iMF network is given."""
    parts = text.split(",")
    try:
        t_min, t_max = (float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an interval is two times T_MIN,T_MAX such as 0.4,0.65; got {text!r}") \
            from None
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise argparse.ArgumentTypeError(f"an interval needs 0 <= T_MIN <= T_MAX <= 1; got {text!r}")
    return t_min, t_max
