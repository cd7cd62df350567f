"""What experiment scripts 2a and 2b share: data, baseline, pruning and fine-tuning, record, main.

The scripts run as ``python experiments/NAME.py`` and are imported from their files by the tests;
either way they put this directory on ``sys.path`` and ``import _common``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax

from jaxprune import data, pipeline
from jaxprune.train.optim import OptimizerConfig

# ``--data synthetic`` (the ``--tiny`` runs): a few Fashion-MNIST-shaped examples.
SYNTHETIC = data.SyntheticOptions(image_shape=(28, 28, 1), num_train=64, num_test=32)


def synthetic_options(args: argparse.Namespace) -> data.SyntheticOptions | None:
    return SYNTHETIC if args.data == "synthetic" else None


def load_dataset(args: argparse.Namespace) -> data.Dataset:
    """The dataset of ``--data`` and ``--data-dir``."""
    return data.load_dataset(args.data, data_dir=args.data_dir, synthetic=synthetic_options(args))


def baseline_config(
    args: argparse.Namespace, model: str, seed: int, log_every: int
) -> pipeline.TrainConfig:
    """The baseline's training run, from the flags the scripts share.

    ``--data``, ``--data-dir``, ``--train-steps``, ``--batch-size`` and ``--lr`` (the peak SGD
    learning rate); a metrics row every ``log_every`` steps (or every step of a shorter run).
    """
    return pipeline.TrainConfig(
        model=model,
        data=args.data,
        num_steps=args.train_steps,
        batch_size=args.batch_size,
        seed=seed,
        optimizer=OptimizerConfig(learning_rate=args.lr),
        synthetic=synthetic_options(args),
        data_dir=args.data_dir,
        log_every=max(1, min(log_every, args.train_steps)),
    )


def prune_to(base: Path, out: Path, keep: dict) -> dict:
    """`pipeline.prune_to` from the baseline ``base`` into ``out`` (replacing an earlier run)."""
    if out.exists():
        shutil.rmtree(out)
    return pipeline.prune_to(base, out, keep, evaluate_before_after=False, verbose=False)


def finetune(args: argparse.Namespace, out: Path) -> dict:
    """Fine-tunes ``out`` as every method is: ``--finetune-steps`` at ``--finetune-lr``, with
    ``--finetune-augment`` where the script has it (else the library's default: unaugmented)."""
    return pipeline.finetune(
        out,
        num_steps=args.finetune_steps,
        optimizer_changes={"learning_rate": args.finetune_lr},
        augment=getattr(args, "finetune_augment", None),
        progress=False,
        verbose=False,
    )


def settings_of(args: argparse.Namespace) -> dict:
    """The command line as a record's settings (``--out`` left out: the record is that file)."""
    return {k: v for k, v in vars(args).items() if k != "out"}


def record(experiment: str, settings: dict, started: float, complete: bool, **fields) -> dict:
    """An experiment's record: what, its settings, the machine, date and wall time, then ``fields``.

    ``started`` is the `time.perf_counter` of the start; ``complete`` is False for the records
    written while the run goes on.
    """
    return {
        "experiment": experiment,
        "complete": complete,
        "settings": settings,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "devices": [d.device_kind for d in jax.devices()],
            "jax": jax.__version__,
        },
        "date": datetime.date.today().isoformat(),
        "wall_s": time.perf_counter() - started,
        **fields,
    }


def main(
    args: argparse.Namespace,
    run: Callable[..., dict],
    text_table: Callable[[dict], str],
    markdown_table: Callable[[dict], str],
    merge: Callable[[list[dict]], dict] | None = None,
) -> dict:
    """Runs an experiment script's command line.

    With ``--report JSON [JSON ...]`` prints ``markdown_table`` of that results file (of
    ``merge`` of several, e.g. seeds run as separate processes). Otherwise calls
    ``run(args, partial=write)``, which writes the record to ``--out`` after every row (so a run
    cut short keeps its finished rows), writes the final record, and prints ``text_table`` of it.

    Returns:
      The record read or written.
    """
    if args.report:
        reports = args.report if isinstance(args.report, list) else [args.report]
        records = [json.loads(Path(path).read_text()) for path in reports]
        if len(records) > 1 and merge is None:
            raise SystemExit("error: this script reports one results file at a time")
        result = merge(records) if len(records) > 1 else records[0]
        print(markdown_table(result))
        return result
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def write(snapshot: dict) -> None:
        Path(args.out).write_text(json.dumps(snapshot, indent=1))

    result = run(args, partial=write)
    write(result)
    print(text_table(result))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return result
