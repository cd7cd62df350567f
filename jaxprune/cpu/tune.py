"""Measuring a convolution's forms on the machine it runs on, and the on-disk cache of the results.

A measurement compiles each candidate form of one direction for one exact shape (batch included) as
a small jitted program, runs it once to warm up, then times it up to `MAX_REPS` times, in rounds
over the candidates, and keeps its fastest run; a candidate already `LOSER_FACTOR` times slower
than the best one so far stops there. The warm-up run also pays one-time costs (oneDNN generates
its kernels on a primitive's first call), so it decides alone only when `COLD_LOSER_FACTOR` times
slower: then it counts as the time. The results are kept in
``$JAXPRUNE_CACHE_DIR/cpu-plan-<key>.json`` (beside the oneDNN library), one file per machine key
(`machine_key`: CPU model and flags, threads, jaxlib, the oneDNN source and the instruction sets it
may use, the XLA:CPU flag), written atomically (a temporary file renamed over it).
"""

import datetime
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import jaxlib
import numpy as np

from jaxprune.cpu import conv, onednn, xla_cpu

MAX_REPS = 3
# A candidate this much slower than the best one so far is timed no further.
LOSER_FACTOR = 1.5
# ... and one whose warm-up run is this much slower is not timed warm at all.
COLD_LOSER_FACTOR = 4.0
# oneDNN's caps on the instruction sets its kernels may use (read once per process).
ONEDNN_ISA_ENV_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# Bumped when the forms or the measurement change, so old caches are not read.
PLAN_VERSION = 2  # 2: warm-up runs judged with COLD_LOSER_FACTOR; warm runs in rounds


def _cpuinfo() -> tuple[str, str]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("", "") where there is none."""
    model = flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name" and not model:
            model = value.strip()
        elif name.strip() == "flags" and not flags:
            flags = value.strip()
    return model, flags


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_key() -> dict:
    """What a measured choice depends on besides the shape: CPU model, its flags (hashed), the
    threads this process may use, jaxlib, the oneDNN library's source, the instruction sets oneDNN
    may use (``ONEDNN_MAX_CPU_ISA``/``DNNL_MAX_CPU_ISA``) and the XLA:CPU flag."""
    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "cpu_flags_sha": hashlib.sha256(flags.encode()).hexdigest()[:12],
        "threads": _threads(),
        "jaxlib": jaxlib.__version__,
        "onednn_source_sha": hashlib.sha256(onednn.SOURCE.read_bytes()).hexdigest()[:12],
        "onednn_max_isa": [os.environ.get(name, "") for name in ONEDNN_ISA_ENV_VARS],
        "ynn_convolutions_off": xla_cpu.ynn_convolutions_off(),
        "plan_version": PLAN_VERSION,
    }


def cache_path(key: Mapping | None = None) -> Path:
    """The cache file of ``key`` (default: the host's) in `jaxprune.cpu.onednn.cache_dir`."""
    text = json.dumps(machine_key() if key is None else dict(key), sort_keys=True)
    return onednn.cache_dir() / f"cpu-plan-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"


def load(path: Path) -> dict:
    """``{entry: {"form", "times_s", ...}}`` stored in ``path``; {} when missing or unreadable."""
    try:
        return json.loads(path.read_text())["choices"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def store(path: Path, entries: Mapping[str, dict]) -> None:
    """Adds ``entries`` to the file at ``path`` (merged with what another process may have written
    meanwhile), atomically: a temporary file in the same folder renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_key(), "choices": {**load(path), **entries}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def operands(shape, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random ``(x, kernel, dy)`` of ``shape`` (a `jaxprune.cpu.plan.ConvShape`) in ``dtype``."""
    rng = np.random.default_rng(0)
    n, h, w, _ = shape.x_shape
    kh, kw, _, c_out = shape.kernel_shape
    h_out = conv.out_size(h, kh, shape.stride, shape.padding)
    w_out = conv.out_size(w, kw, shape.stride, shape.padding)
    x = rng.standard_normal(shape.x_shape, np.float32)
    kernel = rng.standard_normal(shape.kernel_shape, np.float32) * 0.1
    dy = rng.standard_normal((n, h_out, w_out, c_out), np.float32)
    return tuple(jax.device_put(np.asarray(a, dtype)) for a in (x, kernel, dy))


def program(shape, direction: conv.Direction, form: conv.Form):
    """A jitted ``(x, kernel, dy) -> result`` computing ``direction`` by ``form``."""
    s, p = shape.stride, shape.padding
    if direction == "forward":
        return jax.jit(lambda x, k, dy: conv.forward(x, k, s, p, form))
    if direction == "input_grad":
        return jax.jit(lambda x, k, dy: jax.vjp(lambda a: conv.forward(a, k, s, p, form), x)[1](dy))

    def kernel_grad(x, k, dy):
        return jax.vjp(lambda b: conv.kernel_linear(x, b, s, p, form), k)[1](dy)

    return jax.jit(kernel_grad)


def measure(shape, direction: conv.Direction, forms) -> dict[str, float]:
    """Seconds per call of each form in ``forms`` for ``direction`` of ``shape`` (a
    `jaxprune.cpu.plan.ConvShape`); ``inf`` for a form that failed to compile or run.

    Each form is compiled and run once (cold); the warm runs then go round the forms in turn, up to
    `MAX_REPS` rounds, so that a slow spell of the machine hits every candidate alike rather than
    the one being timed (module doc for the forms timed no further). Runs eagerly even when called
    while a function is being traced.
    """
    seconds: dict[str, float] = {}  # cold, then the fastest warm run of those timed warm
    timed = {}  # form -> compiled program, for the forms still timed
    with jax.ensure_compile_time_eval():
        args = operands(shape, np.dtype(shape.dtype))
        for form in forms:
            best_cold = min(seconds.values(), default=float("inf"))
            try:
                compiled = program(shape, direction, form).lower(*args).compile()
                seconds[form] = _seconds(compiled, args)
            except Exception:  # noqa: BLE001 - a candidate that cannot run is not chosen
                seconds[form] = float("inf")
                continue
            if seconds[form] <= COLD_LOSER_FACTOR * best_cold:  # else lost even cold
                timed[form] = compiled
        for rep in range(MAX_REPS):
            best = min(seconds[form] for form in timed) if timed else float("inf")
            for form, compiled in list(timed.items()):
                if rep and seconds[form] > LOSER_FACTOR * best:
                    del timed[form]  # lost: timed no further
                    continue
                warm = _seconds(compiled, args)
                seconds[form] = min(seconds[form], warm) if rep else warm
    return seconds


def _seconds(compiled, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def today() -> str:
    return datetime.date.today().isoformat()
