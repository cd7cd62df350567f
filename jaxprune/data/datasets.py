"""Datasets by name: what they hold and where their examples come from.

`load_dataset` returns a `Dataset`: its classes, input shape, per-split sizes,
normalization constants, augmentation, and random-access examples per split.
MNIST-like and CIFAR splits are held in memory as uint8; ImageNet stays on disk
and is decoded one example at a time. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxprune.data import tfds_source
from jaxprune.data.augment import Augmentation, InceptionCropFlip, PadCropFlip
from jaxprune.data.idx import has_idx_files, load_idx_split

# Where the Debian package `dataset-fashion-mnist` installs the IDX files.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetName(enum.StrEnum):
    FASHION_MNIST = "fashion_mnist"
    MNIST = "mnist"
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    IMAGENET2012 = "imagenet2012"
    SYNTHETIC = "synthetic"


class Split(enum.StrEnum):
    """Training split and held-out split (ImageNet's held-out split is "validation")."""

    TRAIN = "train"
    TEST = "test"


def parse_dataset_name(name: str | DatasetName) -> DatasetName:
    """Validates a dataset name.

    Raises:
      ValueError: For an unknown name; the message lists the valid names.
    """
    try:
        return DatasetName(name)
    except ValueError:
        valid = ", ".join(member.value for member in DatasetName)
        raise ValueError(f"Unknown dataset {name!r}; valid names are: {valid}.") from None


class Examples(Protocol):
    """Random access to the examples of one split."""

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """Returns images (uint8[n, H, W, C] or n arrays uint8[h, w, C]) and labels int32[n]."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayExamples:
    """A split held in memory: images uint8[N, H, W, C], labels int32[N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


@dataclasses.dataclass(frozen=True, eq=False)
class SourceExamples:
    """A split on disk behind a random-access tfds data source, decoded per read."""

    source: Sequence[Mapping[str, Any]]

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        examples = self.source.__getitems__([int(i) for i in indices])
        images = [np.asarray(example["image"], np.uint8) for example in examples]
        return images, np.array([example["label"] for example in examples], np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset ready for `train_batches` and `eval_batches`.

    Attributes:
      name: Which dataset.
      num_classes: Number of labels.
      input_shape: (H, W, C) of the images the model sees, after preprocessing.
      mean: C per-channel means of pixels scaled to [0, 1].
      std: C per-channel standard deviations of pixels scaled to [0, 1].
      augmentation: Training augmentation (also fixes the eval transform).
      splits: Examples of each split.
    """

    name: DatasetName
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: Augmentation
    splits: Mapping[Split, Examples]

    @property
    def num_examples(self) -> dict[Split, int]:
        return {split: len(examples) for split, examples in self.splits.items()}


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
    """Shape and size of the `synthetic` dataset.

    Each image is a fixed random template of its class blended half-and-half
    with noise, so a model can learn it in a smoke test.
    """

    image_shape: tuple[int, int, int] = (32, 32, 3)
    num_classes: int = 10
    num_train: int = 512
    num_test: int = 128
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class _Spec:
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: Augmentation
    in_memory: bool = True
    tfds_test_split: str = "test"
    reads_idx: bool = False


_SPECS: dict[DatasetName, _Spec] = {
    # Flips would turn digits into non-digits; clothing is left-right symmetric.
    DatasetName.MNIST: _Spec(10, (0.1307,), (0.3081,), PadCropFlip(2, flip=False), reads_idx=True),
    DatasetName.FASHION_MNIST: _Spec(
        10, (0.2860,), (0.3530,), PadCropFlip(2, flip=True), reads_idx=True
    ),
    DatasetName.CIFAR10: _Spec(
        10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), PadCropFlip(4, flip=True)
    ),
    DatasetName.CIFAR100: _Spec(
        100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), PadCropFlip(4, flip=True)
    ),
    DatasetName.IMAGENET2012: _Spec(
        1000,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        InceptionCropFlip(),
        in_memory=False,
        tfds_test_split="validation",
    ),
}


def synthetic_dataset(options: SyntheticOptions) -> Dataset:
    """Deterministic random images and labels, a pure function of `options`."""
    rng = np.random.default_rng(options.seed)
    templates = rng.integers(0, 256, (options.num_classes, *options.image_shape), np.uint8)

    def make_split(size: int) -> ArrayExamples:
        labels = rng.integers(0, options.num_classes, size).astype(np.int32)
        noise = rng.integers(0, 256, (size, *options.image_shape), np.uint8)
        images = templates[labels] // 2 + noise // 2
        return ArrayExamples(images, labels)

    splits = {Split.TRAIN: make_split(options.num_train), Split.TEST: make_split(options.num_test)}
    pixels = splits[Split.TRAIN].images.reshape(-1, options.image_shape[-1]) / 255.0
    return Dataset(
        name=DatasetName.SYNTHETIC,
        num_classes=options.num_classes,
        input_shape=options.image_shape,
        mean=tuple(pixels.mean(axis=0).tolist()),
        std=tuple(pixels.std(axis=0).tolist()),
        augmentation=PadCropFlip(options.image_shape[0] // 8, flip=True),
        splits=splits,
    )


def _missing_data_error(name: DatasetName, looked: Sequence[str]) -> FileNotFoundError:
    get = (
        "install it with `apt-get install dataset-fashion-mnist`, or pass --data-dir with "
        if name is DatasetName.FASHION_MNIST
        else "pass --data-dir with "
    )
    idx = "MNIST-format IDX .gz files or " if _SPECS[name].reads_idx else ""
    return FileNotFoundError(
        f"No {name.value} data found (looked for {' and for '.join(looked)}); {get}{idx}"
        f"a prepared tfds directory (`tfds build {name.value} --file_format=array_record "
        "--data_dir=DIR` on a machine with network; nothing is downloaded at run time)."
    )


def _tfds_splits(
    name: DatasetName, data_dir: str | os.PathLike | None, looked: Sequence[str]
) -> dict[Split, Examples]:
    """Opens both splits of a prepared tfds dataset; `looked` is for the missing-data error."""
    spec = _SPECS[name]
    builder = tfds_source.tfds_builder(name.value, data_dir)
    if not builder.is_prepared():
        raise _missing_data_error(name, [*looked, f"a prepared tfds dataset in {builder.data_dir}"])
    tfds_splits = {Split.TRAIN: "train", Split.TEST: spec.tfds_test_split}
    if spec.in_memory:
        return {
            split: ArrayExamples(*tfds_source.read_split_arrays(builder, tfds_split))
            for split, tfds_split in tfds_splits.items()
        }
    return {
        split: SourceExamples(tfds_source.split_source(builder, tfds_split))
        for split, tfds_split in tfds_splits.items()
    }


def _check_in_memory(
    splits: Mapping[Split, Examples], num_classes: int, source: str | os.PathLike | None
) -> None:
    """Refuses in-memory splits with images other than uint8[N, H, W, C] of one shape, or labels
    outside [0, num_classes), naming where they came from."""
    arrays = {s: e for s, e in splits.items() if isinstance(e, ArrayExamples)}
    train_shape = arrays[Split.TRAIN].images.shape[1:] if Split.TRAIN in arrays else None
    for split, examples in arrays.items():
        images, labels = examples.images, examples.labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != train_shape:
            raise ValueError(
                f"the {split.value} images in {source} are {images.dtype}{list(images.shape)}; "
                f"expected uint8[N, H, W, C] with the training images' H, W, C"
            )
        if labels.size and not (0 <= labels.min() and labels.max() < num_classes):
            raise ValueError(
                f"the {split.value} labels in {source} lie outside [0, {num_classes}) "
                f"(from {labels.min()} to {labels.max()})"
            )


def load_dataset(
    name: str | DatasetName = DatasetName.FASHION_MNIST,
    *,
    data_dir: str | os.PathLike | None = None,
    synthetic: SyntheticOptions | None = None,
) -> Dataset:
    """Opens a dataset by name, from local files only.

    MNIST and Fashion-MNIST are read from IDX files when `data_dir` holds them
    (Fashion-MNIST also from /usr/share/datasets/fashion-mnist when `data_dir`
    is None); otherwise every dataset is read as a prepared tfds dataset under
    `data_dir` (tfds's default folder if None).

    Args:
      name: One of `DatasetName`.
      data_dir: Folder with IDX files, or a tfds data directory.
      synthetic: Options for `synthetic` (defaults if None); ignored otherwise.

    Returns:
      The dataset.

    Raises:
      ValueError: For an unknown name.
      FileNotFoundError: If no data is found; says where it looked and how to get it.
      RuntimeError: If the prepared files need TensorFlow or lack random access.
    """
    name = parse_dataset_name(name)
    if name is DatasetName.SYNTHETIC:
        return synthetic_dataset(synthetic or SyntheticOptions())
    spec = _SPECS[name]
    looked = []
    idx_dir = Path(data_dir) if data_dir is not None else None
    if idx_dir is None and name is DatasetName.FASHION_MNIST:
        idx_dir = SYSTEM_FASHION_MNIST_DIR
    if spec.reads_idx and idx_dir is not None and has_idx_files(idx_dir):
        splits = {
            split: ArrayExamples(*load_idx_split(idx_dir, split.value, spec.num_classes))
            for split in Split
        }
    else:
        if spec.reads_idx and idx_dir is not None:
            looked.append(f"IDX files in {idx_dir}")
        splits = _tfds_splits(name, data_dir, looked)
    _check_in_memory(splits, spec.num_classes, idx_dir if spec.reads_idx else data_dir)
    if isinstance(spec.augmentation, InceptionCropFlip):
        size = spec.augmentation.image_size
        input_shape = (size, size, 3)
    else:
        input_shape = splits[Split.TRAIN].images.shape[1:]
    return Dataset(
        name=name,
        num_classes=spec.num_classes,
        input_shape=tuple(input_shape),
        mean=spec.mean,
        std=spec.std,
        augmentation=spec.augmentation,
        splits=splits,
    )
