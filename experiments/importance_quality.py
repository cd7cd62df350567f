"""Importance quality (RESULTS.md section 2c): how well each criterion ranks channels like the
oracle.

For a trained ResNet-20 on Fashion-MNIST, every criterion of `jaxprune.importance.CRITERIA` (GFI
in its three forms, Taylor-FO-BN, L1, L2, FPGM, FSABP, random) is computed on the same batches and
compared with `importance.oracle` (the exact loss increase when one channel alone is removed) by
Spearman's rho (`importance.agreement`): per group, and pooled over all channels (raw scores, and
after the per-group normalisation `select.adaptive` applies by default,
`importance.DEFAULT_NORMALIZE`). The reference is both the signed oracle (the loss increase a
pruning step causes) and its absolute value (what magnitude criteria such as |gradient| estimate).
Each criterion's wall time is measured cold (first call: tracing + compilation + run) and warm
(a second call, compiled).

    python experiments/importance_quality.py --out experiments/results/2c.json
    python experiments/importance_quality.py --workdir /tmp/r20 --num-batches 2   # reuse a run
    python experiments/importance_quality.py --tiny --out /tmp/2c_tiny.json       # smoke test

Without ``--workdir`` the script trains ResNet-20 with `jaxprune.pipeline.train` for
``--train-steps`` steps first. ``--tiny`` replaces all of that with a small untrained ResNet on
synthetic 8x8 images (seconds; for the tests).

References:
  Molchanov, Mallya, Tyree, Frosio, Kautz. Importance estimation for neural network pruning.
  CVPR 2019 (Spearman correlation with the removal oracle as the measure of a criterion).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import jaxprune as jp
from jaxprune import data, importance, methods, pipeline, select

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import environment  # noqa: E402  (the scripts' shared machine record)

# label -> (name in importance.CRITERIA, options). Every criterion once, GFI in its three forms.
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "gfi_gradient_o1": ("gfi", {"signal": "gradient", "order": 1}),
    "gfi_gradient_o2": ("gfi", {"signal": "gradient", "order": 2}),
    "gfi_activation": ("gfi", {"signal": "activation"}),
    "taylor_fo_bn": ("taylor_fo_bn", {}),
    "l1": ("l1", {}),
    "l2": ("l2", {}),
    "fpgm": ("fpgm", {}),
    "fsabp": ("fsabp", {}),
    "random": ("random", {}),
}


def tiny_arch() -> Any:
    """A two-stage basic-block ResNet on 8x8x1 images: every group kind of ResNet-20, small."""
    return dataclasses.replace(
        jp.models.create("resnet20", 10, (8, 8, 1)),
        stem_width=8,
        stage_widths=(8, 16),
        inner_widths=(((8,),), ((16,),)),
        strides=(1, 2),
        projections=(False, True),
        name="resnet_tiny",
    )


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall time in seconds, outputs ready."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def as_numpy(scores: dict[str, Any]) -> dict[str, np.ndarray]:
    return {g: np.asarray(v, np.float64) for g, v in scores.items()}


def nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def model_and_batches(args) -> tuple[Any, dict, list, dict]:
    """(arch, variables, batches, provenance) for the run ``args`` asks for."""
    if args.tiny:
        arch = tiny_arch()
        variables = arch.module().init(
            jax.random.key(0), np.zeros((1, *arch.input_shape), np.float32), train=False
        )
        dataset = data.load_dataset(
            "synthetic",
            synthetic=data.SyntheticOptions(
                image_shape=arch.input_shape, num_train=64, num_test=64
            ),
        )
        provenance = {"trained": False, "data": "synthetic 8x8x1", "workdir": None}
    else:
        workdir = args.workdir
        provenance = {"trained": True, "data": args.data}
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="importance_quality_")
            config = pipeline.TrainConfig(
                model="resnet20",
                data=args.data,
                num_steps=args.train_steps,
                batch_size=128,
                seed=args.seed,
            )
            _, provenance["train_s"] = timed(pipeline.train, config, workdir, progress=False)
        provenance["workdir"] = str(workdir)
        provenance["test_metrics"] = pipeline.evaluate(workdir)
        arch, variables = pipeline.load(workdir)
        dataset = data.load_dataset(args.data)
    batches = []
    for images, labels, mask in data.eval_batches(
        dataset, global_batch_size=args.batch_size, split=data.Split.TEST
    ):
        if len(batches) == args.num_batches:
            break
        if mask.all():
            batches.append((data.normalize(images, dataset.mean, dataset.std), labels))
    if len(batches) < args.num_batches:
        raise SystemExit(f"the test split holds only {len(batches)} full batches")
    return arch, variables, batches, provenance


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--workdir", help="a trained ResNet-20 run to reuse (else train one)")
    parser.add_argument("--data", default="fashion_mnist", help="the workdir's dataset")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--num-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--oracle-chunk", type=int, default=32, help="oracle's chunk_size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke version")
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_batches, args.batch_size = 1, 8

    start = time.perf_counter()
    arch, variables, batches, provenance = model_and_batches(args)
    print(
        f"{arch.name}: {sum(jp.groups(arch).values())} channels in {len(jp.groups(arch))} "
        f"groups; {args.num_batches} batches of {args.batch_size} test images"
    )

    oracle, oracle_s = timed(
        importance.oracle, arch, variables, batches, chunk_size=args.oracle_chunk
    )
    oracle = as_numpy(oracle)
    print(f"oracle: {oracle_s:.1f} s (one cold call)")
    abs_oracle = {g: np.abs(v) for g, v in oracle.items()}

    results = {}
    for label, (name, options) in RUNS.items():
        criterion = importance.CRITERIA[name]
        scores, cold_s = timed(criterion, arch, variables, batches, **options)
        _, warm_s = timed(criterion, arch, variables, batches, **options)
        scores = as_numpy(scores)
        if set(scores) != set(oracle) or any(scores[g].shape != oracle[g].shape for g in oracle):
            raise AssertionError(f"{label}: scores do not have the groups' structure")
        normalize = methods.get(name).normalize
        normalized = select.normalize_scores(scores, normalize)
        signed, absolute = (importance.agreement(scores, ref) for ref in (oracle, abs_oracle))
        results[label] = {
            "criterion": name,
            "options": options,
            "cold_s": cold_s,
            "warm_s": warm_s,
            "normalize": None if normalize is None else str(normalize),
            "per_group_signed": {g: nan_to_none(r) for g, r in signed.per_group.items()},
            "per_group_abs": {g: nan_to_none(r) for g, r in absolute.per_group.items()},
            "mean_per_group_signed": nan_to_none(np.nanmean(list(signed.per_group.values()))),
            "mean_per_group_abs": nan_to_none(np.nanmean(list(absolute.per_group.values()))),
            "pooled_signed": nan_to_none(signed.pooled),
            "pooled_abs": nan_to_none(absolute.pooled),
            "pooled_normalized_signed": nan_to_none(
                importance.agreement(normalized, oracle).pooled
            ),
            "pooled_normalized_abs": nan_to_none(
                importance.agreement(normalized, abs_oracle).pooled
            ),
        }
        print(f"{label}: cold {cold_s:.2f} s, warm {warm_s:.2f} s")

    record = {
        "experiment": "2c importance quality",
        "command": " ".join(
            ["python", "experiments/importance_quality.py", *(argv or sys.argv[1:])]
        ),
        "environment": environment(),
        "model": arch.name,
        "groups": jp.groups(arch),
        "num_batches": args.num_batches,
        "batch_size": args.batch_size,
        "provenance": provenance,
        "oracle": {
            "cold_s": oracle_s,
            "chunk_size": args.oracle_chunk,
            "fraction_negative": float(np.mean(np.concatenate(list(oracle.values())) < 0)),
            "scores": {g: v.tolist() for g, v in oracle.items()},
        },
        "criteria": results,
        "total_s": time.perf_counter() - start,
    }
    print_tables(record)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    return record


def fmt(x: float | None, digits: int = 3) -> str:
    return "nan" if x is None else f"{x:+.{digits}f}"


def print_tables(record: dict) -> None:
    """Markdown tables: pooled and mean rho with times; per-group rho against the signed oracle."""
    criteria = record["criteria"]
    print(
        "\n| criterion | pooled rho (signed) | pooled rho (abs) | pooled, normalized (signed) "
        "| mean per-group rho (signed) | mean per-group rho (abs) | cold s | warm s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, r in criteria.items():
        print(
            f"| {label} | {fmt(r['pooled_signed'])} | {fmt(r['pooled_abs'])} | "
            f"{fmt(r['pooled_normalized_signed'])} | {fmt(r['mean_per_group_signed'])} | "
            f"{fmt(r['mean_per_group_abs'])} | {r['cold_s']:.2f} | {r['warm_s']:.2f} |"
        )
    print(f"| oracle (reference) | | | | | | {record['oracle']['cold_s']:.2f} | |")
    labels = list(criteria)
    print("\nper-group rho against the signed oracle\n")
    print("| group | n | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for g, n in record["groups"].items():
        row = " | ".join(fmt(criteria[label]["per_group_signed"][g], 2) for label in labels)
        print(f"| {g} | {n} | {row} |")


if __name__ == "__main__":
    main()
