"""Pruning a workdir's checkpoint into a new workdir: score, select, cut, re-estimate, save.

The budget arrives as one `select.Budget`, the method as a name of `jaxprune.methods.METHODS`;
both are checked, with the width rules, before anything is loaded or scored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxprune import checkpoint, data, methods, models
from jaxprune.flops import count_macs, count_params
from jaxprune.graph import Architecture, groups
from jaxprune.pipeline import console, evaluation, inputs, loading
from jaxprune.pipeline.config import (
    METRICS_FILE,
    PRUNE_FILE,
    Budget,
    BudgetKind,
    Phase,
    TrainConfig,
    UserError,
)
from jaxprune.pipeline.training import finetune
from jaxprune.select import CostModel, Policy, Ranking, WidthRules
from jaxprune.select.budget import check_reachable
from jaxprune.select.oneshot import check_threshold_rules
from jaxprune.surgery import prune as prune_variables
from jaxprune.surgery import prune_like
from jaxprune.train import loop, parallel
from jaxprune.train.batch_norm import recalibrate_batch_norm
from jaxprune.train.optim import make_optimizer
from jaxprune.train.step import state_from_variables

# Batches (of the run's batch size) on which BatchNorm's statistics are re-estimated after a cut.
DEFAULT_RECALIBRATE_BATCHES = 40


def check_method(method: str | methods.Method) -> methods.Method:
    """The registry entry named ``method``; ValueError listing the valid names otherwise."""
    return methods.get(method)


def check_budget(
    arch: Architecture, budget: Budget, round_to: int = 1, rules: WidthRules | None = None
) -> None:
    """Refuses (ValueError) a budget below what the width rules let ``arch`` reach."""
    check_reachable(arch, budget, rules or WidthRules(round_to=round_to))


@dataclasses.dataclass(frozen=True)
class Selection:
    """How channels are chosen: a method and the selection settings that override its defaults.

    Attributes:
      method: the registry entry.
      policy: the selection policy (None: the method's).
      rules: the width rules, ``prunable`` resolved for the architecture.
      ranking: what a global ranking orders by (None: the method's).
      num_batches: scoring batches (None: the method's; its None is one epoch).
    """

    method: methods.Method
    policy: Policy
    rules: WidthRules
    ranking: Ranking | None
    num_batches: int | None

    def to_dict(self) -> dict:
        return {
            "method": self.method.name,
            "policy": self.policy.value,
            **self.rules.to_dict(),
            "ranking": (self.ranking or self.method.ranking).value,
        }


def _selection(
    arch: Architecture,
    method: str | methods.Method,
    budget: Budget,
    *,
    policy: Policy | str | None,
    round_to: int,
    max_pruning_ratio: float | None,
    prunable: Sequence[str] | None,
    ranking: Ranking | str | None,
    num_batches: int | None,
) -> Selection:
    """Every pruning setting resolved and checked against ``arch`` and ``budget`` (no work done)."""
    entry = methods.get(method)
    if policy is None:
        policy = entry.policy
    try:
        policy = Policy(policy)
    except ValueError:
        valid = ", ".join(p.value for p in Policy)
        raise ValueError(f"unknown policy {policy!r}; valid policies: {valid}") from None
    if ranking is not None:
        ranking = Ranking(ranking)
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    if prunable is None:
        prunable = entry.default_prunable(arch)
    rules = WidthRules(round_to, 1, max_pruning_ratio, prunable)
    if policy is Policy.THRESHOLD:
        check_threshold_rules(rules)
    if not (policy is Policy.THRESHOLD and budget.kind is BudgetKind.FILTERS):
        # (the threshold's filters budget is a fraction of the prunable filters: always reachable)
        check_reachable(arch, budget, rules)
    return Selection(entry, policy, rules, ranking, num_batches)


def _open_for_pruning(
    workdir: str | os.PathLike, out: Path, restore_step: int | None, data_dir: str | None
) -> tuple[int, dict, TrainConfig]:
    """(step, meta, config) of the checkpoint to prune; refuses a used ``out``."""
    if checkpoint.steps(out):
        raise UserError(f"{out} already holds checkpoints; give a new output directory")
    return loading.open_checkpoint(workdir, restore_step, data_dir)


def _training_images(source: loading.Loaded, num_batches: int, augment: bool) -> list:
    config, dataset = source.config, source.dataset
    return [
        (data.normalize(images, dataset.mean, dataset.std), jax.numpy.asarray(labels))
        for images, labels in data.train_batches(
            source.dataset,
            global_batch_size=config.batch_size,
            seed=config.seed,
            num_steps=num_batches,
            augment=augment,
        )
    ]


def _score(source: loading.Loaded, selection: Selection, verbose: bool) -> tuple[Any, str]:
    """(scores, what they were computed on) for the network in ``source``."""
    arch, state, method = source.arch, source.state, selection.method
    if (
        method.accumulator is not None
        and state.aux
        and source.config.accumulator == method.accumulator
    ):
        # Collected by the training steps' own backward pass (TrainConfig.score_during_training).
        steps = method.accumulator.steps(state.aux)
        if steps:
            console.say(verbose, f"scoring {arch.name} with {method.name} over {steps} train steps")
            return method.accumulator.scores(state.aux), f"training accumulator, {steps} steps"
    batches, scored_on = None, "weights"
    if method.needs_data:
        count = selection.num_batches or method.data.num_batches
        if count is None:
            count = inputs.run_length(
                dataclasses.replace(source.config, num_epochs=1, num_steps=None), source.dataset
            )[1]
        batches = _training_images(source, count, method.data.augment)
        augmented = "augmented " if method.data.augment else ""
        scored_on = f"{count} {augmented}training batches of {source.config.batch_size}"
    console.say(verbose, f"scoring the channels of {arch.name} with {method.name}")
    # On host: every process scores the same global batches on its own first device.
    return method.score(arch, jax.device_get(state.variables), batches), scored_on


def _write_pruned(
    workdir: str | os.PathLike,
    step: int,
    source: loading.Loaded,
    out: Path,
    keep: Mapping[str, Any],
    how: dict,
    evaluate_before_after: bool,
    recalibrate_batches: int,
    verbose: bool,
    started_from: Mapping[str, Any] | None = None,
) -> dict:
    """Prunes ``source`` to ``keep`` and saves it as step 0 of ``out``, with its records.

    ``source`` is the checkpoint at ``step`` of ``workdir``; ``how`` says how ``keep`` was chosen;
    ``started_from`` replaces the record's ``*_before`` fields (the last step of a run in several
    rounds or layers describes the network the run started from).
    BatchNorm's statistics are re-estimated on ``recalibrate_batches`` unaugmented training
    batches (0: kept as sliced).
    """
    arch, state, config, mesh = source.arch, source.state, source.config, source.mesh
    pruned_arch, cut_variables = prune_variables(arch, jax.device_get(state.variables), keep)
    opt_state = prune_like(arch, state.opt_state, keep)
    tx = make_optimizer(config.optimizer)
    pruned_variables = cut_variables
    if recalibrate_batches and cut_variables.get("batch_stats"):
        images = [x for x, _ in _training_images(source, recalibrate_batches, augment=False)]
        pruned_variables = recalibrate_batch_norm(pruned_arch, cut_variables, images)

    def state_of(variables):
        return state_from_variables(pruned_arch, variables, tx, mesh, opt_state, config.accumulator)

    pruned_state = state_of(pruned_variables)
    record = {
        "source": str(Path(workdir).absolute()),
        "source_step": step,
        **how,
        "batch_norm_recalibrated_on": recalibrate_batches
        if pruned_variables is not cut_variables
        else 0,
        "widths_before": dict(groups(arch)),
        "widths_after": dict(groups(pruned_arch)),
        "macs_before": count_macs(arch),
        "macs_after": count_macs(pruned_arch),
        "params_before": count_params(arch),
        "params_after": count_params(pruned_arch),
    }
    if evaluate_before_after:
        record["accuracy_before"] = evaluation.evaluator(arch, source.dataset, mesh, config)(state)[
            "accuracy"
        ]
        evaluate = evaluation.evaluator(pruned_arch, source.dataset, mesh, config)
        if pruned_variables is not cut_variables:
            record["accuracy_at_cut"] = evaluate(state_of(cut_variables))["accuracy"]
        record["accuracy_after"] = evaluate(pruned_state)["accuracy"]
    record.update(started_from or {})
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
        line += f", accuracy {record['accuracy_before']:.4f} -> "
        if "accuracy_at_cut" in record:
            line += f"{record['accuracy_at_cut']:.4f} at the cut, BatchNorm re-estimated: "
        line += f"{record['accuracy_after']:.4f}"
    if how.get("bound_by_rules"):
        line += f"; held at their floor: {', '.join(how['bound_by_rules'])}"
    console.say(verbose, line)
    return record


def _choose(
    source: loading.Loaded, budget: Budget, selection: Selection, verbose: bool
) -> tuple[dict, dict]:
    """(keep sets, how they were chosen) for the network in ``source``."""
    scores, scored_on = _score(source, selection, verbose)
    arch = source.arch
    keep = selection.method.select(
        arch, scores, budget, selection.rules, selection.policy, selection.ranking
    )
    names = tuple(groups(arch))
    widths = np.array([len(keep[g]) for g in names])
    full = np.array(list(groups(arch).values()))
    how = {
        **selection.to_dict(),
        "budget": {"kind": budget.kind.value, "ratio": budget.ratio},
        "scored_on": scored_on,
        "bound_by_rules": selection.rules.binding(names, full, widths),
    }
    return keep, how


def _prune_once(
    workdir: str | os.PathLike,
    out: Path,
    step: int,
    meta: dict,
    config: TrainConfig,
    budget: Budget,
    selection: Selection,
    *,
    recalibrate_batches: int,
    evaluate_before_after: bool,
    devices: Sequence[jax.Device] | None,
    verbose: bool,
    extra: Mapping[str, Any] | None = None,
    started_from: Mapping[str, Any] | None = None,
) -> dict:
    source = loading.load_run(workdir, step, meta, config, devices)
    keep, how = _choose(source, budget, selection, verbose)
    return _write_pruned(
        workdir,
        step,
        source,
        out,
        keep,
        {**how, **(extra or {})},
        evaluate_before_after,
        recalibrate_batches,
        verbose,
        started_from,
    )


def _retrain(
    out: Path,
    config: TrainConfig,
    num_steps: int,
    devices: Sequence[jax.Device] | None,
    verbose: bool,
) -> None:
    """Fine-tunes ``out`` between rounds or layers, augmented as the training run was."""
    finetune(out, num_steps=num_steps, augment=config.augment, devices=devices, verbose=verbose)


def _before_fields(record: Mapping[str, Any]) -> dict:
    """The fields of a prune record that describe the network before the cut."""
    return {k: v for k, v in record.items() if k.endswith("_before")}


def _prune_layerwise(
    workdir: str | os.PathLike,
    out: Path,
    step: int,
    meta: dict,
    config: TrainConfig,
    budget: Budget,
    selection: Selection,
    round_steps: int,
    *,
    recalibrate_batches: int,
    evaluate_before_after: bool,
    devices: Sequence[jax.Device] | None,
    verbose: bool,
) -> dict:
    """Chooses every group's channels once, then cuts one group at a time in forward order,
    fine-tuning ``round_steps`` after each (the GFI-AP authors' ImageNet protocol)."""
    source = loading.load_run(workdir, step, meta, config, devices)
    keep, how = _choose(source, budget, selection, verbose)
    sizes = groups(source.arch)
    order = [g for g in sizes if len(keep[g]) < sizes[g]]
    if not order:
        return _write_pruned(
            workdir, step, source, out, keep, how, evaluate_before_after, 0, verbose
        )
    current, current_step, started_from = Path(workdir), step, None
    for i, group in enumerate(order, start=1):
        last = i == len(order)
        layer_out = out if last else out / "rounds" / f"layer{i}"
        console.say(
            verbose, f"layer {i}/{len(order)}: {group} {sizes[group]} -> {len(keep[group])}"
        )
        if i > 1:
            meta = loading.read_meta(current, current_step)
            source = loading.load_run(current, current_step, meta, config, devices)
        record = _write_pruned(
            current,
            current_step,
            source,
            layer_out,
            {group: keep[group]},
            {**how, "layer": group, "layers": order},
            evaluate_before_after and last,
            recalibrate_batches,
            verbose,
            started_from,
        )
        started_from = started_from or _before_fields(record)
        if not last:
            _retrain(layer_out, config, round_steps, devices, verbose)
            current, current_step = layer_out, loading.pick_step(layer_out, None)
    return record


@loading.owns_workdir("out", new=True)
def prune(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    method: str | methods.Method,
    budget: Budget,
    *,
    round_to: int = 1,
    policy: Policy | str | None = None,
    max_pruning_ratio: float | None = None,
    prunable: Sequence[str] | None = None,
    ranking: Ranking | str | None = None,
    num_batches: int | None = None,
    recalibrate_batches: int = DEFAULT_RECALIBRATE_BATCHES,
    rounds: int = 1,
    round_steps: int | None = None,
    layerwise: bool = False,
    restore_step: int | None = None,
    data_dir: str | None = None,
    evaluate_before_after: bool = True,
    devices: Sequence[jax.Device] | None = None,
    verbose: bool = True,
) -> dict:
    """Prunes the checkpoint in ``workdir`` to ``budget`` and writes it to the new workdir ``out``.

    Scores come from ``jaxprune.methods.get(method)`` (its criterion on its scoring data), channels
    are chosen by its policy under the width rules, `jaxprune.prune` removes them, and BatchNorm's
    statistics are re-estimated on ``recalibrate_batches`` training batches. The optimizer state
    is sliced with `jaxprune.prune_like`, so `finetune` continues from it. ``out/prune.json`` and
    a ``metrics.jsonl`` row record the widths of every group before and after, MACs and params,
    the accuracies before, at the cut and after re-estimation (if evaluated), and which groups the
    rules held at their floor.

    With ``rounds=K > 1`` the budget is reached in K rounds of pruning, re-scoring and
    ``round_steps`` fine-tuning steps (Taylor-FO-BN's protocol); round i keeps
    ``1 - (1 - ratio) * i / K`` of the starting cost. The rounds' workdirs stay in
    ``out/rounds/``; the last is written to ``out``, its record's ``*_before`` fields describing
    the network the first round started from. ``max_pruning_ratio`` holds against the starting
    widths.

    Args:
      workdir: the trained (or fine-tuned) run.
      out: a new workdir.
      method: a name of `jaxprune.methods.METHODS`, or a `methods.Method` of one's own.
      budget: what the pruned network keeps.
      round_to: every width a multiple of this (or full).
      policy: ``"adaptive"``, ``"uniform"`` or ``"threshold"``; None: the method's.
      max_pruning_ratio: no group loses more than this fraction of its channels.
      prunable: glob patterns of the groups that may be cut; None: the method's default.
      ranking: ``"score"`` or ``"score_per_cost"`` for the adaptive policy; None: the method's.
      num_batches: scoring batches; None: the method's (one epoch for ``gfi_ap_authors``).
      recalibrate_batches: BatchNorm re-estimation batches after the cut; 0: none.
      rounds: pruning rounds; round_steps: fine-tuning steps between rounds (required if > 1).
      layerwise: choose every group's channels once, then cut one group at a time in forward
        order with ``round_steps`` fine-tuning steps after each (the GFI-AP authors' ImageNet
        protocol); the workdirs of all but the last stay in ``out/rounds/``.
      restore_step, data_dir, devices, verbose: as for `train`.
      evaluate_before_after: evaluate the networks on the test split.

    Returns:
      The record written to ``out/prune.json``.

    Raises:
      ValueError: before any work, for an unknown method or policy, bad rules, or a budget the
        rules make unreachable; `UserError` for a used ``out`` or a missing checkpoint.
    """
    out = Path(out)
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds}")
    if (rounds > 1 or layerwise) and (round_steps is None or round_steps < 1):
        raise ValueError("pruning in several rounds needs round_steps > 0 fine-tuning steps")
    if rounds > 1 and layerwise:
        raise ValueError("give rounds or layerwise, not both")
    if recalibrate_batches < 0:
        raise ValueError(f"recalibrate_batches must be >= 0, got {recalibrate_batches}")
    step, meta, config = _open_for_pruning(workdir, out, restore_step, data_dir)
    arch = models.from_dict(meta["arch"])
    settings = dict(
        policy=policy,
        round_to=round_to,
        max_pruning_ratio=max_pruning_ratio,
        prunable=prunable,
        ranking=ranking,
        num_batches=num_batches,
    )
    selection = _selection(arch, method, budget, **settings)
    common_args = dict(
        recalibrate_batches=recalibrate_batches,
        evaluate_before_after=evaluate_before_after,
        devices=devices,
        verbose=verbose,
    )
    if layerwise:
        return _prune_layerwise(
            workdir, out, step, meta, config, budget, selection, round_steps, **common_args
        )
    if rounds == 1:
        return _prune_once(workdir, out, step, meta, config, budget, selection, **common_args)

    cost = CostModel.build(arch, budget.kind)
    start_cost = cost(cost.full_widths)
    floors = dict(
        zip(
            cost.group_names,
            selection.rules.floors(cost.group_names, cost.full_widths),
            strict=True,
        )
    )
    round_rules = dataclasses.replace(selection.rules, max_pruning_ratio=None, at_least=floors)
    current, current_step, history, started_from = Path(workdir), step, [], None
    for i in range(1, rounds + 1):
        target = 1.0 - (1.0 - budget.ratio) * i / rounds
        now = CostModel.build(models.from_dict(meta["arch"]), budget.kind)
        round_budget = Budget(budget.kind, min(1.0, target * start_cost / now(now.full_widths)))
        round_out = out if i == rounds else out / "rounds" / f"round{i}"
        console.say(
            verbose, f"round {i}/{rounds}: keeping {target:.4g} of the starting {budget.kind.value}"
        )
        round_selection = dataclasses.replace(selection, rules=round_rules)
        extra = {"round": i, "rounds": rounds, "round_target": target, "history": history}
        record = _prune_once(
            current,
            round_out,
            current_step,
            meta,
            config,
            round_budget,
            round_selection,
            extra=extra,
            started_from=started_from,
            **common_args,
        )
        started_from = started_from or _before_fields(record)
        history = [
            *history,
            {
                k: record.get(k)
                for k in ("round", "round_target", "macs_after", "params_after", "accuracy_after")
            },
        ]
        if i < rounds:
            _retrain(round_out, config, round_steps, devices, verbose)
            current, current_step = round_out, loading.pick_step(round_out, None)
            meta = loading.read_meta(round_out, current_step)
    return record


@loading.owns_workdir("out", new=True)
def prune_to(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    keep: Mapping[str, Any],
    *,
    recalibrate_batches: int = 0,
    restore_step: int | None = None,
    data_dir: str | None = None,
    evaluate_before_after: bool = True,
    devices: Sequence[jax.Device] | None = None,
    verbose: bool = True,
) -> dict:
    """As `prune`, with the channels to keep given (group -> increasing indices)."""
    out = Path(out)
    step, meta, config = _open_for_pruning(workdir, out, restore_step, data_dir)
    source = loading.load_run(workdir, step, meta, config, devices)
    how = {"method": "given"}
    return _write_pruned(
        workdir, step, source, out, keep, how, evaluate_before_after, recalibrate_batches, verbose
    )
