"""Training a restored network to the end of its run: steps, checkpoints, logs, evaluation."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import jax

from jaxprune import checkpoint
from jaxprune.graph import Architecture
from jaxprune.pipeline.config import METRICS_FILE, Phase
from jaxprune.pipeline.console import say
from jaxprune.pipeline.evaluation import evaluator, held_out_batches
from jaxprune.pipeline.inputs import global_batches, run_length
from jaxprune.pipeline.loading import Loaded, restore
from jaxprune.train import loop, parallel
from jaxprune.train.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxprune.train.step import StepOptions, TrainState, make_train_step


@functools.lru_cache(maxsize=4)
def train_step_for(
    arch: Architecture,
    optimizer: OptimizerConfig,
    total_steps: int,
    mesh: jax.sharding.Mesh,
    options: StepOptions,
):
    """The jitted train step of a run, shared by the runs of this process with the same values.

    A run resumed in the same process (or split in two) reuses the compiled step.
    """
    tx = make_optimizer(optimizer)
    return make_train_step(arch, tx, make_schedule(optimizer, total_steps), mesh, options)


def last_good_checkpoint(workdir: str | os.PathLike, loaded: Loaded) -> str:
    """Names the newest checkpoint of ``workdir`` that verifies and evaluates to a finite loss.

    A checkpoint's parameters can be finite while its evaluation is not (BatchNorm statistics,
    logits that overflow), so each is evaluated, newest first, until one is finite.
    """
    for step in reversed(checkpoint.steps(workdir)):
        try:
            arch, state = restore(workdir, step, checkpoint.read_meta(workdir, step), loaded.mesh)
        except checkpoint.CheckpointError:
            continue
        result = evaluator(arch, loaded.dataset, loaded.mesh, loaded.config)(state)
        if math.isfinite(result["loss"]):
            return (
                f"training stopped, the last good checkpoint is step {step} (the newest whose "
                f"test loss is finite: {result['loss']:.4g})"
            )
    if not checkpoint.steps(workdir):
        return f"training stopped, no checkpoint was written in {workdir}"
    return f"training stopped; no checkpoint in {workdir} evaluates to a finite test loss"


def run(
    phase: Phase,
    workdir: Path,
    loaded: Loaded,
    *,
    meta_extra: dict | None = None,
    stop_at: int | None,
    progress: bool | None,
    verbose: bool,
) -> dict:
    """Trains ``loaded.state`` to the end of the run of ``loaded.config``; returns the final eval.

    Checkpoints go to ``workdir``; their meta records ``phase`` and the fields of ``meta_extra``.
    """
    config, dataset, mesh = loaded.config, loaded.dataset, loaded.mesh
    arch, state = loaded.arch, loaded.state
    total_steps, per_epoch = run_length(config, dataset)
    options = StepOptions(
        config.label_smoothing, config.compute_dtype, accumulator=config.accumulator
    )
    train_step = train_step_for(arch, config.optimizer, total_steps, mesh, options)
    log = loop.MetricsLog(workdir / METRICS_FILE, enabled=parallel.is_primary())
    meta = {
        "arch": arch.to_dict(),
        "config": config.to_dict(),
        "phase": phase.value,
        "num_devices": mesh.size,
        **(meta_extra or {}),
    }
    start_step = int(jax.device_get(state.step))
    if start_step >= total_steps:
        say(verbose, f"{workdir}: the run is complete at step {start_step}; evaluating")
        return {"step": start_step, **evaluator(arch, dataset, mesh, config)(state)}
    workdir.mkdir(parents=True, exist_ok=True)
    batches = global_batches(dataset, mesh, config, start_step)
    # One pass per evaluation from the same data workers, which start at the first one.
    eval_passes = held_out_batches(dataset, config, num_passes=None)
    evaluate = evaluator(arch, dataset, mesh, config, eval_passes)
    loop_options = loop.LoopOptions(
        end_step=total_steps,
        steps_per_epoch=per_epoch,
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        stop_at=stop_at,
        num_devices=mesh.size,
        progress=progress,
        verbose=verbose,
    )
    last_eval: dict = {}

    def evaluate_and_keep(state: TrainState) -> dict[str, float]:
        result = evaluate(state)
        last_eval.update(result, step=int(jax.device_get(state.step)))
        return result

    with checkpoint.Writer(workdir, max_to_keep=config.keep_checkpoints) as writer:

        def save(state: TrainState) -> None:
            writer.save(int(jax.device_get(state.step)), state, meta)

        try:
            state = loop.train_loop(
                state,
                train_step,
                batches,
                loop_options,
                log=log,
                save=save,
                evaluate=evaluate_and_keep,
            )
        except loop.TrainingDiverged as e:
            # The loop knows which steps were finite; which checkpoint is good needs evaluating.
            raise loop.TrainingDiverged(e.reason, last_good_checkpoint(workdir, loaded)) from None
        finally:
            batches.close()
            eval_passes.close()
    step = int(jax.device_get(state.step))
    result = {"step": step, "num_devices": mesh.size}
    if last_eval.get("step") == step:
        result.update(accuracy=last_eval["accuracy"], loss=last_eval["loss"])
    return result
