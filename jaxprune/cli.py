"""The ``jaxprune`` command: train, prune, finetune and eval a workdir.

    jaxprune train    --model lenet5 --data fashion_mnist --epochs 1 --workdir /tmp/run
    jaxprune prune    --workdir /tmp/run --method l1 --macs-ratio 0.5 --out /tmp/pruned
    jaxprune finetune --workdir /tmp/pruned --epochs 1
    jaxprune eval     --workdir /tmp/pruned --json

Every user error ends the command with a non-zero status and one line on stderr.
"""

from __future__ import annotations

import argparse
import ctypes.util
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence

from jaxprune import checkpoint, data, methods, pipeline, select, workdir
from jaxprune.allocator import ALLOCATOR_ENV
from jaxprune.train import loop, optim, parallel
from jaxprune.train.step import ComputeDtype

# Exit statuses.
USER_ERROR = 1
USAGE_ERROR = 2
INTERRUPTED = 130

# Adam's default peak learning rate (SGD's is OptimizerConfig's, 0.1).
ADAM_LEARNING_RATE = 1e-3


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block)."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(USAGE_ERROR)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


_NO_CAP = -1.0


def _max_pruning_ratio(text: str) -> float:
    if text.lower() == "none":
        return _NO_CAP
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or none, got {text!r}")
    return value


def _patterns(text: str) -> tuple[str, ...] | None:
    """Comma-separated glob patterns; ``all``: every group (overrides a method's default)."""
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if not patterns:
        raise argparse.ArgumentTypeError("expected comma-separated group patterns")
    return ("*",) if patterns == ("all",) else patterns


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions in (0, 1), got {text!r}"
        )
    return values


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W,C with positive sizes, got {text!r}")
    return shape


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("devices and processes")
    group.add_argument("--num-devices", type=_positive_int, help="use the first N devices only")
    group.add_argument("--coordinator-address", help="host:port of process 0 (multi-process runs)")
    group.add_argument("--num-processes", type=_positive_int, help="processes in the run")
    group.add_argument("--process-id", type=int, help="this process, 0..num_processes-1")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with auto-detection (Cloud TPU, Slurm, Open MPI)",
    )


def _length(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--steps", type=_positive_int, help="length of the run in steps")
    group.add_argument("--epochs", type=_positive_int, help="length of the run in epochs")


def _optimizer_flags(parser: argparse.ArgumentParser, defaults_from: str) -> None:
    group = parser.add_argument_group(f"optimizer (defaults: {defaults_from})")
    group.add_argument("--optimizer", choices=[o.value for o in optim.OptimizerName])
    group.add_argument("--lr", type=float, help="peak learning rate (sgd 0.1, adam 0.001)")
    group.add_argument("--momentum", type=float, help="SGD momentum (0.9)")
    group.add_argument(
        "--nesterov", action=argparse.BooleanOptionalAction, default=None, help="(on)"
    )
    group.add_argument("--weight-decay", type=float, help="decoupled, kernels only (5e-4)")
    group.add_argument("--schedule", choices=[s.value for s in optim.ScheduleName])
    group.add_argument("--warmup-steps", type=int, help="linear warm-up (5%% of the run)")
    group.add_argument(
        "--step-boundaries",
        type=_fractions,
        help="step schedule: comma-separated fractions of the run where the rate is multiplied "
        "by --step-factor (0.5,0.75)",
    )
    group.add_argument("--step-factor", type=float, help="step schedule's factor (0.1)")


def _optimizer_changes(args: argparse.Namespace) -> dict:
    names = {
        "optimizer": "name",
        "lr": "learning_rate",
        "momentum": "momentum",
        "nesterov": "nesterov",
        "weight_decay": "weight_decay",
        "schedule": "schedule",
        "warmup_steps": "warmup_steps",
        "step_boundaries": "step_boundaries",
        "step_factor": "step_factor",
    }
    changes = {
        field: getattr(args, flag)
        for flag, field in names.items()
        if getattr(args, flag) is not None
    }
    if changes.get("name") == optim.OptimizerName.ADAM and "learning_rate" not in changes:
        changes["learning_rate"] = ADAM_LEARNING_RATE
    return changes


def _run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-every", type=_positive_int, help="also save every K steps")
    parser.add_argument("--restore-step", type=int, help="resume from this older checkpoint step")
    parser.add_argument("--stop-at", type=_positive_int, help="stop (and save) at this step")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxprune", description="Train, prune, fine-tune and evaluate CNNs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model from scratch (or resume)")
    train.add_argument("--model", required=True, help="e.g. lenet5, resnet56, vgg16")
    train.add_argument("--data", default="fashion_mnist", help="dataset (fashion_mnist)")
    train.add_argument("--data-dir", help="IDX files or a prepared tfds data directory")
    train.add_argument(
        "--data-workers",
        type=int,
        help="processes decoding batches (default: min(cores, 8) for JPEG data, 0 in memory)",
    )
    _length(train, required=True)
    train.add_argument("--batch-size", type=_positive_int, default=128, help="global batch (128)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workdir", required=True)
    train.add_argument("--label-smoothing", type=float, default=0.0)
    train.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the dataset's training augmentation (on; fashion_mnist: pad 2, crop, flip)",
    )
    train.add_argument(
        "--dtype",
        choices=[d.value for d in ComputeDtype],
        default="float32",
        help="compute dtype; parameters stay float32",
    )
    train.add_argument("--synthetic-shape", type=_shape, help="H,W,C of --data synthetic")
    train.add_argument("--keep-checkpoints", type=_positive_int, default=3)
    train.add_argument(
        "--collect-gfi",
        action="store_true",
        help="accumulate GFI importance during training (used by prune --method gfi)",
    )
    _optimizer_flags(train, "SGD, Nesterov momentum 0.9, cosine, weight decay 5e-4")
    _run_flags(train)
    _common(train)

    prune = commands.add_parser("prune", help="prune a trained checkpoint into a new workdir")
    prune.add_argument("--workdir", required=True)
    prune.add_argument("--method", required=True, help=f"one of: {', '.join(methods.METHODS)}")
    budget = prune.add_mutually_exclusive_group(required=True)
    for kind in pipeline.BudgetKind:
        budget.add_argument(
            f"--{kind.value}-ratio", type=float, help=f"fraction of {kind.value} kept"
        )
    prune.add_argument("--round-to", type=_positive_int, default=1, help="channel multiple")
    prune.add_argument(
        "--policy",
        help="adaptive (one global ranking, GFI-AP), uniform (same fraction of every group) or "
        "threshold (the GFI-AP authors' rule); default: the method's",
    )
    prune.add_argument(
        "--max-pruning-ratio",
        type=_max_pruning_ratio,
        help="largest fraction of any group removed, or 'none' (default "
        f"{methods.DEFAULT_MAX_PRUNING_RATIO}; none for the threshold policy)",
    )
    prune.add_argument(
        "--prunable",
        type=_patterns,
        help="comma-separated glob patterns of the groups that may be cut, e.g. '*/conv1', or "
        "'all' (default: the method's)",
    )
    prune.add_argument("--ranking", help="score or score_per_cost (adaptive policy)")
    prune.add_argument(
        "--rounds", type=_positive_int, default=1, help="reach the budget in this many rounds"
    )
    prune.add_argument(
        "--round-steps", type=_positive_int, help="fine-tuning steps between rounds (or layers)"
    )
    prune.add_argument(
        "--layerwise",
        action="store_true",
        help="choose once, then cut one group at a time with --round-steps of fine-tuning after "
        "each (the GFI-AP authors' ImageNet protocol)",
    )
    prune.add_argument(
        "--recalibrate-batches",
        type=_non_negative_int,
        default=pipeline.DEFAULT_RECALIBRATE_BATCHES,
        help="training batches to re-estimate BatchNorm statistics on after the cut (0: none)",
    )
    prune.add_argument("--out", required=True, help="new workdir for the pruned network")
    prune.add_argument(
        "--num-batches", type=_positive_int, help="batches for scoring (default: the method's)"
    )
    prune.add_argument("--restore-step", type=int)
    prune.add_argument("--data-dir")
    prune.add_argument("--no-eval", action="store_true", help="skip accuracy before/after")
    _common(prune)

    demo = commands.add_parser(
        "demo", help="the main job: GFI-AP vs uniform L1 at the same MACs budget, end to end"
    )
    demo.add_argument("--full", action="store_true", help="the longer version (10 + 3 epochs)")
    demo.add_argument("--model", help="default resnet20")
    demo.add_argument("--data", help="default fashion_mnist")
    demo.add_argument("--data-dir")
    demo.add_argument("--macs-ratio", type=float, help="fraction of the MACs kept (0.5)")
    demo.add_argument("--train-steps", type=_positive_int, help="baseline steps (300)")
    demo.add_argument("--finetune-steps", type=_positive_int, help="per pruned model (100)")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--workdir", help="default runs/demo-DATE-TIME (resumes if it exists)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    _common(demo)

    finetune = commands.add_parser("finetune", help="fine-tune a pruned workdir (or resume)")
    finetune.add_argument("--workdir", required=True)
    _length(finetune, required=False)
    finetune.add_argument("--data-dir")
    finetune.add_argument(
        "--keep-checkpoints", type=_positive_int, help="(default: as the run it continues)"
    )
    finetune.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="augment the fine-tuning batches (default: off; on for long fine-tunes)",
    )
    finetune.add_argument(
        "--fresh-optimizer",
        action="store_true",
        help="start from zero momentum instead of the optimizer state the cut sliced",
    )
    _optimizer_flags(finetune, "those of the training run")
    _run_flags(finetune)
    _common(finetune)

    evaluate = commands.add_parser("eval", help="test accuracy of a workdir's checkpoint")
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--restore-step", type=int)
    evaluate.add_argument("--data-dir")
    _common(evaluate)
    return parser


def _devices(args: argparse.Namespace):
    import jax

    if args.num_devices is None:
        return None
    devices = jax.devices()
    if args.num_devices > len(devices):
        raise pipeline.UserError(f"--num-devices {args.num_devices}: only {len(devices)} devices")
    return devices[: args.num_devices]


def _train(args: argparse.Namespace) -> None:
    changes = _optimizer_changes(args)
    synthetic = None
    if args.synthetic_shape is not None:
        synthetic = data.SyntheticOptions(image_shape=args.synthetic_shape)
    config = pipeline.TrainConfig(
        model=args.model,
        data=args.data,
        num_steps=args.steps,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        augment=args.augment,
        optimizer=optim.OptimizerConfig(**changes),
        label_smoothing=args.label_smoothing,
        compute_dtype=args.dtype,
        synthetic=synthetic,
        data_dir=args.data_dir,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        score_during_training="gfi" if args.collect_gfi else None,
        data_workers=args.data_workers,
    )
    result = pipeline.train(
        config,
        args.workdir,
        restore_step=args.restore_step,
        stop_at=args.stop_at,
        devices=_devices(args),
        progress=args.progress,
    )
    _done(result)


def _finetune(args: argparse.Namespace) -> None:
    result = pipeline.finetune(
        args.workdir,
        num_steps=args.steps,
        num_epochs=args.epochs,
        optimizer_changes=_optimizer_changes(args),
        augment=args.augment,
        fresh_optimizer=args.fresh_optimizer,
        data_dir=args.data_dir,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        restore_step=args.restore_step,
        stop_at=args.stop_at,
        devices=_devices(args),
        progress=args.progress,
    )
    _done(result)


def _done(result: dict) -> None:
    if parallel.is_primary():
        line = f"done: step {result['step']}"
        if "accuracy" in result:
            line += f", test accuracy {result['accuracy']:.4f}"
        print(line, flush=True)


def _prune(args: argparse.Namespace) -> None:
    ((kind, ratio),) = [
        (kind, getattr(args, f"{kind.value}_ratio"))
        for kind in pipeline.BudgetKind
        if getattr(args, f"{kind.value}_ratio") is not None
    ]
    method = methods.get(args.method)
    policy = args.policy or method.policy
    cap = args.max_pruning_ratio
    if cap is None and policy != select.Policy.THRESHOLD:
        cap = methods.DEFAULT_MAX_PRUNING_RATIO
    pipeline.prune(
        args.workdir,
        args.out,
        args.method,
        pipeline.Budget(kind, ratio),
        round_to=args.round_to,
        policy=policy,
        max_pruning_ratio=None if cap == _NO_CAP else cap,
        prunable=args.prunable,
        ranking=args.ranking,
        num_batches=args.num_batches,
        recalibrate_batches=args.recalibrate_batches,
        rounds=args.rounds,
        round_steps=args.round_steps,
        layerwise=args.layerwise,
        restore_step=args.restore_step,
        data_dir=args.data_dir,
        evaluate_before_after=not args.no_eval,
        devices=_devices(args),
    )


def _eval(args: argparse.Namespace) -> None:
    result = pipeline.evaluate(
        args.workdir, restore_step=args.restore_step, data_dir=args.data_dir, devices=_devices(args)
    )
    if not parallel.is_primary():
        return
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.workdir} step {result['step']} ({result['phase']}, {result['model']}): "
            f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} on "
            f"{result['num_examples']} test examples; {result['macs']:,} MACs, "
            f"{result['params']:,} params"
        )


def _demo(args: argparse.Namespace) -> None:
    from jaxprune import demo, models

    config = demo.FULL if args.full else demo.DemoConfig()
    changes = {
        field: getattr(args, field)
        for field in (
            "model",
            "data",
            "data_dir",
            "macs_ratio",
            "train_steps",
            "finetune_steps",
            "seed",
        )  # fmt: skip
        if getattr(args, field) is not None
    }
    config = dataclasses.replace(config, **changes)
    if config.model not in models.names():
        raise pipeline.UserError(
            f"unknown model {config.model!r}; valid models: {', '.join(models.names())}"
        )
    if not 0 < config.macs_ratio <= 1:
        raise pipeline.UserError(f"--macs-ratio must lie in (0, 1], got {config.macs_ratio}")
    workdir = args.workdir or demo.default_workdir()
    demo.run(config, workdir, progress=args.progress)


_COMMANDS = {
    "train": _train,
    "prune": _prune,
    "finetune": _finetune,
    "eval": _eval,
    "demo": _demo,
}


# Python names in library errors -> the flags a command-line user typed (the one translation).
_FLAG_OF = {
    name: f"--{name.replace('_', '-')}"
    for name in (
        "batch_size", "checkpoint_every", "label_smoothing", "restore_step", "keep_checkpoints",
        "macs_ratio", "params_ratio", "filters_ratio", "max_pruning_ratio", "round_to",
        "num_batches", "round_steps", "recalibrate_batches", "data_dir", "data_workers",
    )
} | {"num_steps": "--steps", "num_epochs": "--epochs"}  # fmt: skip
_PYTHON_NAMES = re.compile(r"\b(" + "|".join(_FLAG_OF) + r")\b")


def error_line(error: BaseException) -> str:
    """The one-line message of a library error, with Python parameter names as the flags."""
    return _PYTHON_NAMES.sub(lambda m: _FLAG_OF[m.group(1)], " ".join(str(error).split()))


def main(argv: Sequence[str] | None = None) -> None:
    """Runs one command; exits with status 1 (user error), 2 (usage) or 130 (interrupted)."""
    args = build_parser().parse_args(argv)
    from jaxprune import cpu  # the opt-in CPU speed layer; before any JAX computation

    cpu.enable()
    # Orbax and JAX log routine warnings through absl; the command's own output says what matters.
    logging.getLogger("absl").setLevel(logging.ERROR)
    prog = f"jaxprune {args.command}"
    try:
        options = parallel.DistributedOptions(
            args.coordinator_address, args.num_processes, args.process_id, args.distributed
        )
        try:
            parallel.initialize_distributed(options)
        except (ValueError, RuntimeError) as e:
            raise pipeline.UserError(f"cannot start the multi-process run: {e}") from None
        _COMMANDS[args.command](args)
    except (
        ValueError,
        checkpoint.CheckpointError,
        loop.TrainingDiverged,
        workdir.WorkdirError,
    ) as e:
        # The one place Python errors become the command's one-line messages (UserError is a
        # ValueError; so are the library's refusals of bad settings and budgets).
        sys.stderr.write(f"{prog}: error: {error_line(e)}\n")
        raise SystemExit(USER_ERROR) from None
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted; the checkpoints written so far are kept\n")
        raise SystemExit(INTERRUPTED) from None


# glibc's malloc returns XLA:CPU's large per-step buffers to the kernel and maps them fresh on
# the next step (hundreds of thousands of minor page faults per CIFAR ResNet-56 train step);
# tcmalloc keeps them: the train step runs faster (RESULTS.md section 3, "Page faults and the
# memory allocator"), a little faster than glibc as `jaxprune.cpu.allocator` sets it. It must be
# loaded before the process starts, so the console script re-executes itself once with it preloaded.


def preload_environ(environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to re-execute the ``jaxprune`` command in under ``library`` (tcmalloc), or
    None to run as is: no library, ``$JAXPRUNE_ALLOCATOR`` is ``system``, or already preloaded."""
    if library is None or environ.get(ALLOCATOR_ENV, "tcmalloc") == "system":
        return None
    preloaded = [p for p in environ.get("LD_PRELOAD", "").split(":") if p]
    if any(os.path.basename(p).startswith("libtcmalloc") for p in preloaded):
        return None
    return {**environ, "LD_PRELOAD": ":".join([library, *preloaded])}


def entry() -> None:
    """The ``jaxprune`` console script: `main`, under tcmalloc where it is installed."""
    environ = preload_environ(os.environ, ctypes.util.find_library("tcmalloc_minimal"))
    if environ is not None:
        argv = [sys.executable, "-m", "jaxprune.cli", *sys.argv[1:]]
        os.execve(sys.executable, argv, environ)
    main()


if __name__ == "__main__":
    main()
