"""2b: FSABP on LeNet-5, backward vs forward order and vs L1 at equal params.

A LeNet-5 baseline is trained with `jaxprune.pipeline.train`. For every accuracy-drop tolerance,
`jaxprune.select.backward` (FSABP: from the last convolution back to the first) and
`jaxprune.select.forward` (the first conv first) prune the conv groups one by one with the
``fsabp`` criterion (filter similarity: distance to the nearest other filter), keeping the
smallest width whose accuracy on a held-out slice stays within the tolerance of the unpruned
network's (``--all-groups`` prunes the dense layers too, first). L1-norm pruning then gets
exactly the parameter count backward FSABP kept (`select.uniform` and `select.adaptive` with
``params_ratio``). Every pruned
network is cut from the baseline with `jaxprune.pipeline.prune_to` and fine-tuned for the same
number of steps with `jaxprune.pipeline.finetune`; test accuracy is reported before and after.

    python experiments/fsabp_lenet.py --out experiments/results/2b.json
    python experiments/fsabp_lenet.py --tiny --out /tmp/2b_tiny.json      # smoke test

References:
  Geng & Niu 2022, Pruning convolutional neural networks via filter similarity analysis
  (FSABP), Machine Learning 111. Li et al. 2017 (L1-norm filter pruning), ICLR.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import data, importance, methods, pipeline, select
from jaxprune.flops import count_macs, count_params
from jaxprune.graph import Architecture, groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (what the experiment scripts share)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tolerances", nargs="+", type=float, default=[0.005, 0.01, 0.02, 0.05])
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate of training")
    p.add_argument("--finetune-lr", type=float, default=0.005)
    p.add_argument(
        "--heldout-examples",
        type=int,
        default=5000,
        help="the first N training examples (unaugmented) judge the tolerance",
    )
    p.add_argument(
        "--all-groups",
        action="store_true",
        help="also prune the dense layers (fc1, fc2 first, backward); default: the convolutions "
        "only, backward from the last conv, as the paper describes FSABP",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
    p.add_argument("--out", default="results.json")
    p.add_argument("--report", metavar="JSON", help="print a Markdown table of a results file")
    p.add_argument(
        "--tiny", action="store_true", help="seconds-long smoke run: synthetic data, conv groups"
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.data, args.train_steps, args.finetune_steps = "synthetic", 2, 1
        args.tolerances, args.batch_size, args.heldout_examples = [0.1], 16, 32
    return args


@functools.lru_cache(maxsize=32)
def _predict(arch: Architecture):
    model = arch.module()
    return jax.jit(lambda variables, x: jnp.argmax(model.apply(variables, x, train=False), -1))


def accuracy(arch: Architecture, variables, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``images`` classified as ``labels`` (batches of 1000, to bound memory)."""
    correct = 0
    for i in range(0, len(labels), 1000):
        predicted = _predict(arch)(variables, jnp.asarray(images[i : i + 1000]))
        correct += int(jnp.sum(predicted == jnp.asarray(labels[i : i + 1000])))
    return correct / len(labels)


def split_arrays(dataset, split: data.Split, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` examples of ``split``, in order, with the eval transform, normalized."""
    images, labels = [], []
    for x, y, mask in data.eval_batches(dataset, global_batch_size=1000, split=split):
        images.append(np.asarray(data.normalize(x, dataset.mean, dataset.std))[mask])
        labels.append(y[mask])
    images, labels = np.concatenate(images), np.concatenate(labels)
    return images[:limit], labels[:limit]


def run(args: argparse.Namespace, partial=None) -> dict:
    """Runs every tolerance; ``partial(record)`` (if given) receives the record after each row."""
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fsabp_"))
    dataset = _common.load_dataset(args)
    started = time.perf_counter()
    config = _common.baseline_config(args, "lenet5", args.seed, log_every=100)
    base = root / "baseline"
    t0 = time.perf_counter()
    trained = pipeline.train(config, base, progress=False)
    train_s = time.perf_counter() - t0
    arch, variables = pipeline.load(base)
    heldout = split_arrays(dataset, data.Split.TRAIN, args.heldout_examples)
    test = split_arrays(dataset, data.Split.TEST, None)
    base_params, base_macs = count_params(arch), count_macs(arch)
    baseline = {
        "accuracy": trained["accuracy"],
        "heldout_accuracy": accuracy(arch, variables, *heldout),
        "params": base_params,
        "macs": base_macs,
        "widths": groups(arch),
        "train_s": train_s,
    }
    print(
        f"baseline lenet5: test {baseline['accuracy']:.4f}, held-out "
        f"{baseline['heldout_accuracy']:.4f}, {base_params:,} params",
        flush=True,
    )

    def evaluate(a, v):
        return accuracy(a, v, *heldout)

    def criterion(a, v):
        return importance.fsabp(a, v)

    prune_groups = (
        list(groups(arch)) if args.all_groups else select.conv_groups(arch)
    )  # forward order
    l1_scores = jax.device_get(importance.l1(arch, variables))
    rows = []
    n = 0

    def finish(name: str, tolerance: float, keep: dict, extra: dict) -> dict:
        nonlocal n
        n += 1
        out = root / f"{n:02d}_{name}"
        _common.prune_to(base, out, keep)
        pruned_arch, pruned_variables = pipeline.load(out)
        row = {
            "method": name,
            "tolerance": tolerance,
            "params": count_params(pruned_arch),
            "params_removed": 1 - count_params(pruned_arch) / base_params,
            "macs": count_macs(pruned_arch),
            "macs_removed": 1 - count_macs(pruned_arch) / base_macs,
            "widths": groups(pruned_arch),
            "heldout_accuracy": evaluate(pruned_arch, pruned_variables),
            "test_accuracy_pruned": accuracy(pruned_arch, pruned_variables, *test),
            **extra,
        }
        tuned = _common.finetune(args, out)
        row["test_accuracy_finetuned"] = tuned["accuracy"]
        rows.append(row)
        if partial is not None:
            partial(record_of(args, started, prune_groups, baseline, rows, complete=False))
        print(
            f"  tol {tolerance:<6} {name:<15} params removed {row['params_removed']:.3f}  "
            f"held-out {row['heldout_accuracy']:.4f}  test {row['test_accuracy_pruned']:.4f} "
            f"-> fine-tuned {row['test_accuracy_finetuned']:.4f}",
            flush=True,
        )
        return row

    for tolerance in args.tolerances:
        kept_params = None
        procedures = (("fsabp_backward", select.backward), ("fsabp_forward", select.forward))
        for name, procedure in procedures:
            t0 = time.perf_counter()
            result = procedure(
                arch,
                variables,
                criterion,
                evaluate,
                tolerance,
                groups_to_prune=prune_groups,
            )
            search_s = time.perf_counter() - t0
            log = [
                {
                    "group": s.group,
                    "channels_before": s.channels_before,
                    "channels_kept": s.channels_kept,
                    "heldout_accuracy": s.accuracy,
                    "evaluations": s.evaluations,
                }
                for s in result.log
            ]
            row = finish(name, tolerance, result.keep, {"search_s": search_s, "log": log})
            if name == "fsabp_backward":
                kept_params = row["params"] / base_params
        # L1 at backward FSABP's parameter count (its kept fraction of the baseline's params).
        for name, keep in (
            ("l1_uniform", select.uniform(arch, l1_scores, params_ratio=kept_params)),
            (
                "l1_adaptive",
                select.adaptive(
                    arch,
                    l1_scores,
                    params_ratio=kept_params,
                    normalize=methods.get("l1").normalize,
                ),
            ),
        ):
            finish(name, tolerance, keep, {"params_ratio_target": kept_params})
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return record_of(args, started, prune_groups, baseline, rows, complete=True)


def record_of(args, started, prune_groups, baseline, rows, complete: bool) -> dict:
    return _common.record(
        "2b: FSABP backward vs forward vs L1 at equal params, LeNet-5",
        {**_common.settings_of(args), "groups": prune_groups},
        started,
        complete,
        baseline=baseline,
        runs=rows,
    )


def format_table(result: dict) -> str:
    b = result["baseline"]
    lines = [
        f"{'tol':>6} {'method':<15}{'params':>8}{'removed':>9}{'held-out':>9}"
        f"{'test':>8}{'test ft':>9}  widths",
        f"{'-':>6} {'baseline':<15}{b['params']:>8}{0:>9.3f}{b['heldout_accuracy']:>9.4f}"
        f"{b['accuracy']:>8.4f}{'-':>9}  {tuple(b['widths'].values())}",
    ]
    for r in result["runs"]:
        lines.append(
            f"{r['tolerance']:>6} {r['method']:<15}{r['params']:>8}{r['params_removed']:>9.3f}"
            f"{r['heldout_accuracy']:>9.4f}{r['test_accuracy_pruned']:>8.4f}"
            f"{r['test_accuracy_finetuned']:>9.4f}  {tuple(r['widths'].values())}"
        )
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    b = result["baseline"]
    lines = [
        "| tolerance | method | params | params removed | MACs removed | held-out acc "
        "| test acc (pruned) | test acc (fine-tuned) | widths conv1, conv2, fc1, fc2 |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| - | baseline | {b['params']} | 0 | 0 | {b['heldout_accuracy']:.4f} "
        f"| {b['accuracy']:.4f} | - | {', '.join(map(str, b['widths'].values()))} |",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['tolerance']} | {r['method']} | {r['params']} | {r['params_removed']:.3f} "
            f"| {r['macs_removed']:.3f} | {r['heldout_accuracy']:.4f} "
            f"| {r['test_accuracy_pruned']:.4f} | {r['test_accuracy_finetuned']:.4f} "
            f"| {', '.join(map(str, r['widths'].values()))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return _common.main(parse_args(argv), run, format_table, markdown_table)


if __name__ == "__main__":
    main()
