"""2a: GFI-AP (the authors' protocol and the recommended form) vs uniform L1 vs Taylor-FO-BN at
equal MACs, after equal fine-tuning, with the ablation of the selection options.

For every model and seed, one baseline is trained with `jaxprune.pipeline.train`. Every variant is
a `jaxprune.methods` entry with selection overrides, run through `jaxprune.pipeline.prune` (score,
select, cut, re-estimate BatchNorm) and fine-tuned with `jaxprune.pipeline.finetune` for the same
number of steps. Recorded per run: the accuracy right after the cut, after BatchNorm's statistics
are re-estimated (both before any fine-tuning: collapse shows there), and after fine-tuning, on the
whole test split, and the smallest fraction of any group kept.

    python experiments/compare_methods.py --out experiments/results/2a.json          # full grid
    python experiments/compare_methods.py --tiny --out /tmp/2a_tiny.json             # smoke test

References:
  Mondal et al. 2022 (GFI-AP), Computer Vision and Image Understanding.
  Molchanov et al. 2019 (Taylor-FO-BN), CVPR. Li et al. 2017 (L1-norm filter pruning), ICLR.
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

from jaxprune import methods, pipeline
from jaxprune.flops import count_macs, count_params
from jaxprune.graph import groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (what the experiment scripts share)

CAP = methods.DEFAULT_MAX_PRUNING_RATIO


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registry method with selection overrides (None: the method's default)."""

    method: str | methods.Method
    policy: str | None = None
    max_pruning_ratio: float | None = CAP
    prunable: tuple[str, ...] | str | None = None  # ("*",): every group; "authors": theirs
    ranking: str | None = None
    rounds: int = 1
    recalibrate: bool = True
    num_batches: str | None = None  # "authors": --authors-batches; None: --score-batches


VARIANTS: dict[str, Variant] = {
    "l1_uniform": Variant("l1", policy="uniform", max_pruning_ratio=None),
    "taylor_fo_bn": Variant("taylor_fo_bn"),
    "gfi_ap_authors": Variant("gfi_ap_authors", max_pruning_ratio=None, num_batches="authors"),
    # GFI-AP's gradient ranking as the library ran it before the selection options (ablation):
    # raw scores, every group, no cap, no BatchNorm re-estimation.
    "gfi_global_raw": Variant(
        dataclasses.replace(methods.get("gfi"), name="gfi_raw", normalize=None),
        max_pruning_ratio=None,
        prunable=("*",),
        recalibrate=False,
    ),
    # + per-group normalisation, the cap and BatchNorm re-estimation (every group): the registry's
    # `gfi` since 2026-11-30, which the runs before it call "gfi_global"
    "gfi": Variant("gfi"),
    "gfi_global": Variant("gfi", prunable=("*",)),
    # the same over the authors' layers only (the registry's `gfi` in the 2026-11-30 2a runs)
    "gfi_authors_layers": Variant("gfi", prunable="authors"),
    "gfi_cost": Variant("gfi", ranking="score_per_cost"),
    "gfi_no_recalibration": Variant("gfi", recalibrate=False),
    "gfi_rounds3": Variant("gfi", rounds=3),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "vgg16"])
    p.add_argument(
        "--methods",
        nargs="+",
        default=[
            v for v in VARIANTS if v not in ("gfi_global", "gfi_rounds3", "gfi_no_recalibration")
        ],
        choices=list(VARIANTS),
    )
    p.add_argument(
        "--macs-ratios",
        nargs="+",
        type=float,
        default=[0.7, 0.5, 0.3],
        help="fractions of the MACs KEPT (0.7 = 30%% removed)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-steps", type=int, default=4690, help="baseline (default 10 epochs)")
    p.add_argument("--finetune-steps", type=int, default=1407, help="each pruned model (3 epochs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate of training")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument(
        "--finetune-augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="augmented fine-tuning batches, as in every 2a run so far (the library's fine-tuning "
        "default is unaugmented since 2f)",
    )
    p.add_argument(
        "--score-batches", type=int, default=None, help="scoring batches (default: the method's)"
    )
    p.add_argument(
        "--authors-batches",
        type=int,
        default=None,
        help="augmented batches gfi_ap_authors scores on (default: one epoch, the authors')",
    )
    p.add_argument(
        "--recalibrate-batches",
        type=int,
        default=pipeline.DEFAULT_RECALIBRATE_BATCHES,
        help="BatchNorm re-estimation batches after the cut (variants that re-estimate)",
    )
    p.add_argument(
        "--cpu-layer",
        action="store_true",
        help="turn on jaxprune's CPU speed layer first (as the jaxprune command does); "
        "accuracies do not depend on it",
    )
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
    p.add_argument("--out", default="results.json")
    p.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="print a Markdown table of results files (runs of several files are pooled)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="smoke run: synthetic data, lenet5, gfi and l1_uniform, two ratios",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.seeds, args.macs_ratios = ["lenet5"], [0], [0.7, 0.4]
        args.data, args.train_steps, args.finetune_steps = "synthetic", 2, 1
        args.batch_size, args.score_batches, args.authors_batches = 16, 1, 1
        if args.methods == p.get_default("methods"):
            args.methods = ["gfi", "l1_uniform"]
    return args


def prune_variant(args, base: Path, out: Path, variant: Variant, ratio: float) -> dict:
    """`pipeline.prune` of ``base`` into ``out`` (replacing an earlier run) as ``variant`` says."""
    if out.exists():
        shutil.rmtree(out)
    return pipeline.prune(
        base,
        out,
        variant.method,
        pipeline.Budget("macs", ratio),
        policy=variant.policy,
        max_pruning_ratio=variant.max_pruning_ratio,
        prunable=methods.authors_layers(pipeline.load(base)[0])
        if variant.prunable == "authors"
        else variant.prunable,
        ranking=variant.ranking,
        num_batches=args.authors_batches
        if variant.num_batches == "authors"
        else args.score_batches,
        recalibrate_batches=args.recalibrate_batches if variant.recalibrate else 0,
        rounds=variant.rounds,
        round_steps=max(1, args.finetune_steps // variant.rounds) if variant.rounds > 1 else None,
        verbose=False,
    )


def run(args: argparse.Namespace, partial=None) -> dict:
    """Runs the grid; ``partial(record)`` (if given) receives the record after every run."""
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="compare_"))
    _common.load_dataset(args)
    rows, baselines = [], []
    started = time.perf_counter()
    for model in args.models:
        for seed in args.seeds:
            config = _common.baseline_config(args, model, seed, log_every=50)
            base = root / model / f"seed{seed}" / "baseline"
            t0 = time.perf_counter()
            trained = pipeline.train(config, base, progress=False)
            arch, variables = pipeline.load(base)
            baselines.append(
                {
                    "model": model,
                    "seed": seed,
                    "accuracy": trained["accuracy"],
                    "macs": count_macs(arch),
                    "params": count_params(arch),
                    "train_s": time.perf_counter() - t0,
                }
            )
            print(f"{model} seed {seed}: baseline accuracy {trained['accuracy']:.4f}", flush=True)
            # Budgets outermost: a run cut short still holds every method at the finished budgets.
            for ratio in args.macs_ratios:
                for name in args.methods:
                    variant = VARIANTS[name]
                    out = root / model / f"seed{seed}" / f"{name}_{ratio}"
                    t0 = time.perf_counter()
                    record = prune_variant(args, base, out, variant, ratio)
                    prune_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    tuned = _common.finetune(args, out)
                    # against the baseline (the record of a run in rounds says so too since
                    # 2026-11-30; before, it described the last round's input)
                    before, after = dict(groups(arch)), record["widths_after"]
                    row = {
                        "model": model,
                        "seed": seed,
                        "method": name,
                        "variant": {
                            **dataclasses.asdict(variant),
                            "method": methods.get(variant.method).name,
                            "normalize": methods.get(variant.method).normalize,
                        },
                        "macs_ratio_target": ratio,
                        "macs": record["macs_after"],
                        "macs_ratio": record["macs_after"] / count_macs(arch),
                        "params": record["params_after"],
                        "widths": after,
                        "min_width_fraction": min(after[g] / before[g] for g in before),
                        "bound_by_rules": record.get("bound_by_rules", []),
                        "accuracy_at_cut": record.get("accuracy_at_cut", record["accuracy_after"]),
                        "accuracy_recalibrated": record["accuracy_after"],
                        "accuracy": tuned["accuracy"],
                        "prune_s": prune_s,
                        "finetune_s": time.perf_counter() - t0,
                    }
                    rows.append(row)
                    print(
                        f"  {name:<15} MACs kept {row['macs_ratio']:.3f} accuracy at the cut "
                        f"{row['accuracy_at_cut']:.4f}, BN re-estimated "
                        f"{row['accuracy_recalibrated']:.4f}, fine-tuned {row['accuracy']:.4f}",
                        flush=True,
                    )
                    if partial is not None:
                        partial(record_of(args, started, baselines, rows, complete=False))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return record_of(args, started, baselines, rows, complete=True)


def record_of(args, started: float, baselines: list, rows: list, complete: bool) -> dict:
    return _common.record(
        "2a: GFI-AP vs uniform L1 vs Taylor-FO-BN at equal MACs",
        _common.settings_of(args),
        started,
        complete,
        baselines=baselines,
        runs=rows,
        summary=summarize(rows, baselines),
    )


def summarize(rows: list[dict], baselines: list[dict]) -> list[dict]:
    """Mean (and sample std over seeds, when several) per (model, method, ratio)."""
    out = []
    for b_model in dict.fromkeys(b["model"] for b in baselines):
        base_acc = [b["accuracy"] for b in baselines if b["model"] == b_model]
        out.append(_stats(b_model, "baseline", 1.0, base_acc, [1.0]))
        out[-1].update(accuracy_at_cut=None, accuracy_recalibrated=None, min_width_fraction=1.0)
        keys = dict.fromkeys(
            (r["method"], r["macs_ratio_target"]) for r in rows if r["model"] == b_model
        )
        for method, ratio in keys:
            sel = [
                r
                for r in rows
                if (r["model"], r["method"], r["macs_ratio_target"]) == (b_model, method, ratio)
            ]
            out.append(
                _stats(
                    b_model,
                    method,
                    ratio,
                    [r["accuracy"] for r in sel],
                    [r["macs_ratio"] for r in sel],
                )
            )
            out[-1].update(
                {
                    key: statistics.fmean(r[key] for r in sel) if key in sel[0] else None
                    for key in ("accuracy_at_cut", "accuracy_recalibrated")
                },
                min_width_fraction=min(r.get("min_width_fraction", 0.0) for r in sel),
            )
    return out


def _stats(model, method, target, accuracies, macs_ratios) -> dict:
    return {
        "model": model,
        "method": method,
        "macs_ratio_target": target,
        "macs_ratio": statistics.fmean(macs_ratios),
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
        "num_seeds": len(accuracies),
    }


_TEXT_ROW = "{model:<10}{method:<16}{macs_ratio:>10}{accuracy:>10}{std:>8}{seeds:>6}"
_MARKDOWN_ROW = (
    "| {model} | {method} | {target} | {macs_ratio} | {at_cut} | {recalibrated} | {accuracy} "
    "| {std} | {min_width} | {seeds} |"
)


def _cells(s: dict) -> dict[str, str]:
    """One row of the summary as the text both tables show (``_TEXT_ROW``, ``_MARKDOWN_ROW``)."""
    return {
        "model": s["model"],
        "method": s["method"],
        "target": f"{s['macs_ratio_target']:.2f}",
        "macs_ratio": f"{s['macs_ratio']:.3f}",
        "accuracy": f"{s['accuracy_mean']:.4f}",
        "std": "-" if s["accuracy_std"] is None else f"{s['accuracy_std']:.4f}",
        "seeds": str(s["num_seeds"]),
        "at_cut": _percent(s.get("accuracy_at_cut")),
        "recalibrated": _percent(s.get("accuracy_recalibrated")),
        "min_width": f"{s.get('min_width_fraction', 0.0):.2f}",
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(summary: list[dict]) -> str:
    header = _TEXT_ROW.format(
        model="model",
        method="method",
        macs_ratio="MACs kept",
        accuracy="accuracy",
        std="std",
        seeds="seeds",
    )
    return "\n".join([header, *(_TEXT_ROW.format(**_cells(s)) for s in summary)])


def markdown_table(result: dict) -> str:
    """Markdown table of the summary, budgets in the order 70%, 50%, 30% of the MACs kept."""
    rows = sorted(result["summary"], key=lambda s: (s["model"], -s["macs_ratio_target"]))
    lines = [
        "| model | method | MACs kept (target) | MACs kept | at the cut | BN re-estimated "
        "| fine-tuned | std | smallest group kept | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [_MARKDOWN_ROW.format(**_cells(s)) for s in rows])


def merge_records(records: list[dict]) -> dict:
    """One record of several runs' records (e.g. one process per seed): their baselines and runs
    pooled, the summary recomputed; settings, machine and date of the first, wall time summed."""
    baselines = [b for r in records for b in r["baselines"]]
    runs = [row for r in records for row in r["runs"]]
    return {
        **records[0],
        "complete": all(r["complete"] for r in records),
        "wall_s": sum(r["wall_s"] for r in records),
        "baselines": baselines,
        "runs": runs,
        "summary": summarize(runs, baselines),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.cpu_layer and not args.report:
        import jaxprune.cpu

        jaxprune.cpu.enable()
    return _common.main(
        args,
        run,
        lambda result: format_table(result["summary"]),
        markdown_table,
        merge=merge_records,
    )


if __name__ == "__main__":
    main()
