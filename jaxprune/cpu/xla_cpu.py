"""Two XLA:CPU slow paths jaxprune avoids: YNNPACK convolutions and recomputed residual streams.

1. XLA:CPU (jaxlib 0.10) hands convolutions to YNNPACK by default. For the kernel gradient, the
direction a train step spends most time in, that path runs at 6-41 GFLOP/s on CIFAR ResNet-56's
layers, where XLA's own (Eigen) convolution runs at 13-132 (experiments/bench_cpu.py, RESULTS.md
section 3). Removing only the ``individual_convolution`` type from
``--xla_cpu_experimental_ynn_fusion_type`` keeps YNNPACK's other fusions (dots, elementwise).

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so `configure` (run by
`jaxprune.cpu.enable`) can only act before any JAX computation ran. It
appends the flag to ``XLA_FLAGS`` unless: ``JAXPRUNE_XLA_CPU_FLAGS=0`` is set, the user's
``XLA_FLAGS`` already set that flag (theirs is kept), the jaxlib version is not one where the flag
was measured (an unknown flag aborts the process), or a backend already started. Results never
depend on it: the CPU convolution plan (`jaxprune.cpu.plan`) asks `ynn_convolutions_off` and
picks the fastest form for either setting. The flag only concerns CPU compilations; GPU and TPU
ignore it.

2. XLA:CPU fuses chains of cheap elementwise operations into every consumer, duplicating them, and
removes ``lax.optimization_barrier``. Through a residual stream (``x = relu(x + bn(conv(x)))``
block after block) each fusion of the backward pass then recomputes the stream from the stage's
first block: fusions of up to 52 operands in ResNet-56's gradient, and a backward pass 3x slower
than its convolutions alone. `materialize` marks a value XLA must read from memory instead.
"""

import os
from collections.abc import Mapping, MutableMapping

import jax
import jaxlib
from jax import lax

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "-individual_convolution"
OPT_OUT_ENV = "JAXPRUNE_XLA_CPU_FLAGS"
# jaxlib (major, minor) versions whose XLA knows FLAG with this meaning (measured on 0.10.2).
TESTED_JAXLIB = ((0, 10),)

_state = {"ynn_convolutions_off": False}


def _jaxlib_major_minor() -> tuple[int, int]:
    major, minor, *_ = jaxlib.__version__.split(".")
    return int(major), int(minor)


def backend_started() -> bool:
    """Whether a JAX backend started (then it has read ``XLA_FLAGS`` and started its threads)."""
    from jax._src import xla_bridge  # private: kept inside jaxprune.cpu

    return bool(xla_bridge._backends)


def _user_value(xla_flags: str) -> str | None:
    """The value the user gave FLAG in ``xla_flags`` (last one wins, as in XLA), else None."""
    value = None
    for token in xla_flags.split():
        if token == FLAG or token.startswith(FLAG + "="):
            value = token.partition("=")[2]
    return value


def _turns_convolutions_off(value: str) -> bool:
    """Whether a FLAG value leaves YNNPACK's ``individual_convolution`` type off.

    A list of ``+name`` / ``-name`` edits the default list (which includes convolutions); a plain
    list replaces it.
    """
    items = [item for item in value.split(",") if item]
    if items and all(item[0] in "+-" for item in items):
        return "-individual_convolution" in items
    return "individual_convolution" not in items


def flag_applies(environ: Mapping[str, str], jaxlib_version: tuple[int, int] | None = None) -> bool:
    """Whether `configure` would append FLAG before a backend starts: the user set neither FLAG
    nor ``JAXPRUNE_XLA_CPU_FLAGS=0``, and jaxlib is one where FLAG was measured."""
    return (
        _user_value(environ.get("XLA_FLAGS", "")) is None
        and environ.get(OPT_OUT_ENV, "1") != "0"
        and (jaxlib_version or _jaxlib_major_minor()) in TESTED_JAXLIB
    )


def configure(
    environ: MutableMapping[str, str] = os.environ,
    *,
    jaxlib_version: tuple[int, int] | None = None,
    backend_started: bool | None = None,
) -> bool:
    """Turns XLA's YNNPACK convolutions off for this process where it still can (see module doc).

    Returns (and records for `ynn_convolutions_off`) whether they are off for this process.
    """
    xla_flags = environ.get("XLA_FLAGS", "")
    started = backend_started() if backend_started is None else backend_started
    user_value = _user_value(xla_flags)
    if user_value is not None:
        off = _turns_convolutions_off(user_value)
    elif started or not flag_applies(environ, jaxlib_version):
        off = False
    else:
        environ["XLA_FLAGS"] = f"{xla_flags} {FLAG}={VALUE}".strip()
        off = True
    _state["ynn_convolutions_off"] = off
    return off


def ynn_convolutions_off() -> bool:
    """Whether XLA:CPU runs its own convolutions (not YNNPACK's) in this process."""
    return _state["ynn_convolutions_off"]


def materialize(x: jax.Array) -> jax.Array:
    """``x`` itself (value and gradient exactly); on CPU, never recomputed inside its consumers.

    XLA duplicates cheap producers into consumers but not a division, so ``x`` is divided by a
    1.0 that XLA cannot fold (it depends on ``x``'s first element, through a comparison, without
    a gradient). On other backends ``x`` is returned untouched.
    """
    if jax.default_backend() != "cpu":
        return x
    first = lax.stop_gradient(x.reshape(-1)[0])
    one = 1 + 0 * (first > 0).astype(x.dtype)  # exactly 1 for every value of `first`, NaN too
    return x / one
