"""jp.trace on user-style models: tracing time and the measured speed-up of the pruned programs.

    python experiments/bench_trace.py --json experiments/results/5_bench_trace.json
    python experiments/bench_trace.py --tiny          # smoke test (small widths, seconds)

For a torchvision-style ResNet-18 (widths 64-512, projection shortcuts) and a MobileNetV2 (the
paper's table, CIFAR strides), both linen, on 32x32 inputs: the time of ``jp.trace`` (the first
trace and the analysis), then the unpruned ``model.apply`` and the pruned ``apply2`` at about 50%
of every group's channels kept (``select.uniform(ratio=0.5)`` of L1 scores), each jitted,
inference (BatchNorm in eval mode) on a batch of 64. Timings are medians over rounds alternating
full and pruned, so a neighbour's load hits both alike. XLA's own flops of both compiled
programs are reported beside the MACs (the pruned program is narrower, not masked).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jaxprune as jp  # noqa: E402
from tests import trace_models as tm  # noqa: E402


def _models(tiny: bool):
    if tiny:
        return {"resnet18": tm.ResNet18(), "mobilenetv2": tm.MobileNetV2()}
    return {
        "resnet18": tm.ResNet18(widths=(64, 128, 256, 512)),
        "mobilenetv2": tm.MobileNetV2(config=tm.MOBILENETV2_CIFAR),
    }


def _median_seconds(fns: dict, args: dict, rounds: int) -> dict:
    for name, fn in fns.items():  # compile and warm up
        jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_model(name: str, model, batch: int, rounds: int) -> dict:
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    start = time.perf_counter()
    net = jp.trace(model.apply, variables, x, name=name)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    jp.trace(model.apply, variables, x, name=name)
    retrace_s = time.perf_counter() - start
    keep = jp.select.uniform(net, jp.importance.l1(net, variables), ratio=0.5)
    start = time.perf_counter()
    apply2, variables2 = net.prune(variables, keep)
    prune_s = time.perf_counter() - start
    full, pruned = jax.jit(model.apply), jax.jit(apply2)
    flops = {
        "full": full.lower(variables, x).compile().cost_analysis()["flops"],
        "pruned": pruned.lower(variables2, x).compile().cost_analysis()["flops"],
    }
    seconds = _median_seconds(
        {"full": full, "pruned": pruned},
        {"full": (variables, x), "pruned": (variables2, x)},
        rounds,
    )
    macs = {"full": jp.count_macs(net), "pruned": jp.count_macs(jp.trace(apply2, variables2, x))}
    kept = sum(len(k) for k in keep.values()) / sum(net.groups.values())
    return {
        "model": name,
        "groups": len(net.groups),
        "channels_kept": kept,
        "trace_s": trace_s,
        "trace_again_s": retrace_s,
        "prune_s": prune_s,
        "macs_per_image": macs,
        "params": {
            "full": jp.count_params(net),
            "pruned": jp.count_params(jp.trace(apply2, variables2, x)),
        },
        "xla_flops_per_batch": flops,
        "inference_s_per_batch": seconds,
        "images_per_s": {k: batch / v for k, v in seconds.items()},
        "speedup": seconds["full"] / seconds["pruned"],
        "macs_ratio": macs["full"] / macs["pruned"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="small widths, batch 4, 2 rounds")
    args = parser.parse_args(argv)
    batch, rounds = (4, 2) if args.tiny else (args.batch, args.rounds)
    results = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "jax": jax.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "batch": batch,
            "rounds": rounds,
        },
        "models": [bench_model(n, m, batch, rounds) for n, m in _models(args.tiny).items()],
    }
    results["meta"]["loadavg_end"] = os.getloadavg()
    for r in results["models"]:
        print(
            f"{r['model']:12s} trace {r['trace_s']:.2f}s (again {r['trace_again_s']:.2f}s) "
            f"kept {r['channels_kept']:.2f} MACs {r['macs_ratio']:.2f}x fewer, "
            f"{r['inference_s_per_batch']['full'] * 1e3:.1f} -> "
            f"{r['inference_s_per_batch']['pruned'] * 1e3:.1f} ms/batch: {r['speedup']:.2f}x"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
