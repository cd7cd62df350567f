"""Reading datasets prepared by tensorflow-datasets, without TensorFlow where possible.

Datasets prepared with `file_format="array_record"` are read through
`builder.as_data_source`, which gives random access to numpy examples and needs
no TensorFlow. Nothing is ever downloaded or prepared here: a dataset must
already be prepared under the data directory (e.g. with
`tfds build cifar10 --file_format=array_record --data_dir=DIR`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Examples decoded per call when loading a whole split into memory.
_READ_CHUNK = 1024


def tfds_builder(name: str, data_dir: str | os.PathLike | None) -> Any:
    """The tfds builder of `name` reading from `data_dir` (tfds's default dir if None).

    Check `builder.is_prepared()` before reading; `builder.data_dir` is the
    folder where the prepared files are expected.
    """
    import tensorflow_datasets as tfds  # Slow import, only needed here.

    return tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))


def _random_access(builder: Any) -> bool:
    from tensorflow_datasets.core import file_adapters

    formats = builder.info.available_file_formats() or {builder.info.file_format}
    return bool(set(formats) & file_adapters.FileFormat.with_random_access())


def _format_error(builder: Any, *, tensorflow_helps: bool) -> RuntimeError:
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    how = (
        "install tensorflow-cpu, or re-prepare it with file_format='array_record'"
        if tensorflow_helps
        else "re-prepare it with file_format='array_record' (random access is needed)"
    )
    return RuntimeError(
        f"The tfds dataset '{builder.name}' at {builder.data_dir} is stored as "
        f"{file_format}, which this loader cannot read here; {how}, e.g. "
        f"`tfds build {builder.name} --file_format=array_record --data_dir=DIR`."
    )


def _stack_examples(examples: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([np.asarray(example["image"], np.uint8) for example in examples])
    labels = np.array([example["label"] for example in examples], np.int32)
    return images, labels


def read_split_arrays(builder: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a whole split of fixed-size images into memory.

    Args:
      builder: A prepared builder from `tfds_builder`.
      split: tfds split name, e.g. "train".

    Returns:
      images uint8[N, H, W, C] and labels int32[N].

    Raises:
      RuntimeError: If the files need TensorFlow and it is not installed.
    """
    if _random_access(builder):
        source = builder.as_data_source(split)
        parts = [
            _stack_examples(
                source.__getitems__(range(start, min(start + _READ_CHUNK, len(source))))
            )
            for start in range(0, len(source), _READ_CHUNK)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if importlib.util.find_spec("tensorflow") is None:
        raise _format_error(builder, tensorflow_helps=True)
    import tensorflow_datasets as tfds

    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return np.asarray(arrays["image"], np.uint8), np.asarray(arrays["label"], np.int32)


def split_source(builder: Any, split: str) -> Sequence[Mapping[str, Any]]:
    """Random-access source of a split, decoding one example per read.

    Args:
      builder: A prepared builder from `tfds_builder`.
      split: tfds split name, e.g. "validation".

    Returns:
      A sequence (`len`, `__getitem__`, `__getitems__`) of dicts with "image"
      uint8[h, w, C] and "label" int.

    Raises:
      RuntimeError: If the files give no random access (tfrecord).
    """
    if not _random_access(builder):
        raise _format_error(builder, tensorflow_helps=False)
    return builder.as_data_source(split)


def num_classes(builder: Any) -> int:
    """Number of classes of the builder's "label" feature."""
    return int(builder.info.features["label"].num_classes)
