"""The errors meanflow raises for expected failures, and how their messages are worded.

A mistake in what the user gave -- a value, a device, a path, a data file -- raises a
``ValueError`` or ``FileNotFoundError`` (or one of the classes below, which are also one of the
built-in kinds, so ``except ValueError`` keeps working) whose message says what is wrong and
what is valid. The ``meanflow`` command prints such an error as one line and exits non-zero
without a traceback (``meanflow --debug`` or ``MEANFLOW_DEBUG=1`` shows it); any other exception
is a bug and keeps its traceback.

Wording: a hint names a setting the way the command line spells it (``--set
data.skip_corrupt=true``), with the Python spelling in parentheses where the Python API raises
the same message (``skip_corrupt=True``); a file holding pickled data is said to be refused,
and numpy's or torch's advice to unpickle it (``allow_pickle``, ``weights_only=False``) is never
passed on.
"""

from __future__ import annotations

import os
from typing import Union


class MeanflowError(Exception):
    """An expected failure of meanflow's own: the CLI prints the message and exits with ``exit_code``.

    ``same_on_every_rank``: under torchrun every process raises the same error at the same
    point (the processes agreed on it), so only rank 0 prints it.
    """

    exit_code = 2
    same_on_every_rank = False


class DeviceUnavailableError(MeanflowError, ValueError):
    """A device name that is not a device, or one this machine does not have (``cuda`` without a GPU)."""


class OutputPathError(MeanflowError, ValueError):
    """An output path that cannot be written as asked: a file where a folder is needed, a folder
    where a file is needed, or a folder that may not be written."""


class PickledDataError(MeanflowError, ValueError):
    """A file holds pickled Python objects, which meanflow never loads (a pickle can run any code)."""


class DataUnavailableError(MeanflowError, RuntimeError):
    """A data set could not be fetched (a failed download, for example offline)."""


class NonFiniteTrainingError(MeanflowError, FloatingPointError):
    """Training stopped by its non-finite policy (``training.on_nonfinite``); the last checkpoint
    is intact. The run did not finish, so the command exits 1 rather than 2 (a usage error)."""

    exit_code = 1
    same_on_every_rank = True


class NonFiniteStepWarning(UserWarning):
    """A training step was skipped because its loss or gradient was not finite (NaN or inf)."""


# numpy's and torch's refusals of pickled data, which say how to load it anyway.
_PICKLE_ADVICE = ("allow_pickle", "weights_only=False", "weights_only=false")


def advises_unpickling(error: Union[BaseException, str]) -> bool:
    """True when a message (of numpy or torch) refuses pickled data and suggests allowing it."""
    text = str(error)
    return any(advice in text for advice in _PICKLE_ADVICE) or "pickled data" in text


def pickled_data_message(path: Union[str, "os.PathLike[str]"], what: str = "") -> str:
    """``<path>[: <what>] holds pickled data ...``: the one wording of the refusal."""
    where = f"{os.fspath(path)}: {what}" if what else os.fspath(path)
    return (f"{where} holds pickled data (Python objects), which is refused: a pickle can run any code, so "
            "meanflow never loads one; store numeric arrays only")


__all__ = ["DataUnavailableError", "DeviceUnavailableError", "MeanflowError", "NonFiniteStepWarning",
           "NonFiniteTrainingError", "OutputPathError", "PickledDataError", "advises_unpickling",
           "pickled_data_message"]
