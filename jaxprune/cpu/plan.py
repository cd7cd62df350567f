"""Which form (`jaxprune.cpu.conv.Form`) computes each direction of each convolution on the host.

Two ways to choose, per direction (forward pass, input gradient, kernel gradient) and per shape
(batch included):

- **tuned** (the default when the layer is enabled): the first time a shape's direction is traced,
  every candidate form is compiled and timed on it (`jaxprune.cpu.tune.measure`, well under a
  second for most CIFAR shapes), and the fastest is kept, in memory and in a cache file per CPU
  model and library version (``$JAXPRUNE_CACHE_DIR/cpu-plan-*.json``), so later processes on the
  same machine only read it. Tuning stops once `Planner.budget_s` seconds were spent in a process;
  shapes after that take the thresholds.
- **threshold** (``JAXPRUNE_CPU_AUTOTUNE=0``, and the tests): `threshold_forms`, shape rules
  measured on CIFAR ResNet-56 / VGG-16 on one Intel machine (RESULTS.md section 3).

The choice is made at trace time: a function traced earlier keeps its forms.
"""

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import jax

from jaxprune.cpu import conv, onednn, tune, xla_cpu
from jaxprune.cpu.conv import DIRECTIONS, Direction, FixedForms, Form

AUTOTUNE_ENV = "JAXPRUNE_CPU_AUTOTUNE"
BUDGET_ENV = "JAXPRUNE_CPU_AUTOTUNE_BUDGET_S"
DEFAULT_BUDGET_S = 120.0
# Smaller convolutions (e.g. `model.init` on one example) take well under a millisecond in any
# form; compiling the candidates would cost more than any choice can save.
MIN_TUNED_MACS = 1 << 24

log = logging.getLogger("jaxprune.cpu")

# Thresholds of `threshold_forms` in output pixels (H_out * W_out), measured on the convolutions of
# CIFAR ResNet-56 and VGG-16 at batch 128: up to 4x4 the forward pass and input gradient are dots
# over im2col patches (XLA's convolution runs at 2-14 GFLOP/s at 1x1 and 2x2); from 16x16 the
# kernel gradient, when not XLA's, uses the rowshift form.
_IM2COL_MAX_PIXELS = 16
_ROWSHIFT_MIN_PIXELS = 256
# oneDNN 2.6 (AVX2) against XLA's convolution: 1.0x to 10x faster in every direction with 3 to 32
# channels on a side, and in every direction of the 1x1 convolutions; from 64 channels its forward
# pass is 3-17% slower.
_ONEDNN_MAX_NARROW_CHANNELS = 32
# 3x3 stride-1 layers with more channels than that, or from 24 channels when both counts are
# multiples of 8, run their forward pass and input gradient by Winograd's F(2x2, 3x3): 1.4x-1.5x
# oneDNN's direct convolution at 32 channels, 1.5x-2.3x XLA's at 64-512.
_WINOGRAD_MIN_CHANNELS = 24


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One convolution as the plan sees it: x f[N,H,W,C], kernel f[kh,kw,C,O], stride, padding."""

    x_shape: tuple[int, int, int, int]
    kernel_shape: tuple[int, int, int, int]
    stride: int
    padding: int
    dtype: str = "float32"

    @classmethod
    def of(cls, x, kernel, stride: int, padding: int) -> "ConvShape":
        dtype = str(x.dtype) if x.dtype == kernel.dtype else f"{x.dtype}/{kernel.dtype}"
        return cls(tuple(x.shape), tuple(kernel.shape), int(stride), int(padding), dtype)

    @property
    def name(self) -> str:
        """E.g. ``128x32x32x16 k3x3x16->16 s1 p1 float32``: the cache's key."""
        kh, kw, c_in, c_out = self.kernel_shape
        x = "x".join(map(str, self.x_shape))
        return f"{x} k{kh}x{kw}x{c_in}->{c_out} s{self.stride} p{self.padding} {self.dtype}"

    @property
    def out_hw(self) -> tuple[int, int]:
        """(H_out, W_out) of the output maps."""
        _, h, w, _ = self.x_shape
        kh, kw = self.kernel_shape[:2]
        return (
            conv.out_size(h, kh, self.stride, self.padding),
            conv.out_size(w, kw, self.stride, self.padding),
        )

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one direction (each costs the same count)."""
        h_out, w_out = self.out_hw
        return self.x_shape[0] * h_out * w_out * math.prod(self.kernel_shape)

    @property
    def float32(self) -> bool:
        return self.dtype == "float32"


def _onednn_runs(shape: ConvShape) -> bool:
    return shape.float32 and onednn.available()


def _winograd_runs(shape: ConvShape) -> bool:
    return (
        shape.float32
        and onednn.winograd_supported()
        and onednn.winograd_applies(shape.kernel_shape, shape.stride, shape.padding)
    )


def threshold_forms(
    shape: ConvShape, ynn_off: bool, onednn_runs: bool, winograd_runs: bool
) -> FixedForms:
    """The forms chosen by shape rules (module doc), given whether XLA runs its own convolutions
    rather than YNNPACK's (``ynn_off``), whether oneDNN's library and its Winograd form can run.

    XLA's convolution keeps the forward pass except at the smallest maps and the input gradient of
    stride-1 convolutions with a real window; the kernel gradient is XLA's own when YNNPACK's
    convolutions are off, else a dot. Winograd takes the forward pass and input gradient of 3x3,
    stride-1 layers with more than 32 channels on both sides, or from 24 when both counts are
    multiples of 8 (then with oneDNN's kernel gradient); oneDNN the other layers with at most 32
    channels on a side or a 1x1 window, in every direction.
    """
    kh, kw, c_in, c_out = shape.kernel_shape
    s = shape.stride
    pixels = math.prod(shape.out_hw)
    small = pixels <= _IM2COL_MAX_PIXELS
    windowed = s == 1 and kh * kw > 1
    if ynn_off:
        kernel_grad = "xla"
    elif windowed and pixels >= _ROWSHIFT_MIN_PIXELS and c_in >= 8:
        kernel_grad = "rowshift"
    else:
        kernel_grad = "im2col"
    wide = min(c_in, c_out) > _ONEDNN_MAX_NARROW_CHANNELS
    lanes = c_in % 8 == 0 and c_out % 8 == 0 and min(c_in, c_out) >= _WINOGRAD_MIN_CHANNELS
    if winograd_runs and (wide or lanes):
        return FixedForms("winograd", "winograd", kernel_grad if wide else "onednn")
    if onednn_runs and (not wide or kh * kw == 1):
        return FixedForms("onednn", "onednn", "onednn")
    return FixedForms(
        forward="im2col" if small else "xla",
        input_grad="xla" if windowed and not small else "im2col",
        kernel_grad=kernel_grad,
    )


def candidates(shape: ConvShape, direction: Direction) -> tuple[Form, ...]:
    """The forms that can compute ``direction`` of ``shape`` in this process (and are worth
    timing)."""
    kh, kw = shape.kernel_shape[:2]
    pixels = math.prod(shape.out_hw)
    # XLA's convolution at the smallest maps is 2x-400x slower than any other form (seconds per
    # call at VGG-16's 2x2 layers): not worth a measurement, except for the kernel gradient.
    forms: list[Form] = ["im2col"]
    if direction == "kernel_grad" or pixels > _IM2COL_MAX_PIXELS:
        forms.insert(0, "xla")
    if direction == "kernel_grad" and shape.stride == 1 and kh * kw > 1:
        forms.append("rowshift")
    if _onednn_runs(shape):
        forms.append("onednn")
        if direction != "kernel_grad" and _winograd_runs(shape):
            forms.append("winograd")
    return tuple(forms)


Reason = Literal[
    "tuned", "cached", "threshold", "threshold: too small to tune", "threshold: tuning budget spent"
]


@dataclasses.dataclass(frozen=True)
class Choice:
    """The form of one direction of one shape, why, and the seconds per call measured (if)."""

    form: Form
    reason: Reason
    seconds: tuple[tuple[str, float], ...] = ()
    tuning_s: float = 0.0


@dataclasses.dataclass(eq=False)
class Planner:
    """Chooses forms (module doc) and remembers them; one per `jaxprune.cpu.enable`.

    Attributes:
      autotune: measure (else the thresholds).
      budget_s: seconds of tuning allowed in this process.
      cache_file: where measured choices are kept (None: memory only).
    """

    autotune: bool
    budget_s: float = DEFAULT_BUDGET_S
    cache_file: Path | None = None
    choices: dict[tuple[ConvShape, Direction], Choice] = dataclasses.field(default_factory=dict)
    tuning_s: float = 0.0
    _seen: dict | None = None

    @classmethod
    def from_environment(cls, autotune: bool | None = None, budget_s: float | None = None):
        """``autotune`` default: ``$JAXPRUNE_CPU_AUTOTUNE`` != "0"; ``budget_s`` default:
        ``$JAXPRUNE_CPU_AUTOTUNE_BUDGET_S``, else `DEFAULT_BUDGET_S`."""
        if autotune is None:
            autotune = os.environ.get(AUTOTUNE_ENV, "1") != "0"
        if budget_s is None:
            budget_s = float(os.environ.get(BUDGET_ENV, DEFAULT_BUDGET_S))
        return cls(autotune=autotune, budget_s=budget_s)

    def bind(self, shape: ConvShape) -> "BoundPlan":
        if self._seen is not None:
            self._seen[shape] = self._seen.get(shape, 0) + 1
        return BoundPlan(self, shape)

    def choose(self, shape: ConvShape, direction: Direction) -> Choice:
        """The form of ``direction`` of ``shape``: remembered, cached on disk, tuned now, or by
        threshold (module doc)."""
        key = (shape, direction)
        if key not in self.choices:
            self.choices[key] = self._choose(shape, direction)
        return self.choices[key]

    def _choose(self, shape: ConvShape, direction: Direction) -> Choice:
        fallback = threshold_forms(
            shape, xla_cpu.ynn_convolutions_off(), _onednn_runs(shape), _winograd_runs(shape)
        ).form(direction)
        if not self.autotune:
            return Choice(fallback, "threshold")
        if shape.macs < MIN_TUNED_MACS:
            return Choice(fallback, "threshold: too small to tune")
        forms = candidates(shape, direction)
        path = self.cache_file or tune.cache_path()
        entry = tune.load(path).get(f"{shape.name} {direction}")
        if entry and entry.get("form") in forms:
            return Choice(entry["form"], "cached", tuple(entry.get("seconds", {}).items()))
        if self.tuning_s >= self.budget_s:
            return Choice(fallback, "threshold: tuning budget spent")
        # The threshold's form first: the others then stop early when clearly slower.
        ordered = (fallback, *(f for f in forms if f != fallback))
        start = time.perf_counter()
        seconds = tune.measure(shape, direction, ordered)
        spent = time.perf_counter() - start
        self.tuning_s += spent
        form = min(seconds, key=seconds.get)
        tune.store(path, {f"{shape.name} {direction}": {"form": form, "seconds": seconds}})
        times = ", ".join(f"{f} {1e3 * s:.2f}" for f, s in seconds.items())
        log.info("tuned %s %s: %s (ms per call: %s; %.2f s)", shape.name, direction, form, times,
                 spent)  # fmt: skip
        return Choice(form, "tuned", tuple(seconds.items()), spent)

    def recording(self) -> "_Recording":
        """``with planner.recording() as calls:`` gives ``{shape: calls}``: the shapes planned
        inside the block, in the order first traced, and how many convolutions of each."""
        return _Recording(self)


class _Recording:
    def __init__(self, planner: Planner):
        self.planner, self.shapes = planner, {}

    def __enter__(self) -> dict:
        self.previous, self.planner._seen = self.planner._seen, self.shapes
        return self.shapes

    def __exit__(self, *exc) -> None:
        self.planner._seen = self.previous


@dataclasses.dataclass(frozen=True, eq=False)
class BoundPlan:
    """A planner bound to one shape: `jaxprune.cpu.conv`'s static ``forms`` argument, asked for a
    direction's form when that direction is traced. Equal to another binding of the same shape
    and planner (so JAX's caches see one function)."""

    planner: Planner
    shape: ConvShape

    def form(self, direction: Direction) -> Form:
        return self.planner.choose(self.shape, direction).form

    def __eq__(self, other):
        return (
            isinstance(other, BoundPlan)
            and other.planner is self.planner
            and other.shape == self.shape
        )

    def __hash__(self):
        return hash((id(self.planner), self.shape))


def report_lines(planner: Planner, shapes: Iterator[ConvShape] | None = None) -> list[str]:
    """A Markdown table: each shape's form per direction and why (``tuned`` / ``cached`` /
    ``threshold``), the measured milliseconds per call of each candidate where measured; ``-`` for
    a direction never traced (an inference-only shape's gradients)."""
    if shapes is None:
        shapes = list(dict.fromkeys(shape for shape, _ in planner.choices))
    lines = [
        "| convolution (x, kernel, stride, padding) | forward | input gradient | kernel gradient |",
        "|---|---|---|---|",
    ]
    for shape in shapes:
        cells = []
        for direction in DIRECTIONS:
            choice = planner.choices.get((shape, direction))
            if choice is None:  # never traced (e.g. no gradient taken): not chosen
                cells.append("-")
                continue
            times = ", ".join(f"{f} {1e3 * s:.2f}" for f, s in choice.seconds)
            measured = f"; ms: {times}" if times else ""
            cells.append(f"**{choice.form}** ({choice.reason}{measured})")
        lines.append(f"| {shape.name} | " + " | ".join(cells) + " |")
    return lines


def trace_shapes(planner: Planner, fn, *args) -> list[ConvShape]:
    """The convolution shapes ``fn(*args)`` plans, in order (traced with `jax.make_jaxpr`; pass a
    function not already traced under `jax.jit`, whose cached trace would skip the planning)."""
    with planner.recording() as shapes:
        jax.make_jaxpr(fn)(*args)
    return list(shapes)
