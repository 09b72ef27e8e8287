"""The few helpers every data module shares: the path type, a positive-integer check, Pillow's lazy import.

They live here once so that arrays, folders, transforms and the latent cache validate and
report alike (a second copy of a check drifts in its wording and its edge cases).
"""

from __future__ import annotations

import os
from typing import Any, Union

PathLike = Union[str, os.PathLike]


def check_positive_int(name: str, value: Any) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= 1 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def import_pil(purpose: str):
    """``PIL.Image``, or an ImportError saying that ``purpose`` needs Pillow and how to install it.

    Pillow is optional: only decoding image files needs it, so it is imported when that happens.
    """
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs Pillow; install it with `pip install pillow` or `pip install meanflow[all]`"
        ) from error
    return Image


__all__ = ["PathLike", "check_positive_int", "import_pil"]
