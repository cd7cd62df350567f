"""Batches for training and evaluation, as uint8 numpy arrays, multi-host aware, on grain.

A training batch is a pure function of (dataset, seed, step): the step fixes the
epoch and the position in that epoch's permutation, and each example's
augmentation is keyed by (seed, epoch, example index). Resuming at any step
therefore reproduces the batches exactly, and the global batch is the same for
any number of processes; process `p` of `P` yields rows
`[p * B / P, (p + 1) * B / P)` of each global batch of size `B`.

`train_batches` and `eval_batches` run that function as a grain pipeline: a
`grain.MapDataset` indexed by step (random access, no iterator state to save)
mapped through the `TrainBatch` / `EvalBatch` transformations, and with
`num_workers > 0` computed ahead in that many worker processes (grain's
`mp_prefetch`, which hands batches back through shared memory in step order).
The batches are the same for any number of workers.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
from collections.abc import Iterator
from multiprocessing import shared_memory

import grain
import numpy as np

from jaxprune.data.augment import (
    InceptionCropFlip,
    example_keys,
    inception_crop_flip,
    pad_crop_flip,
    resize_center_crop,
)
from jaxprune.data.datasets import ArrayExamples, Dataset, Split

# Batches each worker process computes ahead of the one being consumed.
_WORKER_BUFFER = 2
# Upper bound of the default worker count: more rarely helps a single host's decoding.
_MAX_DEFAULT_WORKERS = 8


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
    """Reads and transforms examples to uint8 model-sized images; augments iff `keys` is given."""
    images, labels = dataset.splits[split].read(indices)
    augmentation = dataset.augmentation
    if isinstance(augmentation, InceptionCropFlip):
        if keys is None:
            images = resize_center_crop(images, augmentation)
        else:
            images = inception_crop_flip(images, keys, augmentation)
    elif keys is not None:
        images = pad_crop_flip(images, keys, augmentation)
    return images, labels


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
      images uint8[global_batch_size / process_count, H, W, C] (decoded, cropped, flipped; the
      model's float32 input is `jaxprune.data.normalize` of them, on the device),
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


def eval_batch(
    dataset: Dataset,
    batch: int,
    *,
    global_batch_size: int,
    split: Split = Split.TEST,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This process's part of evaluation batch number `batch` of a split, in order.

    Rows past the end of the split are black (zero) images with label 0 and mask False.

    Returns:
      images uint8[b, H, W, C] (eval transform, no augmentation; not normalized),
      labels int32[b], mask bool[b], with b = global_batch_size / process_count.
    """
    rows = _local_rows(global_batch_size, process_index, process_count)
    num_examples = len(dataset.splits[split])
    positions = np.arange(rows.start, rows.stop) + batch * global_batch_size
    mask = positions < num_examples
    images = np.zeros((len(positions), *dataset.input_shape), np.uint8)
    labels = np.zeros(len(positions), np.int32)
    if mask.any():
        images[mask], labels[mask] = _images(dataset, split, positions[mask], keys=None)
    return images, labels, mask


@dataclasses.dataclass(frozen=True)
class TrainBatch(grain.transforms.Map):
    """Grain transformation: global step -> this process's training batch (`train_batch`)."""

    dataset: Dataset
    global_batch_size: int
    seed: int
    augment: bool = True
    process_index: int = 0
    process_count: int = 1

    def map(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return train_batch(
            self.dataset,
            step,
            global_batch_size=self.global_batch_size,
            seed=self.seed,
            augment=self.augment,
            process_index=self.process_index,
            process_count=self.process_count,
        )


@dataclasses.dataclass(frozen=True)
class EvalBatch(grain.transforms.Map):
    """Grain transformation: batch number -> this process's evaluation batch (`eval_batch`)."""

    dataset: Dataset
    global_batch_size: int
    split: Split = Split.TEST
    process_index: int = 0
    process_count: int = 1

    def map(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return eval_batch(
            self.dataset,
            batch,
            global_batch_size=self.global_batch_size,
            split=self.split,
            process_index=self.process_index,
            process_count=self.process_count,
        )


def default_num_workers(dataset: Dataset) -> int:
    """Worker processes worth starting for a dataset on this machine.

    0 when every split is held in memory (a batch is a few vectorised numpy
    operations; a worker would cost more to start than it saves), else
    min(usable CPU cores, 8) for splits decoded per read (JPEG).
    """
    if all(isinstance(examples, ArrayExamples) for examples in dataset.splits.values()):
        return 0
    return min(len(os.sched_getaffinity(0)), _MAX_DEFAULT_WORKERS)


def _check_num_workers(num_workers: int) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(
            f"The number of data workers must be an integer >= 0, got {num_workers!r}."
        )


def _ensure_absl_flags_parsed() -> None:
    """Lets grain read its absl flags in a program that never parsed any (then: defaults).

    grain 0.2.18 reads `--grain_enable_multiprocess_worker_profiling` when it
    starts workers, and absl refuses reads before parsing; absl programs
    (`app.run`) have parsed already and are left as they are.
    """
    from absl import flags  # A grain dependency.

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _run(indices: grain.MapDataset, transform: grain.transforms.Map, num_workers: int) -> Iterator:
    """transform(i) for i in `indices`, in order, computed by `num_workers` processes.

    With 0 workers everything runs in this thread, one element at a time. Worker
    `w` of `n` computes the elements `w`, `w + n`, ... of `indices`; grain
    interleaves them back into order.
    """
    dataset = indices.map(transform)
    # No reading threads: a whole batch is one element, and workers give the parallelism.
    steps = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if num_workers:
        _ensure_absl_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers, per_worker_buffer_size=_WORKER_BUFFER)
        steps = steps.mp_prefetch(options)
    iterator = iter(steps)
    try:
        for element in iterator:
            if num_workers:
                element = _out_of_shared_memory(element)
            yield element
    finally:
        # Stops the worker processes now rather than at garbage collection.
        getattr(iterator, "close", lambda: None)()
        if num_workers:
            # Batches that grain had read ahead sit in reference cycles; freeing them now unlinks
            # their shared memory.
            gc.collect()


def _out_of_shared_memory(batch: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """A worker's batch copied into this process's memory; its shared-memory segments are
    released now, as the arrays that mapped them go.

    A batch that stayed in shared memory would hold its segment as long as anything refers to it:
    an array on the CPU device can alias it, and a reference cycle can keep it to interpreter exit,
    when Python can no longer unlink it (the "leaked shared_memory objects" warning). The copy
    costs 4-6 CPU ms for a uint8 batch of 128 at 224x224 on a 2-core EPYC, under 2% of decoding
    the batch.
    """
    copies = tuple(np.array(array) for array in batch)
    for array in batch:
        _unlink_now(array)
    return copies


def _unlink_now(array: np.ndarray) -> None:
    """Removes the name of the shared-memory segment a worker's ``array`` maps, now.

    grain unlinks it when the array is deleted, from a background thread that a process can
    exit before running (the segment is then reported leaked at exit). The mapping itself stays
    valid until ``array`` goes; grain is told not to unlink it a second time. Arrays that map no
    segment (or a grain without that attribute) are left to grain.
    """
    segment = getattr(array, "shm", None)
    if isinstance(segment, shared_memory.SharedMemory) and getattr(array, "_unlink_on_del", False):
        segment.unlink()
        array._unlink_on_del = False


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
    num_workers: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Training batches from `start_step` on, over as many epochs as needed.

    Each epoch visits the train split in a fresh order and drops its last
    partial batch. Starting at step k yields exactly what skipping k batches
    would, without reading the skipped examples; any `num_workers` yields the
    same batches.

    Args:
      dataset: The dataset; reads its train split.
      global_batch_size: Batch size summed over processes.
      seed: Fixes the per-epoch order and the augmentation.
      start_step: First global step to yield (for resuming).
      num_steps: How many batches to yield; endless if None.
      augment: Apply the dataset's training augmentation.
      process_index: This process, in [0, process_count).
      process_count: Number of processes sharing each global batch.
      num_workers: Worker processes computing batches ahead (0: this thread).

    Yields:
      images uint8[global_batch_size / process_count, H, W, C] (decoded, cropped, flipped; the
      model's float32 input is `jaxprune.data.normalize` of them, on the device),
      labels int32[global_batch_size / process_count].

    Raises:
      ValueError: For a bad worker count or process split (before any batch).
    """
    _local_rows(global_batch_size, process_index, process_count)
    _check_num_workers(num_workers)
    transform = TrainBatch(dataset, global_batch_size, seed, augment, process_index, process_count)
    # "Endless": more steps than any run takes (grain needs a length).
    stop = start_step + num_steps if num_steps is not None else 2**62
    return _run(grain.MapDataset.range(start_step, stop), transform, num_workers)


def eval_batches(
    dataset: Dataset,
    *,
    global_batch_size: int,
    split: Split = Split.TEST,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    num_passes: int | None = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The whole split in order, in batches of fixed size with a validity mask.

    The last global batch is padded to `global_batch_size` with black images,
    label 0 and mask False, so every batch has one shape (one compilation) and
    splits evenly over processes. Weight per-example metrics by the mask.

    Args:
      dataset: The dataset.
      global_batch_size: Batch size summed over processes.
      split: Which split.
      process_index: This process, in [0, process_count).
      process_count: Number of processes sharing each global batch.
      num_workers: Worker processes computing batches ahead (0: this thread).
      num_passes: How many times over the split, one pass after the other (None: endlessly),
        from the same workers: a caller evaluating repeatedly starts them once and takes
        `num_eval_batches` batches per evaluation (then closes the iterator).

    Yields:
      images uint8[b, H, W, C] (eval transform, no augmentation; not normalized),
      labels int32[b], mask bool[b], with b = global_batch_size / process_count.

    Raises:
      ValueError: For a bad worker count or process split (before any batch).
    """
    _local_rows(global_batch_size, process_index, process_count)
    _check_num_workers(num_workers)
    transform = EvalBatch(dataset, global_batch_size, split, process_index, process_count)
    if num_passes is not None and (isinstance(num_passes, bool) or num_passes < 1):
        raise ValueError(f"num_passes must be None or an integer >= 1, got {num_passes!r}.")
    num_batches = num_eval_batches(len(dataset.splits[split]), global_batch_size)
    passes = grain.MapDataset.range(num_batches).repeat(num_passes)
    return _run(passes, transform, num_workers)
