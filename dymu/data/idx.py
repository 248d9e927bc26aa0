"""Reader for the idx file format of MNIST and Fashion-MNIST (gzip-compressed or plain).

An idx file is a 4-byte big-endian magic number ``0x00 0x00 <type> <ndim>``, ``ndim``
big-endian uint32 dimension sizes, then the payload in C order. The original MNIST and
Fashion-MNIST files are ``0x0803`` (uint8 images [N, 28, 28]) and ``0x0801`` (uint8 labels
[N]). Every check names the file, because a truncated download is the usual failure and
the user needs to know which of the four files to fetch again.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from dymu.errors import UserError

IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""Type byte of the magic number -> element dtype (multi-byte types are big-endian)."""

LABELS_MAGIC = 0x0801
"""uint8, one dimension: a label file."""
IMAGES_MAGIC = 0x0803
"""uint8, three dimensions: an image file."""

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzip (detected by content, not suffix)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"missing file {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path} is a damaged gzip file ({exc}); fetch it again") from None


def read_idx(path: str | Path, *, magic: int | None = None) -> np.ndarray:
    """Read an idx file into an array of its declared shape, in native byte order.

    Args:
        path: ``.gz`` or plain idx file.
        magic: when given, the low 16 bits the magic number must have (``0x0801``
            labels, ``0x0803`` images), so a labels file passed as images is caught here.

    Returns:
        The array; read-only when the element type is one byte (a view on the file data).

    Raises:
        UserError: naming the file, when it is missing, not idx, of the wrong kind, or its
            payload length disagrees with its header (truncated or padded).
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4:
        raise UserError(f"{p} is not an idx file: {len(data)} bytes, shorter than the header")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in IDX_TYPES or ndim == 0:
        raise UserError(
            f"{p} is not an idx file: magic number 0x{int.from_bytes(data[:4], 'big'):08x}"
        )
    found = (type_code << 8) | ndim
    if magic is not None and found != magic:
        raise UserError(f"{p}: idx magic number 0x{found:04x}, expected 0x{magic:04x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{p}: truncated idx header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_TYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        shape = " x ".join(str(d) for d in dims)
        raise UserError(
            f"{p}: idx header declares {shape} ({expected} bytes of data) but the file holds "
            f"{len(data) - header}; the file is truncated or corrupt"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    return array


def read_idx_images(path: str | Path) -> np.ndarray:
    """uint8 images [N, H, W] from an ``*-images-idx3-ubyte[.gz]`` file."""
    return read_idx(path, magic=IMAGES_MAGIC)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """uint8 labels [N] from an ``*-labels-idx1-ubyte[.gz]`` file."""
    return read_idx(path, magic=LABELS_MAGIC)
