"""Speed (RESULTS.md section 2d): what pruning buys in wall-clock time, and what importance costs.

For ResNet-56 and VGG-16 (32x32x3) and ResNet-50 (224x224x3), random weights (speed does not
depend on the values), the script measures with `jaxprune.timing`:

* train-step throughput (`jaxprune.train.make_train_step`: forward, backward, SGD update) and
  eval-mode inference throughput of the original network and of two pruned ones, cut to
  ``--macs-ratio`` of its MACs by `select.adaptive` from L1 scores with the default per-group
  normalisation (`importance.DEFAULT_NORMALIZE["l1"]`), with ``round_to=1`` and ``round_to=8``;
  realized speed-up = pruned images/s over original images/s, against the MACs speed-up
  (original MACs over pruned MACs);
* the cost of one GFI pass (`importance.gfi`, defaults, one batch) over one train step;
* the cost of `importance.oracle` for all filters on one batch (ResNet-56 only by default).

Each timing is the median of ``--repeats`` calls after one warm-up call that compiles; the first
call's time (compilation included) is recorded too.

    python experiments/bench.py --out experiments/results/2d.json
    python experiments/bench.py --models resnet56 --repeats 5
    python experiments/bench.py --tiny --out /tmp/2d_tiny.json       # smoke test (seconds)
    python experiments/bench.py --report experiments/results/2d.json # its tables again
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from jaxprune import importance, methods, select, timing, train

# model -> default batch size for a small CPU (ResNet-50 at 224: a small batch, to fit in memory).
BATCH_SIZES = {"resnet56": 32, "vgg16": 32, "resnet50": 8}
ROUNDINGS = (1, 8)


def environment() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    return {
        "date": datetime.date.today().isoformat(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax_version": jax.__version__,
        "jaxprune_conv_impl": os.environ.get("JAXPRUNE_CONV_IMPL"),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def tiny_archs() -> dict[str, Any]:
    """Small stand-ins of the three families (basic ResNet, VGG, bottleneck ResNet), 8x8 inputs."""
    basic = dataclasses.replace(
        jp.models.create("resnet56", 10, (8, 8, 3)),
        stem_width=16,
        stage_widths=(16, 32),
        inner_widths=(((16,),), ((32,),)),
        strides=(1, 2),
        projections=(False, True),
        name="resnet_tiny",
    )
    vgg = dataclasses.replace(
        jp.models.create("vgg16", 10, (8, 8, 3)),
        stages=((16,), (32,)),
        dense_width=16,
        name="vgg_tiny",
    )
    bottleneck = dataclasses.replace(
        jp.models.create("resnet50", 10, (16, 16, 3)),
        stem_width=16,
        stage_widths=(32, 32),
        inner_widths=(((16, 16),), ((16, 16),)),
        strides=(1, 2),
        projections=(True, True),
        name="bottleneck_tiny",
    )
    return {"resnet56": basic, "vgg16": vgg, "resnet50": bottleneck}


def random_variables(arch: Any, seed: int = 0) -> dict:
    x = jnp.zeros((1, *arch.input_shape), jnp.float32)
    return jax.jit(lambda key: arch.module().init(key, x, train=False))(jax.random.key(seed))


def random_batch(arch: Any, batch_size: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch_size, *arch.input_shape)).astype(np.float32)
    labels = rng.integers(0, arch.num_classes, size=(batch_size,)).astype(np.int32)
    return jnp.asarray(images), jnp.asarray(labels)


def timing_record(t: timing.Timing, first_s: float) -> dict[str, Any]:
    return {
        "median_s": t.median_s,
        "images_per_s": t.images_per_s,
        "seconds": list(t.seconds),
        "first_call_s": first_s,
    }


def time_with_first(fn, batch_size: int, repeats: int) -> dict[str, Any]:
    """One first call (compiles; timed) then `timing.time_calls` with no further warm-up."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first_s = time.perf_counter() - start
    return timing_record(timing.time_calls(fn, batch_size, warmup=0, repeats=repeats), first_s)


def train_step_timing(arch: Any, variables: dict, batch_size: int, repeats: int) -> dict:
    """Throughput of the library's jitted train step on one device (state donated, reused)."""
    mesh = train.make_mesh(jax.devices()[:1])
    config = train.OptimizerConfig()
    tx = train.make_optimizer(config)
    step = train.make_train_step(arch, tx, train.make_schedule(config, 1000), mesh)
    # The step donates its state: give it copies, so ``variables`` stay valid for the caller.
    state = [train.state_from_variables(arch, jax.tree.map(jnp.copy, variables), tx, mesh)]
    images, labels = random_batch(arch, batch_size)

    def call():
        state[0], _ = step(state[0], images, labels)
        return state[0]

    return time_with_first(call, batch_size, repeats)


def inference_timing(arch: Any, variables: dict, batch_size: int, repeats: int) -> dict:
    start = time.perf_counter()
    t = timing.inference_timing(arch, variables, batch_size, warmup=1, repeats=repeats)
    # time_calls does not report its warm-up; the first call is the compile-and-run part of it.
    return timing_record(t, time.perf_counter() - start - sum(t.seconds))


def pruned_variant(arch: Any, variables: dict, macs_ratio: float, round_to: int) -> tuple:
    scores = importance.l1(arch, variables)
    keep = select.adaptive(
        arch,
        scores,
        macs_ratio=macs_ratio,
        round_to=round_to,
        normalize=methods.get("l1").normalize,
    )
    return jp.prune(arch, variables, keep)


def bench_model(name: str, arch: Any, args) -> dict:
    batch_size = args.batch_size or BATCH_SIZES[name]
    if args.tiny:
        batch_size = 4
    variables = random_variables(arch)
    macs = jp.count_macs(arch)
    out: dict[str, Any] = {"arch": arch.name, "batch_size": batch_size, "variants": {}}
    variants = {"original": (arch, variables)}
    for round_to in ROUNDINGS:
        variants[f"pruned_round{round_to}"] = pruned_variant(
            arch, variables, args.macs_ratio, round_to
        )
    for label, (a, v) in variants.items():
        print(f"  {name} {label}: train step ...", flush=True)
        record = {
            "macs": jp.count_macs(a),
            "params": jp.count_params(a),
            "macs_ratio": jp.count_macs(a) / macs,
            "widths": jp.groups(a),
            "train_step": train_step_timing(a, v, batch_size, args.repeats),
        }
        print(f"  {name} {label}: inference ...", flush=True)
        record["inference"] = inference_timing(a, v, batch_size, args.repeats)
        out["variants"][label] = record
    base = out["variants"]["original"]
    for record in out["variants"].values():
        record["macs_speedup"] = base["macs"] / record["macs"]
        for kind in ("train_step", "inference"):
            record[f"{kind}_speedup"] = base[kind]["median_s"] / record[kind]["median_s"]

    print(f"  {name}: GFI pass ...", flush=True)
    batch = [random_batch(arch, batch_size)]
    gfi = time_with_first(lambda: importance.gfi(arch, variables, batch), batch_size, args.repeats)
    gfi["per_train_step"] = gfi["median_s"] / base["train_step"]["median_s"]
    out["gfi_pass"] = gfi

    if name in args.oracle_models:
        out["oracle"] = oracle_cost(
            arch,
            variables,
            args,
            base["inference"]["median_s"],
            base["train_step"]["median_s"],
        )
    return out


def oracle_cost(
    arch: Any, variables: dict, args, train_batch_forward_s: float, train_step_s: float
) -> dict:
    """One cold call of the oracle on one batch of ``--oracle-batch`` images, all channels.

    The oracle runs one forward pass per channel; its cost in forward passes of the small batch is
    scaled to the train batch with that batch's measured forward time (an extrapolation).
    """
    batch_size = 4 if args.tiny else args.oracle_batch
    batch = [random_batch(arch, batch_size)]
    forward = inference_timing(arch, variables, batch_size, args.repeats)
    print(f"  oracle: {jp.count_macs(arch)} MACs, {sum(jp.groups(arch).values())} channels ...")
    start = time.perf_counter()
    jax.block_until_ready(importance.oracle(arch, variables, batch))
    oracle_s = time.perf_counter() - start
    channels = sum(jp.groups(arch).values())
    equivalent = oracle_s / forward["median_s"]
    return {
        "batch_size": batch_size,
        "channels": channels,
        "seconds_one_call": oracle_s,
        "forward_median_s": forward["median_s"],
        "forward_passes_equivalent": equivalent,
        "note": "one cold call (compilation included): channels + 1 forward passes of the batch",
        # Extrapolation, not a measurement: the same number of forward passes at the train batch.
        "extrapolated_s_at_train_batch": equivalent * train_batch_forward_s,
        "extrapolated_train_steps": equivalent * train_batch_forward_s / train_step_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--models", nargs="+", default=list(BATCH_SIZES), choices=BATCH_SIZES)
    parser.add_argument("--batch-size", type=int, help="for all models (default: per model)")
    parser.add_argument("--macs-ratio", type=float, default=0.5, help="fraction of MACs kept")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--oracle-models", nargs="*", default=["resnet56"])
    parser.add_argument("--oracle-batch", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke version")
    parser.add_argument(
        "--report", nargs="+", metavar="JSON", help="print the tables of results files and exit"
    )
    args = parser.parse_args(argv)
    if args.report:
        records = [json.loads(Path(path).read_text()) for path in args.report]
        for record in records:
            print_tables(record)
        return records[0] if len(records) == 1 else {"reports": records}
    if args.tiny:
        args.repeats = 2

    start = time.perf_counter()
    archs = tiny_archs() if args.tiny else {m: jp.models.create(m) for m in BATCH_SIZES}
    record = {
        "experiment": "2d speed",
        "command": " ".join(["python", "experiments/bench.py", *(argv or sys.argv[1:])]),
        "environment": environment(),
        "scores": "importance.l1 on the random weights, normalize=DEFAULT_NORMALIZE['l1'] (mean)",
        "policy": "select.adaptive",
        "macs_ratio_target": args.macs_ratio,
        "repeats": args.repeats,
        "models": {},
    }
    for name in args.models:
        print(f"{name} ...", flush=True)
        record["models"][name] = bench_model(name, archs[name], args)
        record["total_s"] = time.perf_counter() - start
        if args.out:  # after every model: a long run that is cut short keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=1))
    print_tables(record)
    return record


def print_tables(record: dict) -> None:
    print(
        "\n| model | variant | batch | MACs (M) | params (M) | MACs speed-up | train img/s "
        "| train speed-up | infer img/s | infer speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, m in record["models"].items():
        for label, v in m["variants"].items():
            print(
                f"| {name} | {label} | {m['batch_size']} | {v['macs'] / 1e6:.1f} | "
                f"{v['params'] / 1e6:.3f} | {v['macs_speedup']:.2f} | "
                f"{v['train_step']['images_per_s']:.1f} | {v['train_step_speedup']:.2f} | "
                f"{v['inference']['images_per_s']:.1f} | {v['inference_speedup']:.2f} |"
            )
    print("\n| model | GFI pass s | train step s | GFI / train step |")
    print("|---|---|---|---|")
    for name, m in record["models"].items():
        step_s = m["variants"]["original"]["train_step"]["median_s"]
        g = m["gfi_pass"]
        print(f"| {name} | {g['median_s']:.3f} | {step_s:.3f} | {g['per_train_step']:.2f} |")
    for name, m in record["models"].items():
        if "oracle" in m:
            o = m["oracle"]
            print(
                f"\noracle {name}: {o['channels']} channels, batch {o['batch_size']}: "
                f"{o['seconds_one_call']:.1f} s = {o['forward_passes_equivalent']:.0f} forward "
                f"passes ({o['forward_median_s'] * 1e3:.1f} ms each); extrapolated to batch "
                f"{m['batch_size']}: {o['extrapolated_s_at_train_batch']:.0f} s = "
                f"{o['extrapolated_train_steps']:.0f} train steps"
            )


if __name__ == "__main__":
    main()
