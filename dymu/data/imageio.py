"""Reading dataset files (png, jpg, npy, mat) safely, and resizing samples to one size.

Real datasets are read lazily, one file at a time, from folders the user brings, so every
reader here turns an unreadable or malformed file into a one-line
:class:`~dymu.errors.UserError` that names the file instead of a traceback from deep
inside PIL, numpy or scipy. Nothing here executes code from a file: ``.npy`` files are
read with ``allow_pickle=False`` and ``.mat`` files with :func:`scipy.io.loadmat`, which
only parses data.

Resizing follows the target conventions of :mod:`dymu.tasks.base`: the image is resized
bilinearly; every target is resized by nearest neighbour, so class ids, the ``-1`` ignore
value, ``0`` invalid depth and all-zero invalid normals are never blended with valid
values (and unit normals stay unit vectors).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dymu.errors import UserError

_NPY_ERRORS = (OSError, ValueError, EOFError)
_MAT_ERRORS = (OSError, ValueError, TypeError, NotImplementedError, EOFError)


def malformed(path: Path, dataset: str, why: str) -> UserError:
    """The one-line error for a file that exists but cannot be used."""
    return UserError(f"dataset {dataset}: malformed file {path}: {why}")


def read_rgb(path: Path, dataset: str) -> np.ndarray:
    """An image file as uint8 [H, W, 3] (grey, palette and RGBA images are converted)."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"dataset {dataset}: missing file {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise malformed(path, dataset, f"not a readable image ({exc})") from None


def read_png(path: Path, dataset: str) -> np.ndarray:
    """A PNG's stored values, untouched: palette PNGs give their indices, not colours.

    Label maps (VOC-style palette PNGs, grey PNGs) must be read this way: converting
    them to RGB would turn class ids into colours.
    """
    try:
        with Image.open(path) as im:
            return np.array(im)
    except FileNotFoundError:
        raise UserError(f"dataset {dataset}: missing file {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise malformed(path, dataset, f"not a readable image ({exc})") from None


def image_size(path: Path, dataset: str) -> tuple[int, int]:
    """(H, W) of an image file from its header only (cheap folder validation)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return h, w
    except FileNotFoundError:
        raise UserError(f"dataset {dataset}: missing file {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise malformed(path, dataset, f"not a readable image ({exc})") from None


def read_npy(path: Path, dataset: str) -> np.ndarray:
    """A numeric ``.npy`` array (never unpickles: object arrays are malformed)."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"dataset {dataset}: missing file {path}") from None
    except _NPY_ERRORS as exc:
        raise malformed(path, dataset, f"not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
        array.close()
        raise malformed(path, dataset, "an .npz archive, not a .npy array")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise malformed(path, dataset, "not a numeric .npy array")
    return array


def npy_shape(path: Path, dataset: str) -> tuple[int, ...]:
    """Shape of a numeric ``.npy`` array read from its header (the data stays on disk)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"dataset {dataset}: missing file {path}") from None
    except _NPY_ERRORS as exc:
        raise malformed(path, dataset, f"not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray) or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ):
        raise malformed(path, dataset, "not a numeric .npy array")
    shape = tuple(array.shape)
    del array  # close the memory map
    return shape


def read_mat(path: Path, dataset: str, key: str) -> Any:
    """Variable ``key`` of a MATLAB (v5) ``.mat`` file."""
    # scipy.io is slow to import and only real datasets need it
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        content = loadmat(path)
    except FileNotFoundError:
        raise UserError(f"dataset {dataset}: missing file {path}") from None
    except (*_MAT_ERRORS, MatReadError) as exc:
        raise malformed(path, dataset, f"not a readable .mat file ({exc})") from None
    if key not in content:
        raise malformed(path, dataset, f"has no variable {key!r}")
    return content[key]


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] (0..255) or float [H, W, 3] (0..1) -> float32 [3, H, W] in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(rgb))
    t = t.permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    if rgb.dtype == np.uint8:
        return t.float().div_(255.0)
    return t.float().clamp_(0.0, 1.0)


def unit_normals(normals: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """[H, W, 3] vectors scaled to unit length; vectors shorter than ``eps`` become 0.

    Both releases store normals that are only approximately unit (8-bit or resampled);
    the loss and the angle metrics assume unit vectors, and all-zero marks invalid.
    """
    n = normals.astype(np.float32, copy=True)
    norm = np.sqrt((n * n).sum(axis=-1, keepdims=True))  # [H, W, 1]
    valid = norm > eps
    np.divide(n, norm, out=n, where=valid)
    n[~valid[..., 0]] = 0.0
    return n


def resize_bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] float -> [C, *size], bilinear (antialiased when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(
        image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
    )  # [1, C, H, W] -> [1, C, h, w]
    return out.squeeze(0).clamp_(0.0, 1.0)


def resize_images(images: np.ndarray, size: Sequence[int], chunk: int = 4096) -> np.ndarray:
    """Resize uint8 images [N, H, W, C] to ``size`` = (h, w), bilinearly, in batches.

    Antialiased when shrinking so that small sizes do not alias; done ``chunk`` images at
    a time so that the float copy stays small. Returns the input itself when no resize is
    needed.
    """
    n, h, w, c = images.shape
    out_h, out_w = int(size[0]), int(size[1])
    if (h, w) == (out_h, out_w):
        return images
    out = np.empty((n, out_h, out_w, c), dtype=np.uint8)
    for start in range(0, n, chunk):
        block = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk]))
        x = block.permute(0, 3, 1, 2).float()  # [B, H, W, C] -> [B, C, H, W]
        y = F.interpolate(
            x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True
        )
        y = y.round_().clamp_(0, 255).to(torch.uint8)
        out[start : start + chunk] = y.permute(0, 2, 3, 1).numpy()  # [B,C,h,w] -> [B,h,w,C]
    return out


def resize_nearest(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., H, W] of any dtype -> [..., *size] by nearest neighbour.

    Source pixel ``floor(i * H / h)`` for output row ``i``: the rule of
    ``F.interpolate(mode="nearest")`` and of OpenCV's ``INTER_NEAREST`` (which the
    reference loaders use), computed in integers so it is exact and works on int64
    labels, which ``F.interpolate`` does not accept.
    """
    h_in, w_in = target.shape[-2:]
    h, w = size
    if (h_in, w_in) == (h, w):
        return target
    rows = torch.arange(h) * h_in // h
    cols = torch.arange(w) * w_in // w
    return target.index_select(-2, rows).index_select(-1, cols)


def fit_sample(sample: dict[str, torch.Tensor], size: tuple[int, int] | None) -> dict:
    """Resize a sample (``image`` bilinear, every target nearest) to ``size``; None = as is."""
    if size is None:
        return sample
    size = (int(size[0]), int(size[1]))
    return {
        key: resize_bilinear(value, size) if key == "image" else resize_nearest(value, size)
        for key, value in sample.items()
    }
