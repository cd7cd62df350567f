"""jaxprune's CPU speed layer, off until a program turns it on with `enable()`.

    import jaxprune.cpu
    jaxprune.cpu.enable()      # first thing, before any JAX computation

`enable` does three things (importing this package does none of them):

1. the XLA:CPU flag that gives convolutions back to XLA's own kernels instead of YNNPACK's
   (`jaxprune.cpu.xla_cpu`; appended to ``XLA_FLAGS``, read by XLA when its backend starts);
2. glibc's malloc settings that keep XLA's per-step buffers mapped (`jaxprune.cpu.allocator`,
   through ``mallopt``; ``JAXPRUNE_ALLOCATOR=system`` leaves malloc alone);
3. installs the CPU convolution plan behind `jaxprune.ops.conv2d` (each direction of each
   convolution on XLA, matrix products, oneDNN or Winograd: `jaxprune.cpu.conv`, chosen by
   measurement on the host or by thresholds: `jaxprune.cpu.plan`) and `materialize`'s
   residual-stream workaround behind `jaxprune.ops.materialize`.

(1) and (2) can only act before JAX's backend starts. Called later, `enable` leaves them off,
warns (`LateEnableWarning`) where they would have applied, and still installs (3), whose plan then
adapts to YNNPACK's convolutions. Off CPU, (1) and (3) change nothing (the flag concerns CPU
compilations; the plan is `lax.conv_general_dilated` on other backends) and (2) is skipped.
The plan is read at trace time: functions traced before `enable` keep plain `lax` convolutions.

Environment: ``JAXPRUNE_CONV_IMPL=xla`` (XLA's convolution everywhere), ``JAXPRUNE_ONEDNN=0`` (no
oneDNN library), ``JAXPRUNE_ALLOCATOR=system``, ``JAXPRUNE_XLA_CPU_FLAGS=0``,
``JAXPRUNE_CPU_AUTOTUNE=0`` (thresholds instead of measurements),
``JAXPRUNE_CPU_AUTOTUNE_BUDGET_S`` (tuning seconds per process), ``JAXPRUNE_CACHE_DIR``.
"""

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator

from jaxprune import ops
from jaxprune.cpu import allocator, conv, xla_cpu
from jaxprune.cpu.plan import Planner, report_lines, trace_shapes

__all__ = [
    "CpuBackend",
    "LateEnableWarning",
    "Status",
    "describe",
    "disable",
    "enable",
    "current_planner",
    "enabled",
    "plan_report",
]


class LateEnableWarning(RuntimeWarning):
    """`enable` ran after JAX's backend started: the XLA flag and malloc settings are off."""


@dataclasses.dataclass(frozen=True)
class Status:
    """What `enable` put in effect.

    Attributes:
      xla_own_convolutions: XLA:CPU runs its own convolutions, not YNNPACK's.
      glibc_tuned: the malloc settings of `jaxprune.cpu.allocator` are applied.
      autotune: the plan measures (else thresholds).
      late: JAX's backend had started before `enable`.
    """

    xla_own_convolutions: bool
    glibc_tuned: bool
    autotune: bool
    late: bool


@dataclasses.dataclass(frozen=True, eq=False)
class CpuBackend(ops.Backend):
    """The `jaxprune.ops.Backend` `enable` installs, with the planner it asks."""

    planner: Planner | None = None


def _backend(planner: Planner) -> CpuBackend:
    def conv2d(x, kernel, stride, padding, impl):
        return conv.conv2d(x, kernel, stride, padding, impl, planner)

    return CpuBackend("cpu", conv2d, xla_cpu.materialize, planner)


def enable(*, autotune: bool | None = None, budget_s: float | None = None) -> Status:
    """Turns the CPU layer on for this process (module doc); call it before any JAX computation.

    Args:
      autotune: measure each convolution's forms on the host; None: unless
        ``JAXPRUNE_CPU_AUTOTUNE=0``.
      budget_s: tuning seconds allowed in this process; None: ``$JAXPRUNE_CPU_AUTOTUNE_BUDGET_S``
        or 120.

    Returns:
      `Status`. Calling it again replaces the plan (and its in-memory choices) only.
    """
    late = xla_cpu.backend_started()
    xla_own = xla_cpu.configure(backend_started=late)
    glibc = allocator.glibc_tuned() if late else allocator.configure()
    if late:
        missed = []
        if not xla_own and xla_cpu.flag_applies(os.environ):
            missed.append("the XLA:CPU flag (XLA's own convolutions instead of YNNPACK's)")
        if not glibc and allocator.would_tune():
            missed.append("the malloc settings (no page faults per step)")
        if missed:
            warnings.warn(
                "jaxprune.cpu.enable() ran after JAX's backend started, so "
                + " and ".join(missed)
                + " cannot take effect in this process; the convolution plan is on. Call "
                "jaxprune.cpu.enable() before the first JAX computation.",
                LateEnableWarning,
                stacklevel=2,
            )
    planner = Planner.from_environment(autotune, budget_s)
    ops.install(_backend(planner))
    return Status(xla_cpu.ynn_convolutions_off(), glibc, planner.autotune, late)


def disable() -> None:
    """Puts `jaxprune.ops`' default backend (plain `lax`) back. The XLA flag and malloc settings
    stay: a process cannot undo them."""
    ops.install(ops.conv.LAX)


@contextlib.contextmanager
def enabled(autotune: bool | None = False) -> Iterator[CpuBackend]:
    """Within the block the CPU convolution plan is installed (thresholds unless ``autotune``;
    None: as `enable` decides), the previous backend after it. Process settings (XLA flag, malloc)
    are not touched: for tests and benchmarks."""
    planner = Planner.from_environment(autotune) if autotune is None else Planner(autotune)
    with ops.installed(_backend(planner)) as backend:
        yield backend


def current_planner() -> Planner:
    """The installed plan's `jaxprune.cpu.plan.Planner` (its choices so far, tuning seconds)."""
    backend = ops.conv.current()
    if not isinstance(backend, CpuBackend):
        raise RuntimeError("the CPU layer is not enabled: call jaxprune.cpu.enable() first")
    return backend.planner


def plan_report() -> str:
    """The plan so far (every convolution planned in this process: form per direction and why)
    and the seconds spent tuning, as Markdown."""
    planner = current_planner()
    head = f"CPU convolution plan ({'tuned' if planner.autotune else 'thresholds'}); "
    head += f"tuning so far: {planner.tuning_s:.1f} s of a {planner.budget_s:.0f} s budget"
    return "\n".join([head, "", *report_lines(planner)])


def describe(fn: Callable, *args) -> str:
    """The plan of the convolutions ``fn(*args)`` runs, as a Markdown table, one row per shape.

    Traces ``fn`` (tuning what was not tuned yet); pass a plain function (not one already traced
    under `jax.jit`, whose cached trace plans nothing), e.g. ``lambda v, x: model.apply(v, x)``.
    """
    planner = current_planner()
    return "\n".join(report_lines(planner, trace_shapes(planner, fn, *args)))
