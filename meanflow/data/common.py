"""Pillow's lazy import, shared by the data modules that decode image files."""

from __future__ import annotations


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


__all__ = ["import_pil"]
