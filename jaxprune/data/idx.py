"""Readers for MNIST-format IDX files (`train-images-idx3-ubyte.gz`, ...).

The format (LeCun et al. 1998, "Gradient-based learning applied to document
recognition") is two zero bytes, a dtype code, the number of dimensions, the
dimensions as big-endian uint32, then the values in C order.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# File-name prefix of each split; values are the split names used in jaxprune.data.
IDX_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file, gzip-compressed if its name ends in `.gz`.

    Args:
      path: The file.

    Returns:
      The array with the file's dtype and shape, e.g. uint8[60000, 28, 28].

    Raises:
      ValueError: If the file is not a well-formed IDX file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is not a complete gzip file ({e}).") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number).")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header_bytes = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_bytes])
    expected_bytes = header_bytes + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected_bytes:
        raise ValueError(
            f"{path} holds {len(data)} bytes but its header {shape} needs {expected_bytes}."
        )
    return np.frombuffer(data, dtype, offset=header_bytes).reshape(shape)


def _idx_path(directory: Path, prefix: str, kind: str, ndim: int) -> Path | None:
    """The `.gz` or uncompressed IDX file `{prefix}-{kind}-idx{ndim}-ubyte`, if present."""
    stem = f"{prefix}-{kind}-idx{ndim}-ubyte"
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def has_idx_files(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds the four MNIST-format files (train and t10k)."""
    directory = Path(directory)
    return all(
        _idx_path(directory, prefix, kind, ndim) is not None
        for prefix in IDX_SPLIT_PREFIXES.values()
        for kind, ndim in (("images", 3), ("labels", 1))
    )


def load_idx_split(
    directory: str | os.PathLike, split: str, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of an MNIST-format directory into memory.

    Args:
      directory: Folder with the IDX files.
      split: "train" or "test" (read from the `t10k-*` files).
      num_classes: If given, labels outside [0, num_classes) are refused.

    Returns:
      images uint8[N, H, W, 1] and labels int32[N].

    Raises:
      FileNotFoundError: If a file of the split is missing.
      ValueError: If the files are malformed, disagree on N, or a label is out of range.
    """
    directory, prefix = Path(directory), IDX_SPLIT_PREFIXES[split]
    images_path = _idx_path(directory, prefix, "images", 3)
    labels_path = _idx_path(directory, prefix, "labels", 1)
    if images_path is None or labels_path is None:
        raise FileNotFoundError(f"No {prefix}-images/labels IDX files in {directory}.")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"IDX files in {directory} disagree: images {images.shape} {images.dtype}, "
            f"labels {labels.shape}."
        )
    if (
        num_classes is not None
        and labels.size
        and not (0 <= labels.min() and labels.max() < num_classes)
    ):
        bad = int(np.count_nonzero((labels < 0) | (labels >= num_classes)))
        raise ValueError(
            f"{labels_path} holds {bad} labels outside [0, {num_classes}) (e.g. "
            f"{int(labels[(labels < 0) | (labels >= num_classes)][0])})."
        )
    return images[..., None], labels.astype(np.int32)
