"""Image classification data for jaxprune, as numpy batches, with no TensorFlow needed.

`load_dataset(name, data_dir=...)` opens Fashion-MNIST (the default), MNIST,
CIFAR-10/100, ImageNet 2012 or a synthetic set from local files (IDX files or
tfds `array_record` datasets; nothing is downloaded). `train_batches` and
`eval_batches` turn it into uint8 batches (decoded, augmented) that are
deterministic in (seed, step), resumable at any step, and sliced per process for
multi-host data parallelism; they run as grain pipelines, optionally in worker
processes. `normalize` makes the model's float32 input of them on the device.
"""

from jaxprune.data.augment import Augmentation, InceptionCropFlip, PadCropFlip
from jaxprune.data.datasets import (
    SYSTEM_FASHION_MNIST_DIR,
    ArrayExamples,
    Dataset,
    DatasetName,
    Examples,
    SourceExamples,
    Split,
    SyntheticOptions,
    load_dataset,
    parse_dataset_name,
    synthetic_dataset,
)
from jaxprune.data.idx import read_idx
from jaxprune.data.normalize import normalize
from jaxprune.data.pipeline import (
    EvalBatch,
    TrainBatch,
    default_num_workers,
    eval_batch,
    eval_batches,
    num_eval_batches,
    steps_per_epoch,
    train_batch,
    train_batches,
)

__all__ = [
    "SYSTEM_FASHION_MNIST_DIR",
    "ArrayExamples",
    "Augmentation",
    "Dataset",
    "DatasetName",
    "EvalBatch",
    "Examples",
    "InceptionCropFlip",
    "PadCropFlip",
    "SourceExamples",
    "Split",
    "SyntheticOptions",
    "TrainBatch",
    "default_num_workers",
    "eval_batch",
    "eval_batches",
    "load_dataset",
    "normalize",
    "num_eval_batches",
    "parse_dataset_name",
    "read_idx",
    "steps_per_epoch",
    "synthetic_dataset",
    "train_batch",
    "train_batches",
]
