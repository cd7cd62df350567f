"""2f: how well a pruned network recovers, and which part of the recipe decides it.

A task users compare against Torch-Pruning on, run as the CLI runs it: ResNet-20 on
Fashion-MNIST, a 3-epoch baseline, one cut to 50% of the MACs, 1 epoch of fine-tuning at a peak
learning rate of 0.02. For each baseline recipe (the library's augmented one, and one without
augmentation) and each method, the loss of accuracy from the baseline after the fine-tune is
recorded for the fine-tuning the library did before these runs and for one change at a time:

    augmented         the library's fine-tuning before 2f: augmented batches (as the baseline's
                      training), carried optimizer state, cosine schedule after a 5% warm-up,
                      BatchNorm re-estimated on 40 batches after the cut
    unaugmented       fine-tuning batches not augmented (the library's default since 2f)
    fresh_optimizer   augmented, with zero momentum at the cut instead of the sliced state
    constant_lr       augmented, with a constant rate after the warm-up instead of the cosine
    no_recalibration  augmented, without re-estimating BatchNorm's statistics after the cut

    python experiments/recovery.py --seeds 0 --out experiments/results/2f_recovery.json
    python experiments/recovery.py --tiny --out /tmp/2f_tiny.json                   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jaxprune import pipeline
from jaxprune.train.optim import OptimizerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import compare_methods  # noqa: E402  (its method variants and their pruning)

# One change at a time to the fine-tuning the library did before 2f ("augmented"): (finetune
# keywords, optimizer changes, re-estimate BatchNorm after the cut).
FINETUNES: dict[str, tuple[dict, dict, bool]] = {
    "augmented": ({"augment": True}, {}, True),
    "unaugmented": ({"augment": False}, {}, True),
    "fresh_optimizer": ({"augment": True, "fresh_optimizer": True}, {}, True),
    "constant_lr": ({"augment": True}, {"schedule": "constant"}, True),
    "no_recalibration": ({"augment": True}, {}, False),
}
RECIPES = {"augmented": True, "unaugmented": False}
METHOD_VARIANTS = {
    "l1_uniform": compare_methods.VARIANTS["l1_uniform"],
    "l1_global": compare_methods.Variant("l1"),
    "taylor_fo_bn": compare_methods.VARIANTS["taylor_fo_bn"],
    "gfi": compare_methods.VARIANTS["gfi"],
    # The control: nothing cut (a MACs budget of 1.0), the same fine-tuning of the baseline itself.
    "unpruned": compare_methods.Variant("l1", policy="uniform", max_pruning_ratio=None),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--methods", nargs="+", default=list(METHOD_VARIANTS), choices=METHOD_VARIANTS)
    p.add_argument(
        "--finetunes",
        nargs="+",
        default=list(FINETUNES),
        choices=list(FINETUNES),
        help="on the augmented baseline; the unaugmented one gets 'unaugmented' only",
    )
    p.add_argument("--macs-ratio", type=float, default=0.5, help="fraction of the MACs kept")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate of training")
    p.add_argument("--finetune-lr", type=float, default=0.02)
    p.add_argument("--cpu-layer", action="store_true", help="turn on jaxprune.cpu first")
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
    p.add_argument("--out", default="recovery.json")
    p.add_argument("--report", nargs="+", metavar="JSON", help="print a Markdown table")
    p.add_argument("--tiny", action="store_true", help="smoke run: synthetic data, lenet5")
    args = p.parse_args(argv)
    # What compare_methods.prune_variant reads.
    args.score_batches, args.authors_batches = None, None
    args.recalibrate_batches = pipeline.DEFAULT_RECALIBRATE_BATCHES
    args.finetune_steps = None  # (single-round variants only)
    if args.tiny:
        args.model, args.data, args.seeds = "lenet5", "synthetic", [0]
        args.batch_size, args.score_batches, args.recalibrate_batches = 16, 1, 1
        args.methods, args.finetunes = ["l1_global", "gfi"], ["unaugmented", "fresh_optimizer"]
    return args


def _train_config(args, recipe: str, seed: int) -> pipeline.TrainConfig:
    """The baseline: ``--train-epochs`` (2 steps with ``--tiny``) of the default SGD recipe."""
    return pipeline.TrainConfig(
        model=args.model,
        data=args.data,
        num_steps=2 if args.tiny else None,
        num_epochs=None if args.tiny else args.train_epochs,
        batch_size=args.batch_size,
        seed=seed,
        augment=RECIPES[recipe],
        optimizer=OptimizerConfig(learning_rate=args.lr),
        synthetic=_common.synthetic_options(args),
        data_dir=args.data_dir,
    )


def run(args: argparse.Namespace, partial=None) -> dict:
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="recovery_"))
    rows, baselines = [], []
    started = time.perf_counter()
    for seed in args.seeds:
        for recipe in args.recipes:
            base = root / f"seed{seed}" / recipe / "baseline"
            trained = pipeline.train(_train_config(args, recipe, seed), base, progress=False)
            baselines.append({"seed": seed, "recipe": recipe, "accuracy": trained["accuracy"]})
            print(f"seed {seed} {recipe}: baseline {trained['accuracy']:.4f}", flush=True)
            finetunes = args.finetunes if recipe == "augmented" else ["unaugmented"]
            for name in args.methods:
                variant = METHOD_VARIANTS[name]
                cuts: dict[bool, tuple[Path, dict]] = {}
                for finetune in finetunes:
                    keywords, changes, recalibrate = FINETUNES[finetune]
                    if recalibrate not in cuts:
                        cut = base.parent / f"{name}_cut_recal{int(recalibrate)}"
                        record = compare_methods.prune_variant(
                            args,
                            base,
                            cut,
                            dataclasses.replace(variant, recalibrate=recalibrate),
                            1.0 if name == "unpruned" else args.macs_ratio,
                        )
                        cuts[recalibrate] = cut, record
                    cut, record = cuts[recalibrate]
                    out = base.parent / f"{name}_{finetune}"
                    if out.exists():
                        shutil.rmtree(out)
                    shutil.copytree(cut, out)
                    t0 = time.perf_counter()
                    tuned = pipeline.finetune(
                        out,
                        num_steps=1 if args.tiny else None,
                        num_epochs=None if args.tiny else args.finetune_epochs,
                        optimizer_changes={"learning_rate": args.finetune_lr, **changes},
                        progress=False,
                        verbose=False,
                        **keywords,
                    )
                    row = {
                        "seed": seed,
                        "recipe": recipe,
                        "method": name,
                        "finetune": finetune,
                        "macs_ratio": record["macs_after"] / record["macs_before"],
                        "baseline": trained["accuracy"],
                        "accuracy_after_cut": record["accuracy_after"],
                        "accuracy": tuned["accuracy"],
                        "loss_pt": 100 * (trained["accuracy"] - tuned["accuracy"]),
                        "finetune_s": time.perf_counter() - t0,
                    }
                    rows.append(row)
                    print(
                        f"  {name:<13}{finetune:<17} MACs kept {row['macs_ratio']:.3f} after the "
                        f"cut {row['accuracy_after_cut']:.4f} fine-tuned {row['accuracy']:.4f} "
                        f"(-{row['loss_pt']:.2f} pt)",
                        flush=True,
                    )
                    if partial is not None:
                        partial(record_of(args, started, baselines, rows, complete=False))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return record_of(args, started, baselines, rows, complete=True)


def record_of(args, started, baselines, rows, complete) -> dict:
    return _common.record(
        "2f: recovery after pruning (ResNet-20, 3 epochs, 50% of the MACs, 1 epoch fine-tune)",
        _common.settings_of(args),
        started,
        complete,
        baselines=baselines,
        runs=rows,
        summary=summarize(rows),
    )


def summarize(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (recipe, method, finetune)."""
    keys = dict.fromkeys((r["recipe"], r["method"], r["finetune"]) for r in rows)
    out = []
    for recipe, method, finetune in keys:
        key = (recipe, method, finetune)
        sel = [r for r in rows if (r["recipe"], r["method"], r["finetune"]) == key]
        out.append(
            {
                "recipe": recipe,
                "method": method,
                "finetune": finetune,
                "baseline": statistics.fmean(r["baseline"] for r in sel),
                "accuracy_after_cut": statistics.fmean(r["accuracy_after_cut"] for r in sel),
                "accuracy": statistics.fmean(r["accuracy"] for r in sel),
                "loss_pt": statistics.fmean(r["loss_pt"] for r in sel),
                "num_seeds": len(sel),
            }
        )
    return out


_ROW = (
    "| {recipe} | {method} | {finetune} | {baseline:.4f} | {accuracy_after_cut:.4f} "
    "| {accuracy:.4f} | {loss_pt:.2f} | {num_seeds} |"
)


def markdown_table(result: dict) -> str:
    lines = [
        "| baseline recipe | method | fine-tuning | baseline | after the cut | fine-tuned "
        "| loss (pt) | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [_ROW.format(**s) for s in result["summary"]])


def merge_records(records: list[dict]) -> dict:
    rows = [row for r in records for row in r["runs"]]
    return {
        **records[0],
        "complete": all(r["complete"] for r in records),
        "wall_s": sum(r["wall_s"] for r in records),
        "baselines": [b for r in records for b in r["baselines"]],
        "runs": rows,
        "summary": summarize(rows),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.cpu_layer and not args.report:
        import jaxprune.cpu

        jaxprune.cpu.enable()
    return _common.main(args, run, markdown_table, markdown_table, merge=merge_records)


if __name__ == "__main__":
    main()
