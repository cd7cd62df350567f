"""The data a run reads and the mesh it runs on: the dataset, run length and global batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

from jaxprune import data
from jaxprune.graph import Architecture
from jaxprune.pipeline.config import TrainConfig, UserError
from jaxprune.train import loop, parallel


def load_dataset(config: TrainConfig) -> data.Dataset:
    try:
        return data.load_dataset(config.data, data_dir=config.data_dir, synthetic=config.synthetic)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise UserError(str(e)) from None


def check_input_shape(arch: Architecture) -> None:
    """Refuses images too small (or otherwise unfit) for ``arch``, before anything is computed."""
    x = jax.ShapeDtypeStruct((1, *arch.input_shape), jnp.float32)
    try:
        jax.eval_shape(lambda x: arch.module().init(jax.random.key(0), x, train=False), x)
    except Exception as e:  # noqa: BLE001 - any failure to trace the model means the shape is unfit.
        h, w, c = arch.input_shape
        raise UserError(
            f"{arch.name} cannot take {h}x{w}x{c} images ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); use larger images"
        ) from None


def data_workers(config: TrainConfig, dataset: data.Dataset) -> int:
    """Worker processes of the data pipeline: ``config.data_workers`` or the dataset's default."""
    if config.data_workers is None:
        return data.default_num_workers(dataset)
    return config.data_workers


def run_length(config: TrainConfig, dataset: data.Dataset) -> tuple[int, int]:
    """(steps of the whole run, steps per epoch); refuses a batch larger than the data."""
    num_train = dataset.num_examples[data.Split.TRAIN]
    per_epoch = data.steps_per_epoch(num_train, config.batch_size)
    if per_epoch == 0:
        raise UserError(f"batch_size {config.batch_size} exceeds the {num_train} training examples")
    if config.num_steps is not None:
        return config.num_steps, per_epoch
    return config.num_epochs * per_epoch, per_epoch


def data_mesh(devices: Sequence[jax.Device] | None, batch_size: int) -> jax.sharding.Mesh:
    mesh = parallel.make_mesh(devices)
    parallel.check_batch_size(mesh, batch_size)
    return mesh


def global_batches(dataset, mesh, config: TrainConfig, start_step: int) -> Iterator:
    # Ends with the run, so that data workers finish rather than being stopped mid-batch.
    total_steps, _ = run_length(config, dataset)
    local = data.train_batches(
        dataset,
        global_batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
        num_steps=total_steps - start_step,
        augment=config.augment,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=data_workers(config, dataset),
    )
    for images, labels in loop.prefetch(local):
        images, labels = parallel.global_batch(mesh, images, labels)
        yield data.normalize(images, dataset.mean, dataset.std), labels
