"""Training, fine-tuning and evaluating a workdir."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxprune import checkpoint, data, models
from jaxprune.flops import count_macs, count_params
from jaxprune.graph import Architecture
from jaxprune.pipeline import console, evaluation, inputs, loading, run_loop
from jaxprune.pipeline.config import METRICS_FILE, Phase, TrainConfig, UserError
from jaxprune.train import loop, parallel
from jaxprune.train.optim import OptimizerConfig, make_optimizer
from jaxprune.train.step import create_train_state


@loading.owns_workdir("workdir")
def train(
    config: TrainConfig,
    workdir: str | os.PathLike,
    *,
    restore_step: int | None = None,
    stop_at: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool | None = None,
    verbose: bool = True,
) -> dict:
    """Trains ``config.model`` from scratch, or resumes the run in ``workdir``.

    Args:
      config: the run. On resume it must equal the saved one (operational fields aside).
      workdir: the run's directory; created if needed. Held locked for the call (see
        `jaxprune.workdir`): a second writer of it is refused.
      restore_step: resume from this older step instead of the latest; the later steps are moved
        to ``WORKDIR/rejected_checkpoints/``.
      stop_at: stop (and save) at this step, as a preemption would; resuming then continues
        exactly as if the run had not stopped.
      devices: the devices of the data mesh (default: all).
      progress: show a progress bar (None: when stderr is a terminal).
      verbose: print a summary line per epoch.

    Returns:
      ``{"step", "num_devices"}`` and, when the run ended with an evaluation, ``"accuracy"`` and
      ``"loss"`` on the test split.
    """
    workdir = Path(workdir)
    # Names first: a typo is reported before any data is read (ValueError, listing valid names).
    models.create(config.model)
    data.parse_dataset_name(config.data)
    dataset = inputs.load_dataset(config)
    arch = models.create(config.model, dataset.num_classes, dataset.input_shape)
    mesh = inputs.data_mesh(devices, config.batch_size)
    total_steps, _ = inputs.run_length(config, dataset)
    step = loading.pick_step(workdir, restore_step)
    if step is None:
        inputs.check_input_shape(arch)
        tx = make_optimizer(config.optimizer)
        state = create_train_state(arch, tx, config.seed, mesh, config.accumulator)
        console.say(
            verbose,
            f"training {arch.name} on {dataset.name.value} for {total_steps} steps on "
            f"{mesh.size} device(s); workdir {workdir}",
        )
    else:
        meta = loading.read_meta(workdir, step)
        if meta["phase"] != Phase.TRAIN:
            raise UserError(
                f"{workdir} holds a {meta['phase']} checkpoint; continue it with "
                "`jaxprune finetune`"
            )
        differing = config.differences(TrainConfig.from_dict(meta["config"]))
        if differing:
            raise UserError(
                f"{workdir} holds a run with other settings ({', '.join(differing)}); use a new "
                "workdir or the same settings"
            )
        arch, state = loading.restore(workdir, step, meta, mesh)
        checkpoint.reject_after(workdir, step)
        console.say(verbose, f"resuming {arch.name} in {workdir} from step {step}/{total_steps}")
    loaded = loading.Loaded(config, dataset, mesh, arch, state)
    return run_loop.run(
        Phase.TRAIN, workdir, loaded, stop_at=stop_at, progress=progress, verbose=verbose
    )


@loading.owns_workdir("workdir")
def finetune(
    workdir: str | os.PathLike,
    *,
    num_steps: int | None = None,
    num_epochs: int | None = None,
    optimizer_changes: Mapping[str, Any] | None = None,
    augment: bool | None = None,
    fresh_optimizer: bool = False,
    data_dir: str | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = None,
    restore_step: int | None = None,
    stop_at: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool | None = None,
    verbose: bool = True,
) -> dict:
    """Fine-tunes the pruned network in ``workdir`` (written by `prune`), or resumes doing so.

    The run starts at step 0 with its own learning-rate schedule, from the optimizer state that
    `prune` sliced (momentum, Adam moments) unless ``fresh_optimizer``. Everything not given is
    taken from the training run the network was pruned from (batch size, seed, data, optimizer),
    except the augmentation, which is off unless asked for: a fine-tuning run of an epoch or so
    ends higher on unaugmented batches (ResNet-20 on Fashion-MNIST at 50% of the MACs, 1 epoch:
    91.3% instead of 90.8%; experiments/RESULTS.md, 2f).

    Args:
      workdir: a directory written by `prune`.
      num_steps: length of the fine-tuning run in steps; or
      num_epochs: its length in epochs. When resuming, both may be left out.
      optimizer_changes: fields of `OptimizerConfig` to change from the training run's (e.g.
        ``{"learning_rate": 0.01}``).
      augment: augment the fine-tuning batches with the dataset's training augmentation (None:
        off for a new run, as saved for a resumed one). Long fine-tunes (tens of epochs, as the
        GFI-AP authors' 80) want it on.
      fresh_optimizer: start from a freshly initialised optimizer state (zero momentum) instead
        of the one the cut sliced; only when starting from the pruned checkpoint.
      data_dir: where the data lives now, if it moved.
      checkpoint_every: also save every this many steps (None: as the run it continues).
      keep_checkpoints: how many recent checkpoints to keep (None: as the run it continues).
      restore_step, stop_at, devices, progress, verbose: as for `train`.

    Returns:
      As `train`.
    """
    workdir = Path(workdir)
    step = loading.pick_step(workdir, restore_step)
    if step is None:
        raise UserError(
            f"no checkpoint in {workdir}; write one with `jaxprune prune --out {workdir}`"
        )
    meta = loading.read_meta(workdir, step)
    if meta["phase"] == Phase.TRAIN:
        raise UserError(
            f"{workdir} holds an unpruned training run; continue it with `jaxprune train`"
        )
    saved = TrainConfig.from_dict(meta["config"])
    length = (num_steps, num_epochs)
    if meta["phase"] == Phase.FINETUNE and length == (None, None):
        length = (saved.num_steps, saved.num_epochs)
    elif length == (None, None):
        raise UserError("give num_steps or num_epochs for the fine-tuning run")
    config = dataclasses.replace(
        saved,
        num_steps=length[0],
        num_epochs=length[1],
        optimizer=_change_optimizer(saved.optimizer, optimizer_changes),
        augment=_finetune_augment(augment, saved, meta["phase"]),
        data_dir=data_dir if data_dir is not None else saved.data_dir,
        checkpoint_every=saved.checkpoint_every if checkpoint_every is None else checkpoint_every,
        keep_checkpoints=saved.keep_checkpoints if keep_checkpoints is None else keep_checkpoints,
    )
    if meta["phase"] == Phase.FINETUNE:
        differing = config.differences(saved)
        if differing:
            raise UserError(
                f"{workdir} holds a fine-tuning run with other settings ({', '.join(differing)})"
            )
    loaded = loading.load_run(workdir, step, meta, config, devices, config.optimizer)
    if fresh_optimizer and meta["phase"] == Phase.PRUNED:
        fresh = jax.jit(make_optimizer(config.optimizer).init)(loaded.state.params)
        loaded = dataclasses.replace(loaded, state=loaded.state.replace(opt_state=fresh))
    checkpoint.reject_after(workdir, step)
    total_steps, _ = inputs.run_length(config, loaded.dataset)
    console.say(
        verbose, f"fine-tuning {loaded.arch.name} in {workdir} from step {step}/{total_steps}"
    )
    return run_loop.run(
        Phase.FINETUNE,
        workdir,
        loaded,
        meta_extra={"pruning": meta.get("pruning")},
        stop_at=stop_at,
        progress=progress,
        verbose=verbose,
    )


def _finetune_augment(augment: bool | None, saved: TrainConfig, phase: str) -> bool:
    """Whether fine-tuning batches are augmented: as asked, else as the run resumed, else off."""
    if augment is not None:
        return augment
    return saved.augment if phase == Phase.FINETUNE else False


def _change_optimizer(
    optimizer: OptimizerConfig, changes: Mapping[str, Any] | None
) -> OptimizerConfig:
    try:
        return dataclasses.replace(optimizer, **(changes or {}))
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def evaluate(
    workdir: str | os.PathLike,
    *,
    restore_step: int | None = None,
    data_dir: str | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    """Test-split accuracy of a workdir's checkpoint (latest unless ``restore_step``).

    Appends an evaluation row to ``metrics.jsonl``; where that cannot be written (a read-only
    workdir) it says so in one line on stderr and still returns the result. Takes no lock: while
    another process writes the workdir, it reads the newest step whose save finished.

    Returns:
      ``{"step", "phase", "model", "accuracy", "loss", "macs", "params", "num_examples",
      "num_devices"}``.
    """
    workdir = Path(workdir)
    for attempt in range(3):
        found = checkpoint.steps(workdir)
        try:
            step, meta, config = loading.open_checkpoint(workdir, restore_step, data_dir)
            loaded = loading.load_run(workdir, step, meta, config, devices)
            break
        except checkpoint.CheckpointError:
            # A writer may delete the step being read (its --keep-checkpoints): read the newest.
            if restore_step is not None or attempt == 2 or checkpoint.steps(workdir) == found:
                raise
    arch, dataset, mesh = loaded.arch, loaded.dataset, loaded.mesh
    result = evaluation.evaluator(arch, dataset, mesh, config)(loaded.state)
    row = {"step": step, **result, "split": "test", "num_devices": mesh.size}
    try:
        loop.MetricsLog(workdir / METRICS_FILE, enabled=parallel.is_primary()).write(row)
    except OSError as e:
        console.warn(f"the result was not appended to {workdir / METRICS_FILE}: {e.strerror or e}")
    return {
        **row,
        "phase": meta["phase"],
        "model": arch.name,
        "macs": count_macs(arch),
        "params": count_params(arch),
        "num_examples": dataset.num_examples[data.Split.TEST],
    }


def load(
    workdir: str | os.PathLike, *, restore_step: int | None = None
) -> tuple[Architecture, dict]:
    """(architecture, variables) of a workdir's checkpoint (latest unless ``restore_step``).

    The variables are ``{'params', 'batch_stats'}`` on the default device, ready for
    ``arch.module().apply``; no data is read.
    """
    workdir = Path(workdir)
    step, meta, _ = loading.open_checkpoint(workdir, restore_step)
    arch, state = loading.restore(workdir, step, meta, inputs.data_mesh(jax.devices()[:1], 1))
    return arch, jax.device_get(state.variables)
