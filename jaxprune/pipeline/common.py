"""What the pipeline's commands share: data, mesh, restoring a workdir, and running the loop."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune import checkpoint, data, models
from jaxprune import workdir as workdirs
from jaxprune.graph import Architecture
from jaxprune.pipeline.config import METRICS_FILE, Phase, TrainConfig, UserError
from jaxprune.train import loop, parallel
from jaxprune.train.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxprune.train.step import (
    StepOptions,
    TrainState,
    abstract_train_state,
    from_legacy,
    legacy_target,
    make_eval_step,
    make_train_step,
)


def load_dataset(config: TrainConfig) -> data.Dataset:
    try:
        return data.load_dataset(config.data, data_dir=config.data_dir, synthetic=config.synthetic)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise UserError(str(e)) from None


def owns_workdir(argument: str, *, new: bool = False) -> Callable:
    """Decorator: the call holds the lock of the workdir passed as ``argument`` (see
    `jaxprune.workdir.owned`); a second writer of that workdir is refused before any work.

    ``new``: the workdir must not hold checkpoints, nor be a non-empty folder jaxprune did not
    write (`prune`'s ``out``).
    """

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            path = signature.bind(*args, **kwargs).arguments[argument]
            with workdirs.owned(path, new=new, primary=parallel.is_primary()):
                return function(*args, **kwargs)

        return locked

    return decorate


def warn(message: str) -> None:
    """One line on stderr (process 0): something failed that the result does not depend on."""
    if parallel.is_primary():
        print(f"jaxprune: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


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


def say(verbose: bool, *args: Any) -> None:
    if verbose and parallel.is_primary():
        print(*args, flush=True)


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
            totals.append(eval_step(variables, *parallel.global_batch(mesh, images, labels, mask)))
        totals = jax.device_get(totals)
        count = sum(float(t["count"]) for t in totals)
        return {
            "accuracy": sum(float(t["correct"]) for t in totals) / count,
            "loss": sum(float(t["loss_sum"]) for t in totals) / count,
        }

    return evaluate


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
        yield parallel.global_batch(mesh, images, labels)


def pick_step(workdir: str | os.PathLike, restore_step: int | None) -> int | None:
    """The step to continue from: the latest, or the one asked for (which must exist).

    While another process writes ``workdir``, its newest step may be committed by orbax but not
    yet have its checksum manifest; a reader then takes the newest step that has one.
    """
    found = checkpoint.steps(workdir)
    if restore_step is None:
        if found and not checkpoint.has_manifest(workdir, found[-1]):
            writer = workdirs.writer_pid(workdir)
            if writer is not None and writer != os.getpid():
                found = [s for s in found if checkpoint.has_manifest(workdir, s)] or found
        return found[-1] if found else None
    if restore_step not in found:
        raise UserError(
            f"no checkpoint at step {restore_step} in {checkpoint.checkpoint_root(workdir)}; "
            f"steps there: {found or 'none'}"
        )
    return restore_step


def read_meta(workdir: str | os.PathLike, step: int) -> dict:
    """`checkpoint.read_meta`, with a hint at the older steps when the checkpoint is refused."""
    try:
        return checkpoint.read_meta(workdir, step)
    except checkpoint.CheckpointError as e:
        older = [s for s in checkpoint.steps(workdir) if s < step]
        if not older:
            raise
        # Only a step that itself verifies is suggested (the newest such).
        good = next((s for s in reversed(older) if checkpoint.verifies(workdir, s)), None)
        if good is None:
            raise checkpoint.CheckpointError(
                f"{e}; nothing was changed (no older step verifies either)"
            ) from None
        raise checkpoint.CheckpointError(
            f"{e}; nothing was changed (the newest older step that verifies may be chosen "
            f"explicitly with restore_step: {good})"
        ) from None


def open_checkpoint(
    workdir: str | os.PathLike, restore_step: int | None, data_dir: str | None = None
) -> tuple[int, dict, TrainConfig]:
    """(step, meta, config) of a workdir's checkpoint (latest unless ``restore_step``).

    Refuses a workdir with no checkpoint. ``data_dir``, when given, replaces the saved one (the
    data moved).
    """
    step = pick_step(workdir, restore_step)
    if step is None:
        raise UserError(f"no checkpoint in {workdir}")
    meta = read_meta(workdir, step)
    config = TrainConfig.from_dict(meta["config"])
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    return step, meta, config


def restore(
    workdir: str | os.PathLike,
    step: int,
    meta: dict,
    mesh,
    optimizer: OptimizerConfig | None = None,
) -> tuple[Architecture, TrainState]:
    """(architecture, state) of a checkpoint whose ``meta`` was read, restored onto ``mesh``.

    Args:
      optimizer: restore the optimizer state of this optimizer; None: the checkpoint's own.
    """
    arch = models.from_dict(meta["arch"])
    saved = OptimizerConfig.from_dict(meta["config"]["optimizer"])
    tx = make_optimizer(saved)
    accumulator = TrainConfig.from_dict(meta["config"]).accumulator
    target = abstract_train_state(arch, tx, mesh, accumulator)
    try:
        state = checkpoint.restore(workdir, step, target)
    except checkpoint.CheckpointError as error:
        try:  # written before TrainState.aux got its name ("gfi" then)
            state = from_legacy(checkpoint.restore(workdir, step, legacy_target(target)))
        except checkpoint.CheckpointError:
            raise error from None
    if optimizer is not None and optimizer.name != saved.name:
        # A different optimizer has a different state; start it afresh.
        state = state.replace(opt_state=jax.jit(make_optimizer(optimizer).init)(state.params))
    return arch, state


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


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A network on the data mesh, with the settings and the data of its run."""

    config: TrainConfig
    dataset: data.Dataset
    mesh: jax.sharding.Mesh
    arch: Architecture
    state: TrainState


def load_run(
    workdir: str | os.PathLike,
    step: int,
    meta: dict,
    config: TrainConfig,
    devices: Sequence[jax.Device] | None,
    optimizer: OptimizerConfig | None = None,
) -> Loaded:
    """``config``'s data, and the checkpoint whose ``meta`` was read restored onto ``devices``.

    Args:
      optimizer: as for `restore`.
    """
    dataset = load_dataset(config)
    mesh = data_mesh(devices, config.batch_size)
    arch, state = restore(workdir, step, meta, mesh, optimizer)
    return Loaded(config, dataset, mesh, arch, state)


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
    evaluate = evaluator(arch, dataset, mesh, config)
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
        return {"step": start_step, **evaluate(state)}
    workdir.mkdir(parents=True, exist_ok=True)
    batches = global_batches(dataset, mesh, config, start_step)
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
    step = int(jax.device_get(state.step))
    result = {"step": step, "num_devices": mesh.size}
    if last_eval.get("step") == step:
        result.update(accuracy=last_eval["accuracy"], loss=last_eval["loss"])
    return result
