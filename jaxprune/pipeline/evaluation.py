"""Evaluating a network on the test split of its run's data."""

from __future__ import annotations

import functools

import jax

from jaxprune import data
from jaxprune.graph import Architecture
from jaxprune.pipeline.config import TrainConfig
from jaxprune.pipeline.inputs import data_workers
from jaxprune.train import loop, parallel
from jaxprune.train.step import TrainState, make_eval_step

eval_step_for = functools.lru_cache(maxsize=4)(make_eval_step)


def evaluator(arch: Architecture, dataset: data.Dataset, mesh, config: TrainConfig):
    """state or variables -> {"accuracy", "loss"} on the test split (every example, once)."""
    eval_step = eval_step_for(arch, mesh, config.compute_dtype)

    def evaluate(state_or_variables: TrainState | dict) -> dict[str, float]:
        variables = getattr(state_or_variables, "variables", state_or_variables)
        batches = data.eval_batches(
            dataset,
            global_batch_size=config.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_workers=data_workers(config, dataset),
        )
        totals = []
        for images, labels, mask in loop.prefetch(batches):
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
