"""Batches for training and evaluation, as numpy arrays, multi-host aware.

A training batch is a pure function of (dataset, seed, step): the step fixes the
epoch and the position in that epoch's permutation, and each example's
augmentation is keyed by (seed, epoch, example index). Resuming at any step
therefore reproduces the batches exactly, and the global batch is the same for
any number of processes; process `p` of `P` yields rows
`[p * B / P, (p + 1) * B / P)` of each global batch of size `B`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from jaxprune.data.augment import (
    InceptionCropFlip,
    example_keys,
    inception_crop_flip,
    normalize,
    pad_crop_flip,
    resize_center_crop,
)
from jaxprune.data.datasets import Dataset, Split


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Training steps per epoch; the last partial batch is dropped."""
    return num_examples // global_batch_size


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Evaluation batches covering a split; the last one is padded."""
    return -(-num_examples // global_batch_size)


def _local_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """Rows of a global batch that belong to one process."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"Bad process_index={process_index} for process_count={process_count}.")
    if global_batch_size % process_count:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by "
            f"process_count={process_count}."
        )
    local = global_batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed % 2**64, epoch]).permutation(num_examples)
    order.setflags(write=False)
    return order


def _images(dataset: Dataset, split: Split, indices: np.ndarray, keys: np.ndarray | None):
    """Reads, transforms and normalizes examples; augments iff `keys` is given."""
    images, labels = dataset.splits[split].read(indices)
    augmentation = dataset.augmentation
    if isinstance(augmentation, InceptionCropFlip):
        if keys is None:
            images = resize_center_crop(images, augmentation)
        else:
            images = inception_crop_flip(images, keys, augmentation)
    elif keys is not None:
        images = pad_crop_flip(images, keys, augmentation)
    return normalize(images, dataset.mean, dataset.std), labels


def train_batch(
    dataset: Dataset,
    step: int,
    *,
    global_batch_size: int,
    seed: int,
    augment: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """This process's part of the training batch at global step `step`.

    Args:
      dataset: The dataset; reads its train split.
      step: Global step, counted from 0 over all epochs.
      global_batch_size: Batch size summed over processes.
      seed: Fixes the per-epoch order and the augmentation.
      augment: Apply the dataset's training augmentation.
      process_index: This process, in [0, process_count).
      process_count: Number of processes sharing each global batch.

    Returns:
      images f32[global_batch_size / process_count, H, W, C] normalized,
      labels int32[global_batch_size / process_count].

    Raises:
      ValueError: If the batch does not split evenly over processes or is larger
        than the split.
    """
    rows = _local_rows(global_batch_size, process_index, process_count)
    num_examples = len(dataset.splits[Split.TRAIN])
    num_steps = steps_per_epoch(num_examples, global_batch_size)
    if num_steps == 0:
        raise ValueError(f"Global batch size {global_batch_size} > {num_examples} examples.")
    epoch, position = divmod(step, num_steps)
    start = position * global_batch_size
    indices = _epoch_permutation(num_examples, seed, epoch)[start : start + global_batch_size]
    indices = indices[rows]
    keys = example_keys(seed, epoch, indices) if augment else None
    return _images(dataset, Split.TRAIN, indices, keys)


def train_batches(
    dataset: Dataset,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    augment: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Training batches from `start_step` on, over as many epochs as needed.

    Each epoch visits the train split in a fresh order and drops its last
    partial batch. Starting at step k yields exactly what skipping k batches
    would, without reading the skipped examples.

    Args:
      dataset: The dataset; reads its train split.
      global_batch_size: Batch size summed over processes.
      seed: Fixes the per-epoch order and the augmentation.
      start_step: First global step to yield (for resuming).
      num_steps: How many batches to yield; endless if None.
      augment: Apply the dataset's training augmentation.
      process_index: This process, in [0, process_count).
      process_count: Number of processes sharing each global batch.

    Yields:
      images f32[global_batch_size / process_count, H, W, C] normalized,
      labels int32[global_batch_size / process_count].
    """
    _local_rows(global_batch_size, process_index, process_count)  # Fail before the first batch.
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        yield train_batch(
            dataset,
            step,
            global_batch_size=global_batch_size,
            seed=seed,
            augment=augment,
            process_index=process_index,
            process_count=process_count,
        )
        step += 1


def eval_batches(
    dataset: Dataset,
    *,
    global_batch_size: int,
    split: Split = Split.TEST,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The whole split in order, in batches of fixed size with a validity mask.

    The last global batch is padded to `global_batch_size` with zero images,
    label 0 and mask False, so every batch has one shape (one compilation) and
    splits evenly over processes. Weight per-example metrics by the mask.

    Args:
      dataset: The dataset.
      global_batch_size: Batch size summed over processes.
      split: Which split.
      process_index: This process, in [0, process_count).
      process_count: Number of processes sharing each global batch.

    Yields:
      images f32[b, H, W, C] normalized (eval transform, no augmentation),
      labels int32[b], mask bool[b], with b = global_batch_size / process_count.
    """
    rows = _local_rows(global_batch_size, process_index, process_count)
    num_examples = len(dataset.splits[split])
    for batch in range(num_eval_batches(num_examples, global_batch_size)):
        positions = np.arange(rows.start, rows.stop) + batch * global_batch_size
        mask = positions < num_examples
        images = np.zeros((len(positions), *dataset.input_shape), np.float32)
        labels = np.zeros(len(positions), np.int32)
        if mask.any():
            images[mask], labels[mask] = _images(dataset, split, positions[mask], keys=None)
        yield images, labels, mask
