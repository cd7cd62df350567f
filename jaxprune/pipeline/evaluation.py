"""Evaluating a network on the test split of its run's data."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import jax

from jaxprune import data
from jaxprune.graph import Architecture
from jaxprune.pipeline.config import TrainConfig
from jaxprune.pipeline.inputs import data_workers
from jaxprune.train import loop, parallel
from jaxprune.train.step import TrainState, make_eval_step

eval_step_for = functools.lru_cache(maxsize=4)(make_eval_step)


def held_out_batches(
    dataset: data.Dataset, config: TrainConfig, num_passes: int | None = 1
) -> Iterator:
    """This process's batches of the test split, ``num_passes`` times over (None: endlessly)."""
    return loop.prefetch(
        data.eval_batches(
            dataset,
            global_batch_size=config.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_workers=data_workers(config, dataset),
            num_passes=num_passes,
        )
    )


def evaluator(
    arch: Architecture,
    dataset: data.Dataset,
    mesh,
    config: TrainConfig,
    passes: Iterator | None = None,
):
    """state or variables -> {"accuracy", "loss"} on the test split (every example, once).

    ``passes``: ``held_out_batches(..., num_passes=None)``, from which each evaluation takes one
    pass (its data workers start once, for all of them; the caller closes it); None: a new pass
    per evaluation.
    """
    eval_step = eval_step_for(arch, mesh, config.compute_dtype)
    num_batches = data.num_eval_batches(dataset.num_examples[data.Split.TEST], config.batch_size)

    def evaluate(state_or_variables: TrainState | dict) -> dict[str, float]:
        variables = getattr(state_or_variables, "variables", state_or_variables)
        if passes is None:
            batches = held_out_batches(dataset, config)
        else:
            batches = itertools.islice(passes, num_batches)
        totals = []
        for images, labels, mask in batches:
            images, labels, mask = parallel.global_batch(mesh, images, labels, mask)
            images = data.normalize(images, dataset.mean, dataset.std)
            totals.append(eval_step(variables, images, labels, mask))
        totals = jax.device_get(totals)
        count = sum(float(t["count"]) for t in totals)
        return {
            "accuracy": sum(float(t["correct"]) for t in totals) / count,
            "loss": sum(float(t["loss_sum"]) for t in totals) / count,
        }

    return evaluate
