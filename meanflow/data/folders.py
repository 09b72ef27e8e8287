"""ImageFolder trees (the ImageNet layout) read one file at a time, with the ADM centre crop.

``root/<class_name>/<image files>``: one sub-folder per class, class ids 0..K-1 in sorted
folder-name order. :class:`ImageFolderDataset` reads such a tree lazily (the latent cache
encoder iterates over it once); :func:`load_image_folder` holds a small one in memory. Every
image passes through :func:`center_crop_adm`, the preprocessing behind the ImageNet FID
reference statistics. Pillow is needed here and imported when a tree is first read.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..validation import PathLike, check_integer
from .common import import_pil
from .transforms import pil_to_tensor

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_IMAGE_FOLDER_RESOLUTION = 256

_IMAGE_FOLDER_LAYOUT = (
    "an ImageFolder tree root/<class_name>/<image files> (the ImageNet layout, e.g. "
    "train/n01440764/n01440764_10026.JPEG): one sub-folder per class, class ids 0..K-1 in sorted "
    f"folder-name order, image extensions {' '.join(IMAGE_EXTENSIONS)} (any case)"
)


def center_crop_adm(image: "PILImage.Image", resolution: int) -> "PILImage.Image":
    """The ADM centre crop: the preprocessing behind the ImageNet FID reference statistics.

    The image is first converted to RGB (grey is replicated, alpha is dropped, palettes are
    expanded). Then, while the short side is at least ``2 * R``, both sides are halved (floor)
    with a BOX filter; the image is resized with BICUBIC so that each side becomes
    ``round(side * R / short_side)`` (Python's ``round``, as in the reference); and the central
    R x R square is cut, its top-left corner at ``((W - R) // 2, (H - R) // 2)``. Repeated box
    halving followed by one bicubic step avoids the aliasing of a single large bicubic reduction.

    Args:
        image: a Pillow image of any size and mode.
        resolution: R.

    Returns:
        An R x R RGB Pillow image.
    """
    Image = import_pil("the ADM centre crop")
    check_integer("resolution", resolution)
    resampling = getattr(Image, "Resampling", Image)  # Pillow >= 9.1 moved the filter constants
    if image.mode != "RGB":
        image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=resampling.BICUBIC)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


class ImageFolderDataset(Dataset):
    """An ImageFolder tree (``root/<class_name>/<image files>``, the ImageNet layout) as a Dataset.

    Class ids are 0..K-1 in sorted folder-name order (for ImageNet, the standard synset order).
    Files are found recursively inside each class folder, in sorted order, by extension
    (.jpg .jpeg .png .bmp .webp, any case); names starting with "." are ignored. Each item is
    the :func:`center_crop_adm` of the image. Flips and other augmentation are left to the
    training source.

    Construction opens every listed file with Pillow's cheap ``verify()`` (it reads headers and,
    for PNG, checksums, without decoding pixels). An unreadable file raises a ValueError naming
    it, or with ``skip_corrupt=True`` is left out, recorded in ``skipped`` and reported with a
    warning. A file that passes the check but fails to decode (a truncated JPEG) raises a
    ValueError naming it in ``__getitem__``.

    Args:
        root: the tree's root folder.
        resolution: R, the side of the returned square images.
        skip_corrupt: skip unreadable files instead of raising.
        max_images: keep only the first this many readable files in (class, path) order (only
            those are checked), or None for all.

    Attributes:
        class_names: the K class folder names; ``class_names[label]`` names a label.
        samples: (path, label) of every usable image.
        skipped: paths of the files left out as unreadable.

    Item:
        ``(image, label)``: image (3, R, R) uint8, label an int in 0..K-1.
    """

    def __init__(
        self,
        root: PathLike,
        resolution: int = DEFAULT_IMAGE_FOLDER_RESOLUTION,
        skip_corrupt: bool = False,
        max_images: Optional[int] = None,
    ):
        Image = import_pil("reading an image folder")
        check_integer("resolution", resolution)
        if max_images is not None:
            check_integer("max_images", max_images)
        self.root = Path(root).expanduser()
        self.resolution = resolution
        self.class_names = _find_class_folders(self.root)
        files_per_class = [_list_image_files(self.root / name) for name in self.class_names]
        empty = [name for name, files in zip(self.class_names, files_per_class) if not files]
        if empty:
            raise ValueError(
                f"{len(empty)} of {len(self.class_names)} class folders under {self.root} contain no image "
                f"files: {_preview(empty)}; expected {_IMAGE_FOLDER_LAYOUT}. Add images to them or remove them"
            )
        self.samples: list[tuple[str, int]] = []
        self.skipped: list[str] = []
        for label, files in enumerate(files_per_class):
            for file in files:
                if max_images is not None and len(self.samples) >= max_images:
                    break
                problem = _verify_image(Image, file)
                if problem is None:
                    self.samples.append((str(file), label))
                elif skip_corrupt:
                    self.skipped.append(str(file))
                else:
                    raise ValueError(
                        f"cannot read image file {file}: {problem}; to skip unreadable files add "
                        "--set data.skip_corrupt=true (meanflow encode: --skip-corrupt; Python: skip_corrupt=True)"
                    )
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image files under {self.root}: {_preview(self.skipped)}",
                stacklevel=2,
            )
        if not self.samples:
            raise ValueError(f"no readable image under {self.root}: all {len(self.skipped)} image files are unreadable")

    @property
    def num_classes(self) -> int:
        """K, the number of class folders."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """The ``index``-th image as (3, R, R) uint8 after the ADM centre crop, and its label."""
        Image = import_pil("reading an image folder")  # not kept on self: modules do not pickle
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                cropped = center_crop_adm(image, self.resolution)
        except Exception as error:  # any decoder failure is a bad file, whatever Pillow raises
            raise ValueError(f"cannot decode image file {path}: {error}") from error
        return pil_to_tensor(cropped), label


def load_image_folder(
    root: PathLike,
    resolution: int = DEFAULT_IMAGE_FOLDER_RESOLUTION,
    skip_corrupt: bool = False,
    max_images: Optional[int] = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Read a small ImageFolder tree into memory (see :class:`ImageFolderDataset`).

    Memory is N * 3 * R * R bytes; large trees belong in the latent cache instead.

    Args:
        root: the tree's root folder, ``root/<class_name>/<image files>``.
        resolution: R, the side after the ADM centre crop.
        skip_corrupt: skip unreadable files (with a warning) instead of raising.
        max_images: keep only the first this many images in (class, path) order, or None.

    Returns:
        images: (N, 3, R, R) uint8.
        labels: (N,) int64 class ids.
        class_names: the K class folder names in id order.
    """
    dataset = ImageFolderDataset(root, resolution, skip_corrupt=skip_corrupt, max_images=max_images)
    images = torch.empty(len(dataset), 3, resolution, resolution, dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.int64)
    for index in range(len(dataset)):
        images[index], labels[index] = dataset[index]
    return images, labels, list(dataset.class_names)


def _find_class_folders(root: Path) -> list[str]:
    if not root.exists():
        raise ValueError(f"image folder {root} does not exist; expected {_IMAGE_FOLDER_LAYOUT}")
    if not root.is_dir():
        raise ValueError(f"image folder {root} is a file, not a folder; expected {_IMAGE_FOLDER_LAYOUT}")
    entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    folders = [entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")]
    if folders:
        return folders
    files = [entry.name for entry in entries if not entry.name.startswith(".")]
    if files:
        raise ValueError(
            f"image folder {root} has no class sub-folders, only {len(files)} files directly inside it "
            f"({_preview(files)}); expected {_IMAGE_FOLDER_LAYOUT}. For unlabelled images, move them into "
            f"a single sub-folder such as {root / 'images'}"
        )
    raise ValueError(f"image folder {root} is empty; expected {_IMAGE_FOLDER_LAYOUT}")


def _list_image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), in sorted order, hidden names excluded."""
    found = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(directory) / name)
    return found


def _verify_image(Image, path: Path) -> Optional[str]:
    """None when Pillow can identify and verify ``path``, otherwise what went wrong."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # any failure here means the file cannot be used
        return f"{type(error).__name__}: {error}"
    return None


def _preview(names: list, limit: int = 5) -> str:
    shown = ", ".join(str(name) for name in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


__all__ = [
    "DEFAULT_IMAGE_FOLDER_RESOLUTION",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "center_crop_adm",
    "load_image_folder",
]
