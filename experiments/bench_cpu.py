"""CPU speed of jaxprune's convolutions and CIFAR models, against PyTorch in the same process.

    python experiments/bench_cpu.py --out results/bench_cpu.json          # full run (the longest)
    python experiments/bench_cpu.py --out /tmp/bench_cpu.json --mode quick   # small sizes (minutes)
    python experiments/bench_cpu.py --out /tmp/bench_cpu.json --mode tiny    # smoke test (seconds)

Sections (all in one JSON file):
  matmul     f32 2048x2048 matmul, GFLOP/s, JAX and PyTorch.
  conv_ops   every convolution shape of CIFAR ResNet-56 and VGG-16 (batch 128): forward, input
             gradient and kernel gradient in GFLOP/s for ``conv2d(impl="xla" | "matmul" | "onednn" |
             "auto")``
             and PyTorch (channels_last, oneDNN). ``xla`` is XLA's own convolution when
             ``jaxprune.cpu.enable()`` could turn YNNPACK's off (``meta.ynn_convolutions_off``),
             else YNNPACK's.
  models     train step (SGD with momentum, batch 128) and inference (batch 256) in images/s and
             minor page faults per call, for ``impl="xla"``, ``"auto"`` and PyTorch eager
             channels_last, of the network and of its uniform 50%-MACs cuts with ``round_to`` 1
             and 8 (realized speed-up against the MACs speed-up). ``auto`` is the CPU layer's
             plan, tuned on the host unless ``JAXPRUNE_CPU_AUTOTUNE=0``: the seconds spent
             tuning while compiling each network (``tuning_s``, zero when the plan cache in
             ``$JAXPRUNE_CACHE_DIR`` already holds its shapes) and the plan (``plan``) are kept.
  layers     where the inference time of each network and of its ``round_to=8`` cut goes: every
             convolution shape's calls, MACs and milliseconds per call of its planned forward form
             timed alone, grouped by output map size, against the whole network timed; the
             difference is everything but the convolutions (BatchNorm, ReLU, residual adds,
             pooling, the head). Why a cut's speed-up falls short of its MACs ratio, per layer.
  malloc     the ``auto`` models and PyTorch's again in one child process per allocator setting
             (the environment must be set before the process starts): glibc's defaults
             (``JAXPRUNE_ALLOCATOR=system``), glibc as ``jaxprune.cpu.enable()`` sets it, glibc
             told to keep freed memory by MALLOC_* variables, and jemalloc or tcmalloc preloaded
             where installed; images/s and page faults per step (``--malloc-settings`` picks some).
             The other sections run with the allocator ``jaxprune.cpu.enable()`` leaves (``meta``).

The script turns jaxprune's CPU layer on (``jaxprune.cpu.enable()``) before any JAX computation.

Timings are medians over rounds that alternate between the variants (A, B, C, A, B, C, ...), so a
neighbour's load on a shared machine hits every variant alike; ratios within one process are the
numbers to trust, absolute numbers move with the machine's load (recorded in ``meta``).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp
import jaxprune.cpu
from jaxprune.cpu import allocator, onednn, tune, xla_cpu
from jaxprune.cpu.plan import report_lines
from jaxprune.ops import conv2d, conv_impl

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # PyTorch is optional: the JAX numbers are still measured
    torch = None


# "onednn" (oneDNN's direct convolution) where the system's oneDNN is there (jaxprune.cpu.onednn;
# loading it starts no JAX backend); "auto" is the CPU layer's plan (oneDNN, Winograd, XLA, dots).
JAX_IMPLS = ("xla", "matmul", "onednn", "auto") if onednn.available() else ("xla", "matmul", "auto")
MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "2147483648"}
# glibc's documented maximum for the mmap threshold (32 MiB on 64-bit), for comparison.
MALLOC_KEEP_32M = {**MALLOC_KEEP, "MALLOC_MMAP_THRESHOLD_": "33554432"}
_LIBDIR = "/usr/lib/x86_64-linux-gnu"
MALLOC_CONFIGS = {
    # glibc's own defaults: jaxprune.cpu.allocator told to leave malloc alone.
    "default": {allocator.ALLOCATOR_ENV: "system"},
    # What jaxprune.cpu.enable() sets through mallopt (jaxprune.cpu.allocator): one arena.
    "jaxprune_enable": {},
    "keep_freed": MALLOC_KEEP,
    # XLA runs on worker threads; glibc caps a thread arena's heap at 64 MiB and serves anything
    # larger with a fresh mmap whatever the threshold, so only one (main) arena keeps it all.
    "keep_freed_one_arena": {**MALLOC_KEEP, "MALLOC_ARENA_MAX": "1"},
    "keep_freed_32m_one_arena": {**MALLOC_KEEP_32M, "MALLOC_ARENA_MAX": "1"},
    # Caching allocators in place of glibc's (Debian packages libjemalloc2, libtcmalloc-minimal4).
    "jemalloc": {"LD_PRELOAD": f"{_LIBDIR}/libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": f"{_LIBDIR}/libtcmalloc_minimal.so.4"},
}

# (c_in, c_out, pixels, kernel, stride, padding), each distinct shape once.
CONV_SHAPES = {
    "resnet56": [
        (3, 16, 32, 3, 1, 1),
        (16, 16, 32, 3, 1, 1),
        (16, 32, 32, 3, 2, 1),
        (16, 32, 32, 1, 2, 0),
        (32, 32, 16, 3, 1, 1),
        (32, 64, 16, 3, 2, 1),
        (32, 64, 16, 1, 2, 0),
        (64, 64, 8, 3, 1, 1),
    ],
    "vgg16": [
        (3, 64, 32, 3, 1, 1),
        (64, 64, 32, 3, 1, 1),
        (64, 128, 16, 3, 1, 1),
        (128, 128, 16, 3, 1, 1),
        (128, 256, 8, 3, 1, 1),
        (256, 256, 8, 3, 1, 1),
        (256, 512, 4, 3, 1, 1),
        (512, 512, 4, 3, 1, 1),
        (512, 512, 2, 3, 1, 1),
    ],
}


# ----------------------------------------------------------------------------------------------
# Timing


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(
    runners: dict[str, Callable[[int], None]], rounds: int, min_round_s: float
) -> dict[str, dict[str, float]]:
    """Median seconds (``s``) and minor page faults (``minflt``) per call of each ``runner(n)`` (n
    calls, then block), and the seconds per call of each round (``rounds_s``).

    Every runner runs once first (compilation, first-touch of its buffers); a round then times
    each runner in turn for about ``min_round_s``.
    """
    calls = {}
    for name, run in runners.items():
        run(1)
        start = time.perf_counter()
        run(1)
        calls[name] = max(1, round(min_round_s / max(time.perf_counter() - start, 1e-6)))
    seconds = {name: [] for name in runners}
    faults = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            n, flt, start = calls[name], _minflt(), time.perf_counter()
            run(n)
            seconds[name].append((time.perf_counter() - start) / n)
            faults[name].append((_minflt() - flt) / n)
    return {
        name: {
            "s": float(np.median(seconds[name])),
            "minflt": float(np.median(faults[name])),
            "rounds_s": [float(t) for t in seconds[name]],
        }
        for name in runners
    }


def _jax_runner(fn: Callable, *args) -> Callable[[int], None]:
    """Blocks on every call: JAX dispatches asynchronously, and independent calls left in flight
    would overlap on the cores where PyTorch's eager calls run one after another."""

    def run(n: int) -> None:
        for _ in range(n):
            jax.block_until_ready(fn(*args))

    return run


def _torch_runner(fn: Callable, *args) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            fn(*args)

    return run


# ----------------------------------------------------------------------------------------------
# Single matmul and convolutions


def bench_matmul(size: int, rounds: int, min_round_s: float) -> dict:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
    runners = {"jax": _jax_runner(jax.jit(lambda a: a @ a), a)}
    if torch is not None:
        ta = torch.from_numpy(np.array(a))
        runners["torch"] = _torch_runner(lambda: ta @ ta)
    times = interleaved(runners, rounds, min_round_s)
    return {k: 2 * size**3 / v["s"] / 1e9 for k, v in times.items()} | {"size": size}


def _jax_conv_fns(impl: str, stride: int, padding: int) -> dict[str, Callable]:
    def conv(x, kernel):
        return conv2d(x, kernel, stride, padding, impl=impl)

    # Fresh lambdas per impl: JAX caches traces per function, and impl is chosen at trace time.
    return {
        "forward": jax.jit(lambda x, kernel, dy: conv(x, kernel)),
        "input_grad": jax.jit(
            lambda x, kernel, dy: jax.vjp(lambda a: conv(a, kernel), x)[1](dy)[0]
        ),
        "kernel_grad": jax.jit(
            lambda x, kernel, dy: jax.vjp(lambda k: conv(x, k), kernel)[1](dy)[0]
        ),
    }


def _torch_conv_fns(x, kernel, dy, stride: int, padding: int) -> dict[str, Callable]:
    tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)  # NCHW view of NHWC = channels_last
    tk = torch.from_numpy(np.array(kernel)).permute(3, 2, 0, 1).contiguous()
    tdy = torch.from_numpy(np.array(dy)).permute(0, 3, 1, 2)

    def backward(mask):
        return torch.ops.aten.convolution_backward(
            tdy, tx, tk, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, mask
        )

    return {
        "forward": lambda: F.conv2d(tx, tk, stride=stride, padding=padding),
        "input_grad": lambda: backward([True, False, False]),
        "kernel_grad": lambda: backward([False, True, False]),
    }


def bench_conv(shape: tuple, batch: int, rounds: int, min_round_s: float) -> dict:
    c_in, c_out, pixels, k, stride, padding = shape
    rng = np.random.default_rng(0)
    out_pixels = (pixels + 2 * padding - k) // stride + 1
    x = jnp.asarray(rng.normal(size=(batch, pixels, pixels, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)) * 0.1, jnp.float32)
    dy = jnp.asarray(rng.normal(size=(batch, out_pixels, out_pixels, c_out)), jnp.float32)
    flop = 2 * batch * out_pixels**2 * c_out * k * k * c_in
    result = {
        "c_in": c_in,
        "c_out": c_out,
        "pixels": pixels,
        "kernel": k,
        "stride": stride,
        "padding": padding,
        "gflops": {},
    }
    fns = {impl: _jax_conv_fns(impl, stride, padding) for impl in JAX_IMPLS}
    torch_fns = _torch_conv_fns(x, kernel, dy, stride, padding) if torch is not None else {}
    for direction in ("forward", "input_grad", "kernel_grad"):
        runners = {impl: _jax_runner(fns[impl][direction], x, kernel, dy) for impl in JAX_IMPLS}
        if torch_fns:
            runners["torch"] = _torch_runner(torch_fns[direction])
        times = interleaved(runners, rounds, min_round_s)
        result["gflops"][direction] = {k: flop / v["s"] / 1e9 for k, v in times.items()}
    _log(f"conv {shape}: {result['gflops']}")
    return result


# ----------------------------------------------------------------------------------------------
# Models


def _jax_model_runners(arch, impls, batch: int, infer_batch: int) -> dict[str, Callable]:
    model = arch.module()
    rng = np.random.default_rng(0)
    h, w, c = arch.input_shape
    x = jnp.asarray(rng.normal(size=(batch, h, w, c)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, arch.num_classes, batch))
    x_infer = jnp.asarray(rng.normal(size=(infer_batch, h, w, c)), jnp.float32)
    variables = model.init(jax.random.key(0), x[:1], train=False)
    tx = optax.sgd(0.1, momentum=0.9)

    def train_step(state, x, labels):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    def infer(variables, x):
        return model.apply(variables, x, train=False)

    runners = {}
    for impl in impls:
        # Each train step donates its state: give every impl its own copy.
        state = [(variables["params"], variables["batch_stats"], tx.init(variables["params"]))]
        state = [jax.tree.map(jnp.copy, state[0])]
        with conv_impl(impl):  # fresh lambdas: traced, hence planned, under this impl
            step = jax.jit(lambda s, x, y: train_step(s, x, y), donate_argnums=0)
            step = step.lower(state[0], x, labels).compile()
            forward = jax.jit(lambda v, x: infer(v, x)).lower(variables, x_infer).compile()

        def run_train(n, step=step, state=state):
            for _ in range(n):
                state[0] = jax.block_until_ready(step(state[0], x, labels))

        runners[f"train/{impl}"] = run_train
        runners[f"infer/{impl}"] = _jax_runner(forward, variables, x_infer)
    return runners


def _torch_model(arch) -> "nn.Module":
    return TorchCifarResNet(arch) if isinstance(arch, jp.models.ResNetArch) else TorchVGG(arch)


def _torch_model_runners(arch, batch: int, infer_batch: int) -> dict[str, Callable]:
    torch.manual_seed(0)
    model = _torch_model(arch).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    h, w, c = arch.input_shape
    x = torch.randn(batch, c, h, w).to(memory_format=torch.channels_last)
    labels = torch.randint(0, arch.num_classes, (batch,))
    x_infer = torch.randn(infer_batch, c, h, w).to(memory_format=torch.channels_last)

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        opt.step()

    def infer():
        model.eval()
        with torch.inference_mode():
            model(x_infer)

    return {"train/torch": _torch_runner(train), "infer/torch": _torch_runner(infer)}


def pruned_archs(arch, macs_ratio: float = 0.5) -> dict[str, tuple]:
    """``{prefix: (arch, macs)}``: the network and its uniform cuts to ``macs_ratio`` of the MACs,
    with ``round_to=1`` (uneven widths, as pruning leaves them) and ``round_to=8``."""
    scores = {g: np.arange(n, dtype=np.float32) for g, n in jp.groups(arch).items()}
    archs = {"": (arch, jp.count_macs(arch))}
    for round_to in (1, 8):
        keep = jp.select.uniform(arch, scores, macs_ratio=macs_ratio, round_to=round_to)
        pruned = arch.resize({g: len(k) for g, k in keep.items()})
        archs[f"pruned_r{round_to}_"] = (pruned, jp.count_macs(pruned))
    return archs


def bench_models(models, batch, infer_batch, rounds, min_round_s, impls, with_torch, prune) -> dict:
    """Images/s and page faults per call of each model (train step and inference), for each JAX
    conv ``impls`` and PyTorch; ``prune`` adds the 50%-MACs uniform cuts of `pruned_archs` with
    their realized speed-up over the full network (``speedup``) and its share of the MACs
    speed-up (``speedup_over_macs_ratio``)."""
    with_torch = with_torch and torch is not None
    results = {}
    for name in models:
        arch = model_arch(name)
        archs = pruned_archs(arch) if prune else {"": (arch, jp.count_macs(arch))}
        runners, extra = {}, {}
        planner = jaxprune.cpu.current_planner()
        for prefix, (a, macs) in archs.items():
            tuned_before = planner.tuning_s
            with planner.recording() as shapes:  # what "auto" plans while compiling
                jax_runners = _jax_model_runners(a, impls, batch, infer_batch)
            extra[prefix + "tuning_s"] = planner.tuning_s - tuned_before
            extra[prefix + "plan"] = report_lines(planner, shapes)
            runners |= {prefix + k: v for k, v in jax_runners.items()}
            extra[prefix + "macs"] = macs
            if with_torch:
                torch_runners = _torch_model_runners(a, batch, infer_batch)
                runners |= {prefix + k: v for k, v in torch_runners.items()}
                torch_params = sum(p.numel() for p in _torch_model(a).parameters())
                extra[prefix + "params"] = {"jax": jp.count_params(a), "torch": torch_params}
                assert torch_params == jp.count_params(a), (name, prefix, extra)
        times = interleaved(runners, rounds, min_round_s)
        entry = {}
        for key, t in times.items():
            n = batch if "train" in key else infer_batch
            entry[key] = {
                "images_per_s": n / t["s"],
                "minflt_per_call": t["minflt"],
                "rounds_images_per_s": [n / s for s in t["rounds_s"]],
            }
        backends = [*impls, "torch"] if with_torch else list(impls)
        for prefix in archs:
            for mode in ("train", "infer"):
                for impl in backends:
                    row = entry[f"{prefix}{mode}/{impl}"]
                    if impl != "torch" and with_torch:
                        torch_row = entry[f"{prefix}{mode}/torch"]
                        row["vs_torch"] = row["images_per_s"] / torch_row["images_per_s"]
                    if prefix:
                        full = entry[f"{mode}/{impl}"]["images_per_s"]
                        row["speedup"] = row["images_per_s"] / full
                        macs_speedup = extra["macs"] / extra[prefix + "macs"]
                        row["speedup_over_macs_ratio"] = row["speedup"] / macs_speedup
        results[name] = entry | extra
        _log(f"model {name}: {entry}")
    return results


def bench_layers(models, infer_batch: int, rounds: int, min_round_s: float) -> dict:
    """Per model, for the network (``original``) and its ``round_to=8`` cut (``pruned_r8``) in
    inference under the ``auto`` plan: ``network_ms`` (the whole jitted forward pass of ``batch``
    images), ``macs`` (of one image) and ``layers``, one entry per convolution shape in network
    order with its ``calls``, ``macs`` per call, planned ``form``, ``ms`` per call (that form
    alone, `jaxprune.cpu.tune.program`) and ``tuned_ms``, every candidate's time when the plan
    measured them (tuned or read from the cache). The networks and every convolution are timed in
    the same interleaved rounds (medians)."""
    planner = jaxprune.cpu.current_planner()
    results = {}
    for name in models:
        arch = model_arch(name)
        nets = pruned_archs(arch)
        entry, runners = {}, {}
        for prefix in ("", "pruned_r8_"):
            net, macs = nets[prefix]
            label = prefix.rstrip("_") or "original"
            model = net.module()
            x = jnp.asarray(
                np.random.default_rng(0).normal(size=(infer_batch, *net.input_shape)), jnp.float32
            )
            variables = model.init(jax.random.key(0), x[:1], train=False)
            with conv_impl("auto"), planner.recording() as calls:
                forward = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False))
                forward = forward.lower(variables, x).compile()
            runners[label] = _jax_runner(forward, variables, x)
            layers = []
            for shape, count in calls.items():
                choice = planner.choose(shape, "forward")
                form = choice.form
                args = tune.operands(shape, np.dtype(shape.dtype))
                compiled = tune.program(shape, "forward", form).lower(*args).compile()
                runners[f"{label} {shape.name}"] = _jax_runner(compiled, *args)
                layers.append(
                    {
                        "shape": shape.name,
                        "out_hw": "x".join(map(str, shape.out_hw)),
                        "calls": count,
                        "macs": shape.macs,
                        "form": form,
                        "tuned_ms": {f: 1e3 * t for f, t in choice.seconds},
                    }
                )
            entry[label] = {"macs": macs, "batch": infer_batch, "layers": layers}
        times = interleaved(runners, rounds, min_round_s)
        for label, net in entry.items():
            net["network_ms"] = 1e3 * times[label]["s"]
            for layer in net["layers"]:
                layer["ms"] = 1e3 * times[f"{label} {layer['shape']}"]["s"]
        results[name] = entry
        _log(f"layers {name}: {entry}")
    return results


def _by_output_maps(net: dict) -> dict[str, dict]:
    """``{"32x32": {"calls", "macs", "ms"}}``: a network's convolutions summed per output map size
    (a CIFAR ResNet's stages), in network order."""
    groups = {}
    for layer in net["layers"]:
        g = groups.setdefault(layer["out_hw"], {"calls": 0, "macs": 0, "ms": 0.0})
        g["calls"] += layer["calls"]
        g["macs"] += layer["calls"] * layer["macs"]
        g["ms"] += layer["calls"] * layer["ms"]
    return groups


def _layers_row(label: str, calls, full: dict, cut: dict) -> str:
    """One row comparing ``{"macs", "ms"}`` of the network (``full``) and of its cut; ``macs``
    None where the row counts none."""
    speedup = full["ms"] / cut["ms"]
    cells = [label, str(calls), "-", "-", f"{full['ms']:.1f} -> {cut['ms']:.1f}", f"{speedup:.2f}x"]
    cells += ["-", "-"]
    if full["macs"]:
        ratio = full["macs"] / cut["macs"]
        cells[2] = f"{full['macs'] / 1e6:.0f} -> {cut['macs'] / 1e6:.0f}"
        cells[3] = f"{ratio:.2f}x"
        cells[6] = f"{speedup / ratio:.2f}"
        cells[7] = " -> ".join(f"{n['macs'] / n['ms'] / 1e6:.0f}" for n in (full, cut))
    return "| " + " | ".join(cells) + " |"


def layers_report(layers: dict) -> list[str]:
    """Markdown: per output map size, the cut's convolution speed-up against its MACs ratio; the
    rest of the network; the whole network; then every shape of both networks."""
    lines = []
    for model, entry in layers.items():
        full, cut = entry["original"], entry["pruned_r8"]
        a, b = _by_output_maps(full), _by_output_maps(cut)
        lines += [
            f"**{model}**, inference (batch {full['batch']}), `auto` plan: the network and its"
            " 50%-MACs `round_to=8` cut",
            "",
            "| layers | convolutions | MACs (M) | MACs ratio | ms | speed-up | of MACs ratio"
            " | GMAC/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for hw in a:
            lines.append(_layers_row(f"convolutions to {hw} maps", a[hw]["calls"], a[hw], b[hw]))
        convs = [{k: sum(g[k] for g in n.values()) for k in ("macs", "ms")} for n in (a, b)]
        calls = sum(g["calls"] for g in a.values())
        lines.append(_layers_row("all convolutions (each timed alone)", calls, *convs))
        pairs = zip((full, cut), convs, strict=True)
        rest = [{"macs": None, "ms": n["network_ms"] - c["ms"]} for n, c in pairs]
        lines.append(_layers_row("everything else (network - convolutions)", "-", *rest))
        whole = [{"macs": n["macs"] * n["batch"], "ms": n["network_ms"]} for n in (full, cut)]
        lines.append(_layers_row("whole network (timed)", "-", *whole))
        lines += [
            "",
            "| network | convolution | calls | form | ms per call | GMAC/s"
            " | candidates when tuned (ms) |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, net in (("original", full), ("pruned_r8", cut)):
            for layer in net["layers"]:
                tuned = ", ".join(f"{f} {t:.2f}" for f, t in layer["tuned_ms"].items()) or "-"
                lines.append(
                    f"| {label} | {layer['shape']} | {layer['calls']} | {layer['form']} | "
                    f"{layer['ms']:.2f} | {layer['macs'] / layer['ms'] / 1e6:.0f} | {tuned} |"
                )
        lines.append("")
    return lines


# PyTorch twins of jaxprune's CIFAR models, built from the same architecture dataclass (so a
# pruned architecture gets a pruned twin); `bench_models` checks the parameter counts agree.
if torch is not None:

    def _conv_bn(c_in: int, c_out: int, k: int, stride: int) -> list:
        return [nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out)]

    class TorchBasicBlock(nn.Module):
        def __init__(self, c_in: int, inner: int, c_out: int, stride: int, projection: bool):
            super().__init__()
            self.body = nn.Sequential(
                *_conv_bn(c_in, inner, 3, stride), nn.ReLU(), *_conv_bn(inner, c_out, 3, 1)
            )
            self.proj = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride)) if projection else None

        def forward(self, x):
            return F.relu(self.body(x) + (x if self.proj is None else self.proj(x)))

    class TorchCifarResNet(nn.Module):
        def __init__(self, arch):
            super().__init__()
            assert arch.block == "basic" and arch.stem == "cifar", "CIFAR basic-block ResNets only"
            self.stem = nn.Sequential(*_conv_bn(3, arch.stem_width, 3, 1), nn.ReLU())
            blocks, c_in = [], arch.stem_width
            for s, c_out in enumerate(arch.stage_widths):
                for b, (inner,) in enumerate(arch.inner_widths[s]):
                    first = b == 0
                    stride = arch.strides[s] if first else 1
                    projection = first and arch.projections[s]
                    blocks.append(TorchBasicBlock(c_in, inner, c_out, stride, projection))
                    c_in = c_out
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Linear(c_in, arch.num_classes)

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    class TorchVGG(nn.Module):
        def __init__(self, arch):
            super().__init__()
            layers, c_in = [], 3
            for s, widths in enumerate(arch.stages):
                if s > 0:
                    layers.append(nn.MaxPool2d(2))
                for width in widths:
                    layers += [*_conv_bn(c_in, width, 3, 1), nn.ReLU()]
                    c_in = width
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(
                nn.Linear(c_in, arch.dense_width),
                nn.BatchNorm1d(arch.dense_width),
                nn.ReLU(),
                nn.Linear(arch.dense_width, arch.num_classes),
            )

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))


# ----------------------------------------------------------------------------------------------
# Driver


def tiny_archs() -> dict:
    """Toy CIFAR-form ResNet and VGG at 8x8 pixels: the ``--tiny`` smoke test's models."""
    return {
        "resnet_tiny": jp.models.ResNetArch(
            block="basic", stem="cifar", stem_width=16, stage_widths=(16, 32),
            inner_widths=(((16,),), ((32,),)), strides=(1, 2), projections=(False, True),
            input_shape=(8, 8, 3), name="resnet_tiny",
        ),
        "vgg_tiny": jp.models.VGGArch(
            stages=((16,), (32,)), dense_width=16, input_shape=(8, 8, 3), name="vgg_tiny"
        ),
    }  # fmt: skip


def model_arch(name: str):
    """A preset of `jaxprune.models` with 10 classes, or one of `tiny_archs`."""
    tiny = tiny_archs()
    return tiny[name] if name in tiny else jp.models.create(name, num_classes=10)


def _settings(mode: str) -> dict:
    if mode == "tiny":  # seconds: what the tests run
        return dict(
            models=list(tiny_archs()), batch=4, infer_batch=4, rounds=1, min_round_s=0.0,
            conv_shapes={"resnet56": [(4, 8, 6, 3, 1, 1), (4, 8, 6, 1, 2, 0)]},
            conv_batch=2, matmul=64,
        )  # fmt: skip
    if mode == "quick":  # minutes: every code path at small sizes
        return dict(
            models=["resnet20", "vgg11"], batch=8, infer_batch=16, rounds=1, min_round_s=0.02,
            conv_shapes={"resnet56": CONV_SHAPES["resnet56"][1:3],
                         "vgg16": CONV_SHAPES["vgg16"][-1:]},
            conv_batch=8, matmul=256,
        )  # fmt: skip
    # 9 rounds (5 until 2026-11-30): a round holds ~3 inference calls of a ResNet-56, and on the
    # shared VM of RESULTS section 3 single rounds of one network spread by +-12% within a run.
    return dict(
        models=["resnet56", "vgg16"], batch=128, infer_batch=256, rounds=9, min_round_s=0.5,
        conv_shapes=CONV_SHAPES, conv_batch=128, matmul=2048,
    )  # fmt: skip


def _child_malloc(args, settings) -> dict:
    """Runs the ``auto`` models and PyTorch's in a child process per malloc configuration."""
    results = {}
    # Each child gets only its setting's allocator variables on top of ours.
    ours = allocator.without_allocator_settings(os.environ)
    chosen = args.malloc_settings.split(",") if args.malloc_settings else list(MALLOC_CONFIGS)
    for label in chosen:
        env = MALLOC_CONFIGS[label]
        if "LD_PRELOAD" in env and not os.path.exists(env["LD_PRELOAD"]):
            _log(f"malloc {label}: {env['LD_PRELOAD']} not installed, skipped")
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, __file__, "--child", out.name, "--mode", args.mode]
            cmd += ["--models", *args.models] if args.models else []
            subprocess.run(cmd, env={**ours, **env}, check=True)
            models = json.loads(Path(out.name).read_text())
            results[label] = {"env": env, "models": models}
    return results


def _meta() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "ynn_convolutions_off": xla_cpu.ynn_convolutions_off(),
        "onednn": onednn.version() if onednn.available() else onednn.unavailable_reason(),
        "glibc_tuned_by_enable": allocator.glibc_tuned(),
        "cpu_model": jaxprune.cpu.tune.machine_key()["cpu"],
        "autotune": jaxprune.cpu.current_planner().autotune,
        "backend": jax.default_backend(),
        "note": "variants interleaved in one process: compare ratios within one run",
    }


def markdown_report(result: dict) -> str:
    """The Markdown tables of RESULTS.md section 3 from a ``--out`` JSON file."""
    lines = []
    mm = result["matmul"]
    cells = ", ".join(f"{k} {v:.0f}" for k, v in mm.items() if k != "size")
    lines += [f"f32 matmul {mm['size']}x{mm['size']}: {cells} GFLOP/s", ""]
    for model, entry in result["models"].items():
        lines += [
            f"**{model}** (train batch {result['settings']['batch']}, inference batch "
            f"{result['settings']['infer_batch']}; MACs speed-up of the cuts: "
            + ", ".join(
                f"{p.rstrip('_')} {entry['macs'] / entry[p + 'macs']:.2f}x"
                for p in ("pruned_r1_", "pruned_r8_")
                if p + "macs" in entry
            )
            + ")",
            "",
            "| network | conv | train img/s | vs torch | speed-up (of MACs ratio) | minor faults"
            " | infer img/s | vs torch | speed-up (of MACs ratio) | minor faults |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        prefixes = [k.removesuffix("macs") for k in entry if k.endswith("macs")]
        impls = [k.split("/")[1] for k in entry if k.startswith("train/")]
        for prefix in prefixes:
            for impl in impls:
                row = [prefix.rstrip("_") or "original", impl]
                for mode in ("train", "infer"):
                    v = entry[f"{prefix}{mode}/{impl}"]
                    share = (
                        f"{v['speedup']:.2f}x ({v['speedup_over_macs_ratio']:.2f})"
                        if "speedup" in v
                        else "-"
                    )
                    vs = f"{v['vs_torch']:.2f}" if "vs_torch" in v else "-"
                    row += [f"{v['images_per_s']:.1f}", vs, share, f"{v['minflt_per_call']:.0f}"]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if "train/torch" in entry and "pruned_r8_infer/auto" in entry:
            r8 = entry["pruned_r8_infer/auto"]
            lines += [
                f"Goals (`auto`): train {entry['train/auto']['vs_torch']:.2f}x and infer "
                f"{entry['infer/auto']['vs_torch']:.2f}x PyTorch (>= 1.0); round_to=8 cut infers "
                f"{r8['speedup']:.2f}x faster, {r8['speedup_over_macs_ratio']:.2f} of its MACs "
                "ratio (>= 0.85).",
                "",
            ]
        if "tuning_s" in entry:
            tuning = ", ".join(
                f"{p.rstrip('_') or 'original'} {entry[p + 'tuning_s']:.1f} s" for p in prefixes
            )
            lines += [f"Tuning the `auto` plan while compiling (train, inference): {tuning}.", ""]
            lines += [f"`auto` plan of the original {model}:", "", *entry["plan"], ""]
    if result["conv_ops"]:
        backends = list(next(iter(result["conv_ops"].values()))[0]["gflops"]["forward"])
        head = " | ".join(f"{d} {b}" for d in ("fwd", "in-grad", "k-grad") for b in backends)
        lines += [
            f"Convolutions, batch {result['settings']['conv_batch']}, GFLOP/s:",
            "",
            f"| net | C_in->C_out, pixels, kernel/stride | {head} |",
            "|---|---|" + "---|" * (3 * len(backends)),
        ]
        for model, rows in result["conv_ops"].items():
            for r in rows:
                shape = "{c_in}->{c_out}, {pixels}x{pixels}, k{kernel}/s{stride}".format(**r)
                cells = [f"{r['gflops'][d][b]:.0f}" for d in r["gflops"] for b in backends]
                lines.append(f"| {model} | {shape} | " + " | ".join(cells) + " |")
        lines.append("")
    if result.get("layers"):
        lines += layers_report(result["layers"])
    if result.get("malloc"):
        lines += [
            "Page faults, `auto` path (and PyTorch where it ran), one child process per malloc"
            " setting:",
            "",
            "| malloc environment | network | conv | train img/s | vs torch | faults/step"
            " | infer img/s | vs torch | faults/call |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, child in result["malloc"].items():
            env = " ".join(f"{k}={v}" for k, v in child["env"].items()) or "(no variables)"
            for model, entry in child["models"].items():
                for impl in ("auto", "torch"):
                    if f"train/{impl}" not in entry:
                        continue
                    cells = []
                    for mode in ("train", "infer"):
                        v = entry[f"{mode}/{impl}"]
                        vs = f"{v['vs_torch']:.2f}" if "vs_torch" in v else "-"
                        cells += [f"{v['images_per_s']:.1f}", vs, f"{v['minflt_per_call']:.0f}"]
                    lines.append(
                        f"| {label}: {env} | {model} | {impl} | " + " | ".join(cells) + " |"
                    )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument(
        "--mode",
        choices=("full", "quick", "tiny"),
        default="full",
        help="full: the table (the longest); quick: small sizes (minutes); tiny: seconds",
    )
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    parser.add_argument("--models", nargs="+", help="networks of the models section (default: all)")
    parser.add_argument(
        "--report", metavar="JSON", help="print the Markdown tables of a results file"
    )
    parser.add_argument(
        "--malloc-settings",
        help="comma-separated settings of the malloc section (default: all): "
        + ",".join(MALLOC_CONFIGS),
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: malloc child process
    args = parser.parse_args(argv)
    unknown = set(filter(None, (args.malloc_settings or "").split(","))) - set(MALLOC_CONFIGS)
    if unknown:
        parser.error(
            f"unknown --malloc-settings {sorted(unknown)}; valid: {', '.join(MALLOC_CONFIGS)}"
        )
    if args.report:
        with open(args.report) as f:
            result = json.load(f)
        print(markdown_report(result))
        return result
    with jaxprune.cpu.enabled(autotune=None):  # the plan as `enable` has it, for this call
        return _run(args, parser)


def _run(args, parser) -> dict:
    s = _settings(args.mode)
    if args.models:
        s["models"] = args.models
    if args.child:
        models = bench_models(
            s["models"], s["batch"], s["infer_batch"], s["rounds"], s["min_round_s"],
            impls=("auto",), with_torch=True, prune=False,
        )  # fmt: skip
        with open(args.child, "w") as f:
            json.dump(models, f)
        return models
    if not args.out:
        parser.error("--out is required")
    skip = set(filter(None, args.skip.split(",")))
    result = {"meta": _meta(), "settings": {k: v for k, v in s.items() if k != "conv_shapes"}}
    result["matmul"] = bench_matmul(s["matmul"], s["rounds"], min(s["min_round_s"], 0.2))
    result["conv_ops"] = {}
    if "conv_ops" not in skip:
        for model, shapes in s["conv_shapes"].items():
            result["conv_ops"][model] = [
                bench_conv(shape, s["conv_batch"], s["rounds"], min(s["min_round_s"], 0.2))
                for shape in shapes
            ]
    result["models"] = {}
    if "models" not in skip:
        result["models"] = bench_models(
            s["models"], s["batch"], s["infer_batch"], s["rounds"], s["min_round_s"],
            impls=("xla", "auto"), with_torch=True, prune=True,
        )  # fmt: skip
    if "layers" not in skip:
        result["layers"] = bench_layers(
            s["models"], s["infer_batch"], s["rounds"], s["min_round_s"]
        )
    if "malloc" not in skip:
        result["malloc"] = _child_malloc(args, s)
    result["meta"]["load_average_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown_report(result))
    return result


if __name__ == "__main__":
    jaxprune.cpu.enable()  # the XLA:CPU flag and malloc settings: before any JAX computation
    main()
