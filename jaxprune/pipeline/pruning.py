"""Pruning a workdir's checkpoint into a new workdir: score, select, cut, save."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxprune import checkpoint, data, importance, models, select
from jaxprune.flops import count_macs, count_params
from jaxprune.graph import Architecture, groups
from jaxprune.pipeline import common
from jaxprune.pipeline.config import (
    METRICS_FILE,
    PRUNE_FILE,
    Budget,
    BudgetKind,
    Phase,
    TrainConfig,
    UserError,
)
from jaxprune.select import Policy
from jaxprune.surgery import prune as prune_variables
from jaxprune.surgery import prune_like
from jaxprune.train import loop, parallel
from jaxprune.train.optim import make_optimizer
from jaxprune.train.step import state_from_variables


def check_method(method: str) -> Any:
    """The importance criterion named ``method``; refuses unknown names, listing the valid ones."""
    criteria = importance.CRITERIA
    if method not in criteria:
        raise UserError(f"unknown method {method!r}; valid methods: {', '.join(criteria)}")
    return criteria[method]


def check_budget(arch: Architecture, budget: Budget, round_to: int) -> None:
    """Refuses a budget below what keeping ``round_to`` channels of every group costs.

    The same cost model as `jaxprune.select.adaptive`, checked before any scoring.
    """
    if round_to < 1:
        raise UserError(f"--round-to must be positive, got {round_to}")
    cost = select.CostModel.build(arch, budget.kind)
    smallest = select.min_widths(cost.full_widths, round_to)
    floor = cost(smallest) / cost(cost.full_widths)
    if budget.ratio < floor * (1 - 1e-12):
        raise UserError(
            f"impossible budget: --{budget.kind.value}-ratio {budget.ratio} is below {floor:.4g}, "
            f"what {arch.name} keeps with {round_to} channel(s) in every group"
        )


def _open_for_pruning(
    workdir: str | os.PathLike, out: Path, restore_step: int | None, data_dir: str | None
) -> tuple[int, dict, TrainConfig]:
    """(step, meta, config) of the checkpoint to prune; refuses a used ``out``."""
    if checkpoint.steps(out):
        raise UserError(f"{out} already holds checkpoints; give a new --out directory")
    return common.open_checkpoint(workdir, restore_step, data_dir)


def _write_pruned(
    workdir: str | os.PathLike,
    step: int,
    source: common.Loaded,
    out: Path,
    keep: Mapping[str, Any],
    how: dict,
    evaluate_before_after: bool,
    verbose: bool,
) -> dict:
    """Prunes ``source`` to ``keep`` and saves it as step 0 of ``out``, with its records.

    ``source`` is the checkpoint at ``step`` of ``workdir``; ``how`` says how ``keep`` was chosen.
    """
    arch, state, config, mesh = source.arch, source.state, source.config, source.mesh
    pruned_arch, pruned_variables = prune_variables(arch, state.variables, keep)
    opt_state = prune_like(arch, state.opt_state, keep)
    tx = make_optimizer(config.optimizer)
    pruned_state = state_from_variables(
        pruned_arch, pruned_variables, tx, mesh, opt_state, config.collect_gfi
    )
    record = {
        "source": str(Path(workdir).absolute()),
        "source_step": step,
        **how,
        "widths_before": dict(groups(arch)),
        "widths_after": dict(groups(pruned_arch)),
        "macs_before": count_macs(arch),
        "macs_after": count_macs(pruned_arch),
        "params_before": count_params(arch),
        "params_after": count_params(pruned_arch),
    }
    if evaluate_before_after:
        before = common.evaluator(arch, source.dataset, mesh, config)(state)
        record["accuracy_before"] = before["accuracy"]
        after = common.evaluator(pruned_arch, source.dataset, mesh, config)(pruned_state)
        record["accuracy_after"] = after["accuracy"]
    out.mkdir(parents=True, exist_ok=True)
    pruned_meta = {
        "arch": pruned_arch.to_dict(),
        "config": config.to_dict(),
        "phase": Phase.PRUNED.value,
        "num_devices": mesh.size,
        "pruning": {k: record[k] for k in ("source", "source_step", *how)},
    }
    with checkpoint.Writer(out, max_to_keep=config.keep_checkpoints) as writer:
        writer.save(0, pruned_state, pruned_meta)
    if parallel.is_primary():
        (out / PRUNE_FILE).write_text(json.dumps(record, indent=1))
        row = {"step": 0, "event": "prune", "num_devices": mesh.size}
        row.update({k: v for k, v in record.items() if k.startswith(("macs", "params"))})
        if evaluate_before_after:
            row.update(accuracy=record["accuracy_after"], split="test")
        loop.MetricsLog(out / METRICS_FILE).write(row)
    line = (
        f"pruned {arch.name}: MACs {record['macs_before']:,} -> {record['macs_after']:,} "
        f"({record['macs_after'] / record['macs_before']:.1%} kept), params "
        f"{record['params_before']:,} -> {record['params_after']:,}"
    )
    if evaluate_before_after:
        line += f", accuracy {record['accuracy_before']:.4f} -> {record['accuracy_after']:.4f}"
    common.say(verbose, line)
    return record


@common.owns_workdir("out", new=True)
def prune(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    method: str,
    budget: Budget,
    *,
    round_to: int = 1,
    policy: Policy | str = "adaptive",
    num_batches: int = 8,
    restore_step: int | None = None,
    data_dir: str | None = None,
    evaluate_before_after: bool = True,
    devices: Sequence[jax.Device] | None = None,
    verbose: bool = True,
) -> dict:
    """Prunes the checkpoint in ``workdir`` to ``budget`` and writes it to the new workdir ``out``.

    Scores come from ``jaxprune.importance.CRITERIA[method]`` on ``num_batches`` training batches
    (no augmentation), channels are chosen by ``jaxprune.select.adaptive`` (``policy="uniform"``:
    `jaxprune.select.uniform`, the same fraction of every group), and `jaxprune.prune`
    removes them. The optimizer state is sliced with `jaxprune.prune_like`, so `finetune`
    continues from it. ``out/prune.json`` and a ``metrics.jsonl`` row record the widths of every
    group before and after, MACs and params (and accuracies before and after, if evaluated).
    Unknown methods, a used ``out`` and budgets below what the network can reach are refused
    before anything is computed.

    Returns:
      The record written to ``out/prune.json``.
    """
    out = Path(out)
    criterion = check_method(method)
    try:
        policy = Policy(policy)
    except ValueError:
        raise UserError(
            f"unknown policy {policy!r}; valid policies: {', '.join(p.value for p in Policy)}"
        ) from None
    if policy is Policy.UNIFORM and budget.kind is BudgetKind.FILTERS:
        raise UserError("--policy uniform takes a --macs-ratio or --params-ratio budget")
    step, meta, config = _open_for_pruning(workdir, out, restore_step, data_dir)
    check_budget(models.from_dict(meta["arch"]), budget, round_to)
    source = common.load_run(workdir, step, meta, config, devices)
    arch, state = source.arch, source.state
    how = {}
    accumulated = int(jax.device_get(state.gfi.num_steps)) if state.gfi else 0
    if method == "gfi" and accumulated:
        common.say(
            verbose, f"scoring the channels of {arch.name} with gfi over {accumulated} steps"
        )
        scores = importance.gfi_accumulator_scores(state.gfi)
        how["scored_on"] = f"training accumulator, {accumulated} steps"
    else:
        batches = None
        if method in importance.NEEDS_BATCHES:
            batches = [
                (jax.numpy.asarray(images), jax.numpy.asarray(labels))
                for images, labels in data.train_batches(
                    source.dataset,
                    global_batch_size=config.batch_size,
                    seed=config.seed,
                    num_steps=num_batches,
                    augment=False,
                )
            ]
            how["scored_on"] = f"{num_batches} training batches of {config.batch_size}"
        common.say(verbose, f"scoring the channels of {arch.name} with {method}")
        # On host: every process scores the same global batches on its own first device.
        scores = criterion(arch, jax.device_get(state.variables), batches=batches)
    try:
        if policy is Policy.ADAPTIVE:
            keep = select.adaptive(
                arch,
                scores,
                round_to=round_to,
                normalize=importance.DEFAULT_NORMALIZE.get(method),
                **{f"{budget.kind.value}_ratio": budget.ratio},
            )
        else:
            keep = select.uniform(
                arch, scores, round_to=round_to, **{f"{budget.kind.value}_ratio": budget.ratio}
            )
    except ValueError as e:
        raise UserError(str(e)) from None
    how = {
        "method": method,
        "policy": policy.value,
        "budget": {"kind": budget.kind.value, "ratio": budget.ratio},
        "round_to": round_to,
        **how,
    }
    return _write_pruned(workdir, step, source, out, keep, how, evaluate_before_after, verbose)


@common.owns_workdir("out", new=True)
def prune_to(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    keep: Mapping[str, Any],
    *,
    restore_step: int | None = None,
    data_dir: str | None = None,
    evaluate_before_after: bool = True,
    devices: Sequence[jax.Device] | None = None,
    verbose: bool = True,
) -> dict:
    """As `prune`, with the channels to keep given (group -> increasing indices)."""
    out = Path(out)
    step, meta, config = _open_for_pruning(workdir, out, restore_step, data_dir)
    source = common.load_run(workdir, step, meta, config, devices)
    how = {"method": "given"}
    return _write_pruned(workdir, step, source, out, keep, how, evaluate_before_after, verbose)
