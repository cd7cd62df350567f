"""Opening a workdir: its lock, which checkpoint to read, and restoring it onto a mesh."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Sequence

import jax

from jaxprune import checkpoint, data, models
from jaxprune import workdir as workdirs
from jaxprune.graph import Architecture
from jaxprune.pipeline.config import TrainConfig, UserError
from jaxprune.pipeline.inputs import data_mesh, load_dataset
from jaxprune.train import parallel
from jaxprune.train.optim import OptimizerConfig, make_optimizer
from jaxprune.train.step import TrainState, abstract_train_state, from_legacy, legacy_target


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
